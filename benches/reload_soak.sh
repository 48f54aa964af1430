#!/usr/bin/env bash
# The reload soak at full size: 1,000 WebSockets (or TUNNELS=N), each echoing a numbered
# message every 100 ms, through the real binary reloaded ten times with SIGHUP. The test
# suite runs the same test with 100 tunnels; this runs it in a release build and prints the
# figures (tunnels, messages, reloads, drops).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each tunnel costs the test process two descriptors and the gateway two.
ulimit -n "$(ulimit -Hn)"
WSGATE_SOAK_TUNNELS=${TUNNELS:-1000} cargo test --release --test it \
    reload::tunnels_survive_ten_reloads_without_losing_a_message -- --exact --nocapture 2>&1 |
    grep -E '^soak:|test result|panicked|FAILED'
