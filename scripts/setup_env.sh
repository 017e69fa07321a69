#!/usr/bin/env bash
# Creates (or reuses) .venv/ in the repository root and installs requirements.txt into it.
# On machines without CUDA, torch==2.13.0 (CPU build, on local disk here) is installed first so that
# the unpinned `torch>=2.4` in requirements.txt never pulls a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment at $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] CUDA machine: installing torch from the index"
    "${pip[@]}" torch
  else
    echo "[setup] CPU machine: installing torch==2.13.0 (CPU build)"
    "${pip[@]}" torch==2.13.0
  fi
fi
stamp="$venv/.requirements.sha"
want="$(cat "$root/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements.txt"
  "${pip[@]}" -r "$root/requirements.txt"
  echo "$want" > "$stamp"
fi
# The package itself, editable, so tools and entry points run from any directory.
if ! (cd / && "$venv/bin/python" -c "import megatron_spiral" 2>/dev/null); then
  echo "[setup] installing megatron_spiral (editable)"
  (cd "$root" && "${pip[@]}" --no-build-isolation --no-deps -e .)
fi
