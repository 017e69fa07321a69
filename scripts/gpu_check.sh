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
# What the check imports beyond the machine's torch/numpy/packaging (versions: requirements.txt)
needed=(megatron-core einops psutil tqdm tokenizers safetensors transformers)
site="$root/.gpu_check_site"       # packages the machine lacks go here, not into its Python
wheels="${GPU_CHECK_WHEELS:-$root/.whl}"

if [ "$dry" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[gpu_check] error: nvidia-smi not found: this is not a CUDA machine; run with --dry-run" >&2
    exit 2
  fi
  py="$python_bin"
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu_check] error: $py has no CUDA-enabled torch; point PYTHON=/path/to/python at the" \
         "machine's Python that holds its CUDA torch and rerun" >&2
    exit 2
  fi
else
  # CI: whatever environment runs the tests (the repository's .venv when there is one)
  py="$python_bin"
  [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$root/.venv/bin/python"
fi

# Install only what this Python lacks, without touching it (no venv: a venv made from a venv's
# Python would not see that venv's CUDA torch). Offline machines: put wheels in .whl/ first
# (scripts/gpu_wheels.sh, run where pip can reach an index).
unmet="$(PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" "$root/scripts/unmet_requirements.py" \
         "$root/requirements.txt" "${needed[@]}")"
if [ -n "$unmet" ]; then
  source_args=()
  if [ -d "$wheels" ]; then source_args=(--no-index --find-links "$wheels"); fi
  echo "[gpu_check] installing into $site: $(echo $unmet)${source_args:+ (from $wheels)}"
  # shellcheck disable=SC2086 # one requirement per line
  if ! "$py" -m pip install --disable-pip-version-check -q --no-deps --target "$site" \
       "${source_args[@]}" $unmet; then
    echo "[gpu_check] error: could not install $(echo $unmet). On a machine without internet, run" \
         "scripts/gpu_wheels.sh where pip works and bring its .whl/ folder along" >&2
    exit 2
  fi
fi

export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$py" bench/gpu_check.py "$@"
