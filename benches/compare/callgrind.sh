#!/usr/bin/env bash
# User-space instructions per request of one or more wsgate binaries, under callgrind: a figure
# that a shared, noisy machine does not move, for A/B comparisons of the request path.
#
#   benches/compare/callgrind.sh [BIN...]      # default: this tree's target/release/wsgate
#   benches/compare/callgrind.sh target/release/wsgate "$(benches/compare/build-base.sh 4dc17d2)"
#
# For each binary: bench_backend on CPU 0, wsgate under `valgrind --tool=callgrind` on CPU 1 with
# benches/compare/wsgate.toml.in's settings, and wrk (1 thread, CONNS keep-alive connections,
# GET /) for a SHORT and a LONG window. The figure is the slope, (Ir_long - Ir_short) /
# (requests_long - requests_short), so that start-up and shutdown cancel out. The profiles
# stay in OUT (default /tmp/wsgate-callgrind) for callgrind_annotate.
# Environment: CONNS=10, SHORT=2, LONG=8 (seconds), OUT. LOG_LEVEL and LOG_ACCESS set `[log]
# level` and `access` (default: the template's warn and false), to measure the logging path:
# LOG_LEVEL=info LOG_ACCESS=true is the default config's. LOG_FORMAT, when set, adds `format`
# (left out by default: a binary from before that key would refuse the config).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CONNS=${CONNS:-10}
SHORT=${SHORT:-2}
LONG=${LONG:-8}
OUT=${OUT:-/tmp/wsgate-callgrind}
LOG_LEVEL=${LOG_LEVEL:-warn}
LOG_ACCESS=${LOG_ACCESS:-false}
LOG_FORMAT=${LOG_FORMAT:-}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

die() { echo "callgrind.sh: $*" >&2; exit 1; }
for tool in valgrind wrk taskset; do
    command -v "$tool" >/dev/null || {
        [[ $(id -u) == 0 ]] || die "$tool is missing (apt-get install valgrind wrk)"
        apt-get update -qq && apt-get install -y -qq valgrind wrk >/dev/null
    }
done
(cd "$ROOT" && cargo build --release --quiet --bin wsgate --example bench_backend)
BACKEND=$TARGET_DIR/release/examples/bench_backend
(($# > 0)) || set -- "$TARGET_DIR/release/wsgate"

mkdir -p "$OUT"
# The benchmark config without its TLS listener: plain on 19001, the backend on 19000.
awk '/^\[\[listener\]\]$/ { held = $0; next }
     held != "" { if ($0 ~ /bench_tls/) skip = 1; else print held; held = "" }
     skip { if ($0 ~ /^certificates/) skip = 0; next }
     { print }' "$HERE/wsgate.toml.in" |
    sed -e 's/@PROXY_PORT@/19001/' -e 's/@BACKEND_PORT@/19000/' \
        -e "s/^level = .*/level = \"$LOG_LEVEL\"/" -e "s/^access = .*/access = $LOG_ACCESS${LOG_FORMAT:+\\nformat = \"$LOG_FORMAT\"}/" >"$OUT/wsgate.toml"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# measure BIN SECONDS TAG: prints "requests instructions".
measure() {
    local bin=$1 seconds=$2 tag=$3 backend gateway i
    taskset -c 0 "$BACKEND" --listen 127.0.0.1:19000 >"$OUT/$tag.backend.log" 2>&1 &
    backend=$!
    taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$OUT/$tag.callgrind" \
        "$bin" --config "$OUT/wsgate.toml" run >"$OUT/$tag.wsgate.log" 2>&1 &
    gateway=$!
    for ((i = 0; i < 300; i++)); do port_open 19001 && port_open 19000 && break; sleep 0.1; done
    port_open 19001 || die "wsgate did not listen; see $OUT/$tag.wsgate.log"
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${seconds}s" http://127.0.0.1:19001/ >"$OUT/$tag.wrk"
    kill -TERM "$gateway"
    wait "$gateway" || true
    kill "$backend"
    wait "$backend" 2>/dev/null || true
    echo "$(awk '/requests in/ {print $1}' "$OUT/$tag.wrk") $(awk '/^summary:/ {print $2}' "$OUT/$tag.callgrind")"
}

for bin in "$@"; do
    [[ -x $bin ]] || die "not an executable: $bin"
    name=$(basename "$(dirname "$(dirname "$(dirname "$bin")")")")-$(basename "$bin")
    read -r short_reqs short_ir < <(measure "$bin" "$SHORT" "$name.short")
    read -r long_reqs long_ir < <(measure "$bin" "$LONG" "$name.long")
    ((long_reqs > short_reqs)) || die "$bin: the long window served no more requests than the short one"
    echo "$bin: $(((long_ir - short_ir) / (long_reqs - short_reqs))) instructions per request" \
        "($short_reqs and $long_reqs requests)"
done
