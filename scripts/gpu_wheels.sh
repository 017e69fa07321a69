#!/usr/bin/env bash
# Download, where pip can reach an index, the wheels scripts/gpu_check.sh installs on a GPU machine
# that has no internet (e.g. one whose image holds CUDA torch, transformers, tokenizers, ... but
# not megatron-core). They land in .whl/ (git-ignored); bring that folder along and gpu_check.sh
# installs from it with --no-index.
#
#   scripts/gpu_wheels.sh                          megatron-core for CPython 3.12, manylinux x86-64
#   PYTHON_VERSION=3.11 scripts/gpu_wheels.sh      another target Python
#   scripts/gpu_wheels.sh megatron-core orjson     other packages of requirements.txt
#
# Versions come from requirements.txt; dependencies are not fetched (--no-deps): megatron-core
# needs only torch, numpy and packaging, which a CUDA machine's Python already has.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
[ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$root/.venv/bin/python"
target="${PYTHON_VERSION:-3.12}"
names=("$@")
[ "${#names[@]}" -gt 0 ] || names=(megatron-core)
# the requirements.txt specifiers of those names (one parser: scripts/unmet_requirements.py)
specs_text="$("$py" "$root/scripts/unmet_requirements.py" --all "$root/requirements.txt" "${names[@]}" 2>&1)" || {
  echo "[gpu_wheels] error: $specs_text" >&2
  exit 2
}
mapfile -t specs <<< "$specs_text"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$root/.whl"
echo "[gpu_wheels] downloading for CPython $target: ${specs[*]}"
"$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --python-version "$target" --implementation cp "${platforms[@]}" -d "$root/.whl" "${specs[@]}"
ls -l "$root/.whl"
