#!/usr/bin/env bash
# Long fuzz runs: every target (or the ones named) for RUNS inputs each, one after another.
#
# Usage: scripts/fuzz.sh [-r RUNS] [-t SECONDS] [TARGET ...]
#   RUNS defaults to 1000000 inputs per target; SECONDS (optional) caps each target's time.
#   Logs and corpora go to $FUZZ_RESULTS/<target>/ (default /tmp/ztagent-fuzz); a finding
#   stops that target and leaves crash-* there (replay: .venv/bin/python -m tests.fuzz.run
#   TARGET CRASH_FILE).
#   `.venv/bin/python -m tests.fuzz.run --list` names the targets.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="$REPO_ROOT/.venv/bin/python"
RUNS=1000000
RESULTS="${FUZZ_RESULTS:-/tmp/ztagent-fuzz}"
SECONDS_CAP=""
while getopts "r:t:" opt; do
    case "$opt" in
        r) RUNS="$OPTARG" ;;
        t) SECONDS_CAP="$OPTARG" ;;
        *) sed -n '2,10p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [[ $# -eq 0 ]]; then
    read -r -a targets <<<"$("$PYTHON" -m tests.fuzz.run --list | sed -n 's/^targets: //p')"
else
    targets=("$@")
fi

status=0
for target in "${targets[@]}"; do
    out="$RESULTS/$target"
    mkdir -p "$out/corpus"
    flags=("-runs=$RUNS" "-timeout=10" "-rss_limit_mb=2048" "-print_final_stats=1"
           "-artifact_prefix=$out/")
    [[ -n "$SECONDS_CAP" ]] && flags+=("-max_total_time=$SECONDS_CAP")
    # Seeds first, then what earlier runs found.
    "$PYTHON" - "$target" "$out/corpus" <<'PY'
import sys
from pathlib import Path
from tests.fuzz.targets import seeds
for i, seed in enumerate(seeds()[sys.argv[1]]):
    (Path(sys.argv[2]) / f"seed-{i}").write_bytes(seed)
PY
    start=$(date +%s)
    if "$PYTHON" -m tests.fuzz.run "$target" "${flags[@]}" "$out/corpus" >"$out/log" 2>&1; then
        result="ok"
    else
        result="FINDING (see $out/log)"
        status=1
    fi
    elapsed=$(( $(date +%s) - start ))
    done_line="$(grep -E '^Done [0-9]+ runs' "$out/log" | tail -1 || true)"
    echo "$target: $result; ${done_line:-no summary}; wall ${elapsed}s"
done
exit "$status"
