#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest -q tests "$@"
