#!/usr/bin/env bash
# Regenerate the Python modules for the .proto files under ztagent/xds/proto: messages (*_pb2.py),
# gRPC services (*_pb2_grpc.py, only for files that declare a service) and their type stubs
# (*.pyi, mypy-protobuf). Imports between our own protos are rewritten to the ztagent.xds.gen
# package. The output depends only on the .proto files and the grpcio-tools / mypy-protobuf
# versions, so running it again on an unchanged tree changes nothing.
#
# Usage: scripts/gen-protos.sh [OUT_DIR]
#   OUT_DIR defaults to ztagent/xds/gen and is replaced entirely.
#   PYTHON selects the interpreter (default .venv/bin/python); protoc-gen-mypy and
#   protoc-gen-mypy_grpc are taken from the same bin directory.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
BIN_DIR="$(dirname "$PYTHON")"
PROTO_DIR="ztagent/xds/proto"
OUT_DIR="${1:-ztagent/xds/gen}"
PACKAGE="ztagent.xds.gen"

work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT

mapfile -t protos < <(cd "$PROTO_DIR" && find . -name '*.proto' -printf '%P\n' | LC_ALL=C sort)
mapfile -t services < <(cd "$PROTO_DIR" && grep -l '^service ' "${protos[@]}" | LC_ALL=C sort)

protoc() {
    "$PYTHON" -m grpc_tools.protoc -I"$PROTO_DIR" \
        --plugin=protoc-gen-mypy="$BIN_DIR/protoc-gen-mypy" \
        --plugin=protoc-gen-mypy_grpc="$BIN_DIR/protoc-gen-mypy_grpc" \
        "$@"
}
protoc --python_out="$work" --mypy_out=quiet:"$work" "${protos[@]}"
protoc --grpc_python_out="$work" --mypy_grpc_out=quiet:"$work" "${services[@]}"

"$PYTHON" - "$work" "$PACKAGE" <<'PY'
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
package = sys.argv[2]
files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".pyi"))
local = {".".join(p.relative_to(root).with_suffix("").parts) for p in files}

from_import = re.compile(r"^from ([\w.]+) import (\w+)(?= as |$)", re.M)
module_name = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')([\w.]+)(')")
plain_import = re.compile(r"^import ([\w.]+)", re.M)


def qualify_from(m: re.Match[str]) -> str:
    if f"{m[1]}.{m[2]}" in local:
        return f"from {package}.{m[1]} import {m[2]}"
    return m[0]


for path in files:
    text = path.read_text()
    text = from_import.sub(qualify_from, text)
    text = module_name.sub(lambda m: f"{m[1]}{package}.{m[2]}{m[3]}", text)
    for m in plain_import.finditer(text):
        if m[1] in local:
            sys.exit(f"{path}: unhandled import of a generated module: {m[0]}")
    path.write_text(text)

for directory in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
    init = directory / "__init__.py"
    if directory == root:
        init.write_text(
            '"""Generated from ztagent/xds/proto by scripts/gen-protos.sh; do not edit."""\n'
        )
    else:
        init.touch()
PY

rm -rf -- "$OUT_DIR"
mkdir -p -- "$OUT_DIR"
cp -R -- "$work"/. "$OUT_DIR"/
