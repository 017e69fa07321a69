#!/usr/bin/env bash
# One-command GPU acceptance run (docs/memory.md): parity, bf16 training speed / MFU / peak memory of
# the 160M models at 4096 tokens, and the decode benchmark, with one summary table at the end.
#
#   scripts/gpu_check.sh              on a CUDA machine, from a fresh clone (uses the machine's torch)
#   scripts/gpu_check.sh --dry-run    same code path on CPU at tiny dims (CI; numbers mean nothing)
#
# Extra arguments go to bench/gpu_check.py (e.g. --steps 10, --micro-batch-size 8, --skip-decode).
# Exit status: 0 when every parity check passes, 1 when one fails, 2 on a setup problem.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
python_bin="${PYTHON:-python3}"
venv="$root/.venv"

if [ "$dry" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[gpu_check] error: nvidia-smi not found: this is not a CUDA machine; run with --dry-run" >&2
    exit 2
  fi
  if [ ! -x "$venv/bin/python" ]; then
    # --system-site-packages: reuse the machine's own CUDA build of torch instead of downloading one
    echo "[gpu_check] creating $venv on top of the system's python (keeps its CUDA torch)"
    "$python_bin" -m venv --system-site-packages "$venv"
  fi
  if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu_check] error: $venv/bin/python has no CUDA-enabled torch; install the machine's CUDA" \
         "torch into the system python (or PYTHON=/path/to/python) and rerun" >&2
    exit 2
  fi
  stamp="$venv/.gpu_check_requirements.sha"
  want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[gpu_check] installing requirements.txt (torch already satisfied by the system's build)"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$root/requirements.txt"
    echo "$want" > "$stamp"
  fi
  py="$venv/bin/python"
else
  # CI: whatever environment runs the tests (the repository's .venv when there is one)
  py="$python_bin"
  [ -x "$venv/bin/python" ] && py="$venv/bin/python"
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$py" bench/gpu_check.py "$@"
