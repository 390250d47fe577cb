#!/usr/bin/env bash
# Set up, then run every check: lint, format, type check, layering, tests (unit and integration).
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not integration' -x
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

./scripts/setup.sh || { echo "==> setup failed" >&2; exit 1; }

VENV_BIN="$REPO_ROOT/.venv/bin"
failed=()

run() {
    local name="$1"
    shift
    printf '==> %s\n' "$name"
    "$@"
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        failed+=("$name (exit $rc)")
    fi
    return 0
}

run "ruff check" "$VENV_BIN/ruff" check .
run "ruff format --check" "$VENV_BIN/ruff" format --check .
run "mypy" "$VENV_BIN/mypy"
run "lint-imports" "$VENV_BIN/lint-imports"  # the layering contracts in pyproject.toml
run "pytest" "$VENV_BIN/python" -m pytest -q -rs "$@"  # -rs: every skip says why

if [[ ${#failed[@]} -ne 0 ]]; then
    printf '==> FAILED: %s\n' "${failed[*]}" >&2
    exit 1
fi
echo "==> all checks passed"
