#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 and install fpsa-jax into it (editable).
#   scripts/setup.sh            runtime only (enough for `python -m infer`)
#   scripts/setup.sh test       runtime + test dependencies
#   scripts/setup.sh gpu        runtime + CUDA 13 plugin, jax-triton, triton
# Re-running is cheap: an existing .venv is reused and pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # Prefer 3.12, the version of the GPU image, then any newer one.
  local candidates=()
  [[ -n "${FPSA_PYTHON:-}" ]] && candidates+=("$FPSA_PYTHON")
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && root=$(pyenv root)
  candidates+=(python3.12 $(ls -d "$root"/versions/3.12*/bin/python3 2>/dev/null | sort -rV))
  candidates+=(python3 python3.13 $(ls -d "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V))
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  PY=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (tried python3.1x, pyenv); set FPSA_PYTHON" >&2; exit 1; }
  echo "setup.sh: creating .venv with $PY ($("$PY" --version))"
  rm -rf .venv
  "$PY" -m venv .venv
fi

extras=""
[[ $# -gt 0 ]] && extras="[$(IFS=,; echo "$*")]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup.sh: ready (.venv/bin/python, extras: ${extras:-none})"
