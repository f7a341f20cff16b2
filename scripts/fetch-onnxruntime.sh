#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that niix's inference engine loads.
# It ships inside the PyPI wheel onnxruntime==1.31.1 (onnxruntime/capi/), so
# pip is the only tool needed; nothing is downloaded from anywhere else.
# Idempotent: does nothing when the library is already in place.
set -euo pipefail

version="1.31.1"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${NIIX_ORT_DIR:-$root/.niix/onnxruntime}"
lib="$dest/libonnxruntime.so.$version"

if [ -f "$lib" ]; then
  echo "$lib"
  exit 0
fi

python="$(command -v python3 || command -v python || true)"
if [ -z "$python" ]; then
  echo "fetch-onnxruntime: python3 with pip is needed to fetch onnxruntime==$version from PyPI" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: "onnxruntime==$version" -d "$tmp" >&2
wheel="$(ls "$tmp"/onnxruntime-"$version"-*.whl | head -n1)"
mkdir -p "$dest"
"$python" - "$wheel" "$dest" "$version" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    data = z.read(name)
tmp = dest / (pathlib.Path(name).name + ".part")
tmp.write_bytes(data)
tmp.rename(dest / pathlib.Path(name).name)
PY
echo "$lib"
