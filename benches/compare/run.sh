#!/usr/bin/env bash
# wsgate vs nginx vs HAProxy vs a direct connection, side by side, on this machine, in one run.
#
#   benches/compare/run.sh [direct] [wsgate] [wsgate_base] [nginx] [haproxy]
#
# Default: direct wsgate nginx haproxy, and wsgate_base too when WSGATE_BASE is set.
#
# Environment:
#   DURATION=10      seconds in each measured window (whole seconds: wrk takes no fractions)
#   REPEAT=3         measurements per scenario and target; the table shows medians and spreads
#   WARMUP=1         seconds of load before each window
#   SCENARIOS="..."  a subset of the scenario names below (default: all)
#   IDLE_CONNS=N     WebSockets held by the idle rows (default: 10000, or what RLIMIT_NOFILE allows)
#   IDLE_BURST=32    WebSockets the idle rows open at a time (the *_burst128 rows always 128)
#   LONG_POLL_CONNS=2000  requests long_poll holds pending (default: 2000, or what fits)
#   LONG_POLL_MS=20000    how long the backend holds each of them (ms); must outlast the opening
#   PERF=1           also record the proxy with `perf record -g` during each measured window,
#                    into <out>/perf/<scenario>.<target>.<repeat>.data (skipped without perf)
#   WSGATE_BASE=bin  a wsgate release binary of another commit (build-base.sh makes one): the
#                    wsgate_base target, run exactly as wsgate is and reported beside it
#   LOG_LEVEL=warn LOG_ACCESS=false  wsgate's [log] level and access (both wsgate targets); info
#                    and true are the default config's. LOG_FORMAT=json, when set, adds `format`
#   OUT=dir          output folder (default: benches/compare/out/<timestamp>)
#
# Writes into the output folder: table.md (also printed), results.jsonl (one JSON line per
# measurement), machine.txt (machine, versions, settings), certs/ (this run's TLS certificate),
# conf/ (the rendered configs) and logs/. README.md next to this file says what each scenario
# measures and how.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

# --- Settings, defined once -------------------------------------------------------------------
BACKEND_PORT=19000       # bench_backend, plain; the proxies' upstream, and `direct` for tcp rows
PROXY_PORT=19001         # the proxy under test (one at a time), plain
PROXY_TLS_PORT=19002     # the same proxy's TLS listener (tls rows)
BACKEND_TLS_PORT=19003   # bench_backend terminating TLS itself: `direct` for tls rows
LOAD_CPU=0           # backend + load generator (loadgen or wrk)
PROXY_CPU=1          # the proxy, alone
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
WARMUP=${WARMUP:-1}
IDLE_BURST=${IDLE_BURST:-32}
LONG_POLL_MS=${LONG_POLL_MS:-20000}
PERF=${PERF:-0}
LOG_LEVEL=${LOG_LEVEL:-warn}
LOG_ACCESS=${LOG_ACCESS:-false}
LOG_FORMAT=${LOG_FORMAT:-}
# report.awk compares each with the better of nginx and haproxy, and wsgate with wsgate_base.
ALL_TARGETS=(direct wsgate wsgate_base nginx haproxy)

# --- Scenarios: one row each --------------------------------------------------------------------
# name: row name. transport: tcp (plain) or tls (the proxy terminates TLS and talks plain HTTP/1.1
# to the backend; `direct` is the backend terminating TLS itself). driver: wrk (HTTP),
# loadgen (a measured window), idle (open, hold, read the proxy's RSS, release). figure: the
# JSON key that is the row's result; better: hi or lo. n/a: targets that cannot do the row
# (comma-separated, or -); the table shows them as n/a. Arguments go to the driver (wrk:
# connections and path; the others: loadgen flags, @IDLE_CONNS@, @IDLE_BURST@, @LONG_POLL_CONNS@
# and @LONG_POLL_MS@ substituted).
# The idle rows say how many WebSockets are opened at a time (--open-concurrency): a reconnect
# storm is a burst, and a proxy may keep what its busiest moment allocated. http_idle and
# long_poll hold plain HTTP/1.1 connections the same way: after one answered `GET /` each, or
# with one `GET /hold?ms=N` each still pending at the backend.
SCENARIO_TABLE='
# name            transport driver  figure           better unit     n/a   arguments
http              tcp       wrk     ops_per_s        hi     req/s    -     50 /
http_big          tcp       wrk     ops_per_s        hi     req/s    -     8 /big
echo              tcp       loadgen ops_per_s        hi     msg/s    -     --mode echo --conns 100 --size 64
echo_rate         tcp       loadgen p99_us           lo     µs(p99)  -     --mode echo_rate --conns 100 --size 64 --rate 20000
echo_seq          tcp       loadgen p50_us           lo     µs(p50)  -     --mode echo_seq --conns 1 --size 64
bulk              tcp       loadgen mb_per_s         hi     MB/s     -     --mode bulk --conns 8 --size 16384 --inflight 262144
handshake         tcp       loadgen ops_per_s        hi     hs/s     -     --mode handshake --conns 10
idle              tcp       idle    rss_kib_per_conn lo     KiB/conn -     --mode idle --conns @IDLE_CONNS@ --open-concurrency @IDLE_BURST@ --size 64
idle_burst128     tcp       idle    rss_kib_per_conn lo     KiB/conn -     --mode idle --conns @IDLE_CONNS@ --open-concurrency 128 --size 64
idle_used         tcp       idle    rss_kib_per_conn lo     KiB/conn -     --mode idle_used --conns @IDLE_CONNS@ --open-concurrency @IDLE_BURST@ --size 65536
http_idle         tcp       idle    rss_kib_per_conn lo     KiB/conn -     --mode http_idle --conns @IDLE_CONNS@ --open-concurrency @IDLE_BURST@
long_poll         tcp       idle    rss_kib_per_conn lo     KiB/req  -     --mode long_poll --conns @LONG_POLL_CONNS@ --open-concurrency @IDLE_BURST@ --hold-ms @LONG_POLL_MS@
https             tls       wrk     ops_per_s        hi     req/s    -     50 /
wss_echo          tls       loadgen ops_per_s        hi     msg/s    -     --mode echo --conns 100 --size 64
wss_bulk          tls       loadgen mb_per_s         hi     MB/s     -     --mode bulk --conns 8 --size 16384 --inflight 262144
wss_handshake     tls       loadgen ops_per_s        hi     hs/s     -     --mode handshake --conns 10
wss_idle          tls       idle    rss_kib_per_conn lo     KiB/conn -     --mode idle --conns @IDLE_CONNS@ --open-concurrency @IDLE_BURST@ --size 64
wss_idle_burst128 tls       idle    rss_kib_per_conn lo     KiB/conn -     --mode idle --conns @IDLE_CONNS@ --open-concurrency 128 --size 64
h2_ws_echo        tls       loadgen ops_per_s        hi     msg/s    nginx --mode h2_echo --conns 100 --size 64
'

die() { echo "run.sh: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

# --- Arguments and environment -----------------------------------------------------------------
TARGETS=("$@")
if ((${#TARGETS[@]} == 0)); then
    TARGETS=(direct wsgate nginx haproxy)
    [[ -z ${WSGATE_BASE:-} ]] || TARGETS=(direct wsgate wsgate_base nginx haproxy)
fi
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target '$t' (known: ${ALL_TARGETS[*]})"
done
if [[ " ${TARGETS[*]} " == *" wsgate_base "* ]]; then
    [[ -n ${WSGATE_BASE:-} ]] || die "wsgate_base needs WSGATE_BASE=<wsgate binary> (benches/compare/build-base.sh <commit> prints one)"
    [[ -x $WSGATE_BASE && -f $WSGATE_BASE ]] || die "WSGATE_BASE=$WSGATE_BASE is not an executable file"
    WSGATE_BASE=$(cd "$(dirname "$WSGATE_BASE")" && pwd)/$(basename "$WSGATE_BASE")
fi
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be whole seconds, got '$DURATION'"
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be whole seconds, got '$WARMUP'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer, got '$REPEAT'"
[[ $IDLE_BURST =~ ^[1-9][0-9]*$ ]] || die "IDLE_BURST must be a positive integer, got '$IDLE_BURST'"
[[ $LONG_POLL_MS =~ ^[1-9][0-9]*$ ]] || die "LONG_POLL_MS must be a positive integer (ms), got '$LONG_POLL_MS'"
((LONG_POLL_MS <= 600000)) || die "LONG_POLL_MS must be at most 600000: bench_backend holds no longer"
[[ $PERF == 0 || $PERF == 1 ]] || die "PERF must be 0 or 1, got '$PERF'"
(($(nproc) >= 2)) || die "needs 2 CPUs (load on CPU $LOAD_CPU, proxy on CPU $PROXY_CPU)"

mapfile -t ROWS < <(grep -Ev '^[[:space:]]*(#|$)' <<<"$SCENARIO_TABLE")
if [[ -n ${SCENARIOS:-} ]]; then
    for s in $SCENARIOS; do
        printf '%s\n' "${ROWS[@]}" | grep -q "^$s " || die "unknown scenario '$s'"
    done
    mapfile -t ROWS < <(printf '%s\n' "${ROWS[@]}" | grep -E "^($(tr ' ' '|' <<<"$SCENARIOS")) ")
fi
for row in "${ROWS[@]}"; do
    read -r name transport _ <<<"$row"
    [[ $transport == tcp || $transport == tls ]] || die "scenario $name: unknown transport '$transport'"
done
uses_driver() { printf '%s\n' "${ROWS[@]}" | awk -v d="$1" '$3 == d { f = 1 } END { exit !f }'; }
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

# Every process gets the hard RLIMIT_NOFILE as its soft limit: the idle rows need thousands.
NOFILE_HARD=$(ulimit -Hn)
[[ $NOFILE_HARD != unlimited ]] || NOFILE_HARD=$(cat /proc/sys/fs/nr_open)
ulimit -n "$NOFILE_HARD"
NOFILE=$(ulimit -n)
# A proxied WebSocket costs the proxy two descriptors; keep 200 for everything else.
IDLE_MAX=$(((NOFILE - 200) / 2))
IDLE_CONNS=${IDLE_CONNS:-$((IDLE_MAX < 10000 ? IDLE_MAX : 10000))}
((IDLE_CONNS <= IDLE_MAX)) || die "IDLE_CONNS=$IDLE_CONNS does not fit RLIMIT_NOFILE $NOFILE (at most $IDLE_MAX)"
# A pending long-poll request holds two descriptors too (client side, upstream side).
LONG_POLL_CONNS=${LONG_POLL_CONNS:-$((IDLE_MAX < 2000 ? IDLE_MAX : 2000))}
[[ $LONG_POLL_CONNS =~ ^[1-9][0-9]*$ ]] || die "LONG_POLL_CONNS must be a positive integer, got '$LONG_POLL_CONNS'"
((LONG_POLL_CONNS <= IDLE_MAX)) || die "LONG_POLL_CONNS=$LONG_POLL_CONNS does not fit RLIMIT_NOFILE $NOFILE (at most $IDLE_MAX)"
# The most connections any row holds at once: what the proxies' connection limits are sized for.
HOLD_CONNS=$((IDLE_CONNS > LONG_POLL_CONNS ? IDLE_CONNS : LONG_POLL_CONNS))
CLK_TCK=$(getconf CLK_TCK)

# --- Tools ---------------------------------------------------------------------------------------
missing=()
has_target nginx && ! command -v nginx >/dev/null && missing+=(nginx)
has_target haproxy && ! command -v haproxy >/dev/null && missing+=(haproxy)
uses_driver wrk && ! command -v wrk >/dev/null && missing+=(wrk)
! command -v openssl >/dev/null && missing+=(openssl)   # makes the run's TLS certificate
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v taskset >/dev/null || die "taskset (util-linux) is missing"
if ((PERF)) && ! command -v perf >/dev/null; then
    say "PERF=1 but perf is not installed (linux-perf, or linux-tools-\$(uname -r)): recording no profiles"
    PERF=0
fi

say "building wsgate and the examples (release)"
# Two builds: one cargo invocation unifies features over all its targets, so building the
# examples with wsgate would give wsgate the dev-dependencies' tokio `test-util` (its time driver
# then reads the clock through a mutex), which neither a plain release build nor build-base.sh's
# base binary has.
(cd "$ROOT" && cargo build --release --quiet --bin wsgate)
(cd "$ROOT" && cargo build --release --quiet --example bench_backend --example loadgen)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
WSGATE=$TARGET_DIR/release/wsgate
BACKEND=$TARGET_DIR/release/examples/bench_backend
LOADGEN=$TARGET_DIR/release/examples/loadgen

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$HERE/out/$STAMP}
mkdir -p "$OUT/conf" "$OUT/logs" "$OUT/run" "$OUT/certs"
((PERF == 0)) || mkdir -p "$OUT/perf"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

# --- The run's certificate: one ECDSA P-256 leaf for all three proxies and the direct backend --
# A throwaway CA signs a leaf for localhost and 127.0.0.1; the loadgen trusts only that CA (wrk
# verifies nothing). The proxies serve the leaf alone, as they would a leaf issued by a root.
CERTS=$OUT/certs
CERT=$CERTS/cert.pem        # the leaf
KEY=$CERTS/key.pem          # its key (PKCS#8)
CERT_KEY=$CERTS/cert+key.pem   # both in one file, for HAProxy's `crt`
make_certs() {
    local d=$CERTS
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/ca.key"
    openssl req -x509 -new -key "$d/ca.key" -subj "/CN=wsgate bench CA $STAMP" -days 2 -out "$d/ca.pem"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$KEY"
    openssl req -new -key "$KEY" -subj "/CN=localhost" -out "$d/leaf.csr"
    printf '%s\n' "subjectAltName = DNS:localhost, IP:127.0.0.1" "basicConstraints = critical, CA:FALSE" \
        "keyUsage = critical, digitalSignature" "extendedKeyUsage = serverAuth" >"$d/leaf.ext"
    openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
        -days 2 -extfile "$d/leaf.ext" -out "$CERT"
    cat "$CERT" "$KEY" >"$CERT_KEY"
}
make_certs >"$CERTS/openssl.log" 2>&1 || { cat "$CERTS/openssl.log" >&2; die "could not make the TLS certificate"; }

# --- Processes: started pinned, stopped by PID ---------------------------------------------------
LIVE=()   # every PID we started and have not reaped yet
cleanup() {
    local pid
    for pid in "${LIVE[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${LIVE[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget() { local keep=() p; for p in "${LIVE[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; LIVE=("${keep[@]}"); }

# start LOG CPU CMD...: runs CMD in the background pinned to CPU; sets STARTED.
start() {
    local log=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" </dev/null >"$log" 2>&1 &
    STARTED=$!
    LIVE+=("$STARTED")
}

# stop PID: SIGTERM, up to 5 s, then SIGKILL; reaps it.
stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT PID LOG: until PORT accepts; fails if PID exits first or after 10 s.
wait_port() {
    local i
    for ((i = 0; i < 200; i++)); do
        port_open "$1" && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "run.sh: process $2 exited before listening on $1; its log ($3):" >&2
            tail -n 20 "$3" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "run.sh: nothing listens on $1 after 10 s; log $3" >&2
    return 1
}

# children_of PID: the PIDs whose parent is PID (field 4 of /proc/PID/stat)
children_of() {
    local f stat ppid
    for f in /proc/[0-9]*/stat; do
        { stat=$(<"$f"); } 2>/dev/null || continue
        read -r _ ppid _ <<<"${stat##*) }"
        if [[ $ppid == "$1" ]]; then f=${f#/proc/}; echo "${f%/stat}"; fi
    done
}
# utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat, counted after the command name)
cpu_ticks() {
    local p v s=0
    for p in "$@"; do
        v=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || true
        s=$((s + ${v:-0}))
    done
    echo "$s"
}
rss_kib() {
    local p v s=0
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null) || true
        s=$((s + ${v:-0}))
    done
    echo "$s"
}
alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done; }

# render TEMPLATE OUTPUT RUN_DIR: fills in @NAME@ placeholders.
render() {
    sed -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" -e "s|@PROXY_PORT@|$PROXY_PORT|g" \
        -e "s|@PROXY_TLS_PORT@|$PROXY_TLS_PORT|g" -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" \
        -e "s|@CERT_KEY@|$CERT_KEY|g" -e "s|@RUN_DIR@|$3|g" -e "s|@NOFILE@|$NOFILE|g" \
        -e "s|@WORKER_CONNECTIONS@|$((HOLD_CONNS * 5 / 2 + 256))|g" -e "s|@MAXCONN@|$((HOLD_CONNS + 50))|g" \
        "$HERE/$1" >"$2"
}

# start_target TARGET TAG: starts the proxy (a plain and a TLS listener); sets MAIN_PID (the one
# to stop, empty for direct) and PROXY_PIDS (whose CPU and RSS are measured).
start_target() {
    local target=$1 tag=$2 log=$OUT/logs/$2.$1.log run=$OUT/run/$2.$1 port
    MAIN_PID='' PROXY_PIDS=() PROXY_LOG=$log
    for port in "$PROXY_PORT" "$PROXY_TLS_PORT"; do
        if port_open "$port"; then
            echo "run.sh: port $port is already in use" >&2
            return 1
        fi
    done
    case $target in
    direct)
        return 0
        ;;
    wsgate | wsgate_base)
        # One template, one placement: the two differ only in the binary.
        local bin=$WSGATE
        [[ $target == wsgate ]] || bin=$WSGATE_BASE
        render wsgate.toml.in "$OUT/conf/wsgate.toml" "$run"
        sed -i -e "s/^level = .*/level = \"$LOG_LEVEL\"/" \
            -e "s/^access = .*/access = $LOG_ACCESS${LOG_FORMAT:+\\nformat = \"$LOG_FORMAT\"}/" \
            "$OUT/conf/wsgate.toml"
        start "$log" "$PROXY_CPU" "$bin" --config "$OUT/conf/wsgate.toml" run
        ;;
    nginx)
        mkdir -p "$run"
        render nginx.conf.in "$OUT/conf/nginx.conf" "$run"
        start "$log" "$PROXY_CPU" nginx -p "$run" -c "$OUT/conf/nginx.conf" -e "$run/error.log"
        PROXY_LOG=$run/error.log
        ;;
    haproxy)
        render haproxy.cfg.in "$OUT/conf/haproxy.cfg" "$run"
        start "$log" "$PROXY_CPU" haproxy -db -f "$OUT/conf/haproxy.cfg"
        ;;
    esac
    MAIN_PID=$STARTED
    wait_port "$PROXY_PORT" "$MAIN_PID" "$log" || return 1
    wait_port "$PROXY_TLS_PORT" "$MAIN_PID" "$log" || return 1
    PROXY_PIDS=("$MAIN_PID")
    if [[ $target == nginx ]]; then
        local worker
        for worker in $(children_of "$MAIN_PID"); do
            PROXY_PIDS+=("$worker")
            LIVE+=("$worker")   # killed by cleanup if the master is killed first
        done
        ((${#PROXY_PIDS[@]} == 2)) || { echo "run.sh: nginx has no single worker: ${PROXY_PIDS[*]}" >&2; return 1; }
    fi
}

stop_target() {
    [[ -n $MAIN_PID ]] || return 0
    stop "$MAIN_PID"
    local p
    for p in "${PROXY_PIDS[@]:1}"; do stop "$p"; done   # nginx's worker exits with its master
}

# perf_start TAG DELAY SECONDS: with PERF=1, records the proxy's samples and call graphs for
# SECONDS, from DELAY seconds from now, into perf/TAG.data; sets PERF_PID (empty if not).
# perf runs on the load CPU, so that its own work stays off the proxy's; the sampling interrupts
# still cost the proxy a little, so a profiled run's figures are not compared with others.
perf_start() {
    PERF_PID=''
    ((PERF)) && ((${#PROXY_PIDS[@]})) || return 0
    local pids
    pids=$(IFS=,; echo "${PROXY_PIDS[*]}")
    # shellcheck disable=SC2016 # expanded by the inner shell
    start "$OUT/logs/$1.perf.log" "$LOAD_CPU" bash -c \
        'sleep "$1" && exec perf record -g -p "$2" -o "$3" -- sleep "$4"' _ \
        "$2" "$pids" "$OUT/perf/$1.data" "$3"
    PERF_PID=$STARTED
}
# perf_wait: until the recording has ended (it ends by itself); a failed one only warns.
perf_wait() {
    [[ -n $PERF_PID ]] || return 0
    wait "$PERF_PID" || echo "run.sh: perf failed; see its log in $OUT/logs/" >&2
    forget "$PERF_PID"
}

# --- Drivers: each prints the JSON fields of one measurement (no braces) --------------------------
# div A B: A / B with three decimals (0 when B is 0)
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b ? a / b : 0 }'; }

# wrk CONNS PATH
drive_wrk() {
    local conns=$1 path=$2 tag=$3 url=$FRONT_URL$2 out=$OUT/logs/$3.wrk.txt
    if ((WARMUP > 0)); then
        taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${WARMUP}s" "$url" >/dev/null </dev/null
    fi
    local cpu0 side0 cpu1 side1
    cpu0=$(cpu_ticks "${PROXY_PIDS[@]}")
    side0=$(cpu_ticks "$BACKEND_PID")
    perf_start "$tag" 0 "$DURATION"
    taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$url" >"$out" </dev/null
    cpu1=$(cpu_ticks "${PROXY_PIDS[@]}")
    side1=$(cpu_ticks "$BACKEND_PID")
    perf_wait
    awk -v conns="$conns" -v cpu=$((cpu1 - cpu0)) -v side=$((side1 - side0)) -v tck="$CLK_TCK" \
        -v measured=${#PROXY_PIDS[@]} -v path="$path" '
        function us(v) {   # wrk prints 612.00us, 1.23ms, 2.00s
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return v * 1000
            if (v ~ /m$/) return v * 60e6
            return v * 1e6
        }
        / requests in / { ops = $1; secs = $4 + 0 }
        /^Requests\/sec:/ { rps = $2 }
        /^ +50%/ { p50 = us($2) }
        /^ +99%/ { p99 = us($2) }
        /Socket errors:/ { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
        /Non-2xx or 3xx responses:/ { errors += $5 }
        END {
            if (ops == "") exit 1
            printf "\"mode\":\"wrk\",\"path\":\"%s\",\"conns\":%d,\"duration_s\":%.3f,\"ops\":%d,\"ops_per_s\":%.3f,\"p50_us\":%.1f,\"p99_us\":%.1f,\"errors\":%d", path, conns, secs, ops, rps, p50, p99, errors
            if (measured) printf ",\"proxy_cpu_s\":%.3f,\"cpu_us_per_op\":%.3f", cpu / tck, cpu / tck * 1e6 / ops
            printf ",\"backend_cpu_pct\":%.1f", side / tck * 100 / secs
        }' "$out"
}

# loadgen ARGS...: one measured window
drive_loadgen() {
    local tag=$1
    shift
    local pids
    pids=$(IFS=,; echo "${PROXY_PIDS[*]}")
    local json
    # The loadgen's window starts after its warm-up (its connections open in milliseconds).
    perf_start "$tag" "$WARMUP" "$DURATION"
    json=$(taskset -c "$LOAD_CPU" "$LOADGEN" "$@" "${TLS_ARGS[@]}" --addr "127.0.0.1:$FRONT_PORT" \
        --duration "$DURATION" --warmup "$WARMUP" --clk-tck "$CLK_TCK" \
        ${pids:+--cpu-pids "$pids"} --side-pids "$BACKEND_PID" \
        </dev/null 2>"$OUT/logs/$tag.loadgen.log") || return 1
    perf_wait
    json=${json#\{}
    echo "${json%\}}"
}

# idle ARGS...: open and hold connections, read the proxy's RSS before and after, release them
drive_idle() {
    local tag=$1
    shift
    local ready=$OUT/run/$tag.ready json=$OUT/run/$tag.json i before after lg
    before=$(rss_kib "${PROXY_PIDS[@]}")
    # Work happens while connections open, so the profile covers DURATION seconds from the start.
    perf_start "$tag" 0 "$DURATION"
    start "$OUT/logs/$tag.loadgen.log" "$LOAD_CPU" "$LOADGEN" "$@" "${TLS_ARGS[@]}" --addr "127.0.0.1:$FRONT_PORT" \
        --ready-file "$ready" --hold-max 600
    lg=$STARTED
    # `start` sends stdout to the log; the JSON line is its last line.
    for ((i = 0; i < 6000; i++)); do
        [[ -e $ready ]] && break
        kill -0 "$lg" 2>/dev/null || break
        sleep 0.1
    done
    if [[ ! -e $ready ]]; then
        stop "$lg"
        echo "run.sh: loadgen did not open its WebSockets; log $OUT/logs/$tag.loadgen.log" >&2
        return 1
    fi
    sleep 1   # let the proxy settle (its last tunnels were set up a moment ago)
    after=$(rss_kib "${PROXY_PIDS[@]}")
    kill -USR1 "$lg"
    wait "$lg" || { forget "$lg"; return 1; }
    forget "$lg"
    perf_wait
    grep '^{' "$OUT/logs/$tag.loadgen.log" | tail -n 1 >"$json"
    local line open
    line=$(<"$json")
    open=$(sed -n 's/.*"conns_open":\([0-9]*\).*/\1/p' "$json")
    line=${line#\{}
    printf '%s,"rss_before_kib":%d,"rss_after_kib":%d,"rss_kib_per_conn":%s' "${line%\}}" \
        "$before" "$after" "$(div $((after - before)) "${open:-0}")"
}

# --- One measurement --------------------------------------------------------------------------
measure() {
    local row=$1 target=$2 rep=$3
    local name transport driver figure better unit na args
    read -r name transport driver figure better unit na args <<<"$row"
    args=${args//@IDLE_CONNS@/$IDLE_CONNS}
    args=${args//@IDLE_BURST@/$IDLE_BURST}
    args=${args//@LONG_POLL_CONNS@/$LONG_POLL_CONNS}
    args=${args//@LONG_POLL_MS@/$LONG_POLL_MS}
    local tag=$name.$target.$rep
    local head="\"run\":\"$STAMP\",\"scenario\":\"$name\",\"target\":\"$target\",\"repeat\":$rep"
    head+=",\"transport\":\"$transport\",\"figure\":\"$figure\",\"better\":\"$better\",\"unit\":\"$unit\""

    if [[ ",$na," == *",$target,"* ]]; then
        # The target cannot do this row (nginx: WebSockets over HTTP/2): one line says so.
        ((rep > 1)) || echo "{$head,\"unsupported\":true}" >>"$RESULTS"
        return 0
    fi
    # Where the load goes: the proxy's plain or TLS listener, or the backend's for `direct`.
    case $transport in
    tcp)
        FRONT_PORT=$PROXY_PORT
        [[ $target != direct ]] || FRONT_PORT=$BACKEND_PORT
        FRONT_URL=http://127.0.0.1:$FRONT_PORT
        TLS_ARGS=()
        ;;
    tls)
        FRONT_PORT=$PROXY_TLS_PORT
        [[ $target != direct ]] || FRONT_PORT=$BACKEND_TLS_PORT
        FRONT_URL=https://localhost:$FRONT_PORT   # wrk sends the URL's host as SNI
        TLS_ARGS=(--tls --ca "$CERTS/ca.pem" --sni localhost)
        ;;
    esac

    say "$name · $target · $rep/$REPEAT"
    local fields='' ok=1 survived=true
    start "$OUT/logs/$tag.backend.log" "$LOAD_CPU" "$BACKEND" --listen "127.0.0.1:$BACKEND_PORT" \
        --tls-listen "127.0.0.1:$BACKEND_TLS_PORT" --cert "$CERT" --key "$KEY"
    BACKEND_PID=$STARTED
    if ! wait_port "$BACKEND_PORT" "$BACKEND_PID" "$OUT/logs/$tag.backend.log" ||
        ! wait_port "$BACKEND_TLS_PORT" "$BACKEND_PID" "$OUT/logs/$tag.backend.log"; then
        ok=0
    elif ! start_target "$target" "$tag"; then
        ok=0
    else
        # shellcheck disable=SC2086 # args are words by design
        case $driver in
        wrk) fields=$(drive_wrk $args "$tag") || ok=0 ;;
        loadgen) fields=$(drive_loadgen "$tag" $args) || ok=0 ;;
        idle) fields=$(drive_idle "$tag" $args) || ok=0 ;;
        esac
        alive "${PROXY_PIDS[@]}" || survived=false
    fi
    local log_lines=0
    [[ -n ${PROXY_LOG:-} && -f $PROXY_LOG ]] && log_lines=$(wc -l <"$PROXY_LOG")
    stop_target
    stop "$BACKEND_PID"
    if [[ $survived == false ]]; then
        echo "run.sh: $target exited during $name; last lines of $PROXY_LOG:" >&2
        tail -n 20 "$PROXY_LOG" >&2 || true
    fi
    if ((ok)); then
        echo "{$head,$fields,\"proxy_survived\":$survived,\"proxy_log_lines\":$log_lines}" >>"$RESULTS"
    else
        echo "run.sh: $name on $target failed; logs in $OUT/logs/$tag.*" >&2
        echo "{$head,\"failed\":true,\"proxy_survived\":$survived,\"proxy_log_lines\":$log_lines}" >>"$RESULTS"
    fi
}

# --- The machine and the settings -------------------------------------------------------------
version() {
    if command -v "$1" >/dev/null; then { "$@" 2>&1 || true; } | head -n 1; else echo "not installed"; fi
}
{
    echo "date:        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:        $(uname -n)"
    echo "nproc:       $(nproc)"
    echo "cpu:         $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "memory:      $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "kernel:      $(uname -sr)"
    echo "os:          $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"')"
    echo "loadavg:     $(cut -d' ' -f1-3 /proc/loadavg) (at start)"
    echo "governor:    $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo n/a)"
    echo "nginx:       $(version nginx -v)"
    echo "haproxy:     $(version haproxy -v)"
    echo "wrk:         $(version wrk -v)"
    echo "rustc:       $(rustc --version)"
    echo "wsgate:      $("$WSGATE" --version) ($(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'no git'))"
    if has_target wsgate_base; then
        # build-base.sh puts the commit's full sha in the path.
        echo "wsgate_base: $("$WSGATE_BASE" --version) ($WSGATE_BASE)"
    fi
    echo "targets:     ${TARGETS[*]}"
    echo "scenarios:   $(printf '%s\n' "${ROWS[@]}" | awk '{ printf "%s ", $1 }')"
    echo "duration:    ${DURATION} s per window, warm-up ${WARMUP} s, repeats ${REPEAT}"
    echo "placement:   backend + load generator on CPU $LOAD_CPU, proxy alone on CPU $PROXY_CPU (taskset)"
    echo "wsgate log:  [log] level = \"$LOG_LEVEL\", access = $LOG_ACCESS, format = \"${LOG_FORMAT:-text}\""
    echo "workers:     wsgate workers = 1, nginx worker_processes 1, HAProxy nbthread 1; rivals log no access"
    echo "ports:       backend 127.0.0.1:$BACKEND_PORT (TLS $BACKEND_TLS_PORT), proxy 127.0.0.1:$PROXY_PORT (TLS $PROXY_TLS_PORT)"
    echo "openssl:     $(version openssl version)"
    echo "certificate: $(openssl x509 -in "$CERT" -noout -subject -ext subjectAltName 2>/dev/null | tr -s '\n ' ' ')"
    echo "             key $(openssl pkey -in "$KEY" -noout -text 2>/dev/null | awk '/ASN1 OID|NIST CURVE/ { printf "%s ", $NF }')(the proxies serve this leaf; its CA is in certs/ca.pem)"
    echo "tls client:  loadgen: rustls (ring), TLS 1.3 as negotiated, SNI localhost, ALPN http/1.1 (h2 for h2_ws_echo), no session resumption; wrk: OpenSSL, no ALPN"
    echo "nofile:      RLIMIT_NOFILE $NOFILE (soft raised to hard); idle rows hold $IDLE_CONNS WebSockets"
    echo "idle burst:  opened $IDLE_BURST at a time (the *_burst128 rows: 128)"
    echo "long poll:   $LONG_POLL_CONNS requests pending, each held $LONG_POLL_MS ms by the backend"
    echo "perf:        $( ((PERF)) && echo "recorded (perf record -g) into perf/; $(version perf --version)" || echo off)"
    echo "clk_tck:     $CLK_TCK (CPU times from /proc/PID/stat)"
    echo "tcp_tw_reuse: $(cat /proc/sys/net/ipv4/tcp_tw_reuse)"
} >"$OUT/machine.txt"

# --- Run ---------------------------------------------------------------------------------------
for port in "$BACKEND_PORT" "$PROXY_PORT" "$BACKEND_TLS_PORT" "$PROXY_TLS_PORT"; do
    ! port_open "$port" || die "port $port on 127.0.0.1 is in use; change the ports at the top"
done
say "output: $OUT"
for row in "${ROWS[@]}"; do
    read -r _ _ driver _ <<<"$row"
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for target in "${TARGETS[@]}"; do
            # Without a proxy there is no proxy memory to measure.
            [[ $driver == idle && $target == direct ]] && continue
            measure "$row" "$target" "$rep"
        done
    done
done

awk -f "$HERE/report.awk" "$RESULTS" >"$OUT/table.md"
{
    echo
    cat "$OUT/table.md"
    echo
    echo "machine: $(sed -n 's/^cpu: *//p' "$OUT/machine.txt"), $(nproc) CPUs; details in $OUT/machine.txt"
} >&2
say "results: $OUT"
