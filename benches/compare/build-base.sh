#!/usr/bin/env bash
# Builds the wsgate release binary of another commit for run.sh's `wsgate_base` target and
# prints its path on stdout (cargo's progress goes to stderr):
#
#   WSGATE_BASE=$(benches/compare/build-base.sh a28f860) benches/compare/run.sh wsgate wsgate_base
#
# The commit's tree is exported with `git archive` into $BASE_DIR/<full sha>/ (default BASE_DIR:
# /tmp/wsgate-base) and built there with its own Cargo.lock and its own target folder. Nothing in
# this work tree, its index, its worktree list or its target/ changes: CARGO_TARGET_DIR is set
# explicitly, so an inherited one cannot make the base build overwrite this tree's binary.
# Calling it again for the same commit reuses that folder (cargo rebuilds nothing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
(($# == 1)) || { echo "usage: $0 <commit>" >&2; exit 2; }
sha=$(git -C "$ROOT" rev-parse --verify --quiet "$1^{commit}") || { echo "build-base.sh: no commit '$1'" >&2; exit 1; }
dir=${BASE_DIR:-/tmp/wsgate-base}/$sha

if [[ ! -f $dir/Cargo.toml ]]; then
    mkdir -p "$dir"
    git -C "$ROOT" archive "$sha" | tar -x -C "$dir"
fi
echo "build-base.sh: building wsgate $sha in $dir" >&2
# --locked: the base runs the dependency versions its commit pinned.
(cd "$dir" && CARGO_TARGET_DIR=$dir/target cargo build --release --locked --quiet --bin wsgate) >&2
echo "$dir/target/release/wsgate"
