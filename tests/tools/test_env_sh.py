"""`source tools/env.sh` leaves the caller's shell options as they were, on success and on failure."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


STUB = """#!/bin/sh
# A python that answers env.sh's torch check and refuses anything else (above all, pip).
[ "$1 $2" = "-c import torch" ] && exit 0
echo "stub python refused: $*" >&2
exit 97
"""


def _stub_bin(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "python").write_text(STUB)
    (folder / "python").chmod(0o755)
    return folder


def _ready_venv(tmp_path: Path) -> Path:
    """A venv that env.sh takes as complete: a stub python and the stamp it expects (so it installs nothing)."""
    venv = tmp_path / "venv"
    _stub_bin(venv / "bin")
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    sources = b"".join((REPO / p).read_bytes() for p in ("setup.py", "tools/constraints.txt",
                                                         "tools/requirements-s3.txt"))
    (venv / ".cantus-installed").write_text(hashlib.sha256(sources).hexdigest()[:16] + "-test,demo\n")
    return venv


def _source(prelude: str, venv: Path) -> tuple[str, str, str, str]:
    """Shell options before and after `source tools/env.sh` in a bash started with ``prelude``, then the
    rest of its output and its stderr."""
    script = f"""{prelude}
set +o; shopt -p; echo ====
source tools/env.sh || echo "env.sh returned $?"
echo ====; set +o; shopt -p; echo ====
echo "python is $(command -v python)"
"""
    # No real python on PATH, only the stub: whatever goes wrong, this test installs nothing anywhere.
    stub = _stub_bin(venv.parent / "stub-bin")
    env = {"PATH": f"{stub}:/usr/bin:/bin", "HOME": str(venv.parent), "CANTUS_VENV": str(venv), "PYTHON": "false",
           "CANTUS_EXTRAS": "test,demo"}
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    before, during, after, rest = done.stdout.split("====\n")
    return before, after, during + rest, done.stderr


@pytest.mark.parametrize("prelude", ["set +euo pipefail; shopt -s extglob", "set -euo pipefail; set -o noclobber"])
def test_sourcing_env_sh_keeps_the_callers_shell_options(tmp_path, prelude):
    before, after, out, stderr = _source(prelude, _ready_venv(tmp_path))
    assert after == before and "errexit" in before and "refused" not in stderr
    assert out.strip() == f"python is {tmp_path / 'venv' / 'bin' / 'python'}"  # it did activate the venv


def test_a_failing_set_up_returns_1_without_ending_the_shell_or_changing_options(tmp_path):
    """PYTHON=false: creating the venv fails."""
    before, after, out, stderr = _source("set +euo pipefail", tmp_path / "missing-venv")
    assert after == before
    assert "env.sh returned 1" in out and "setting up" in stderr and "refused" not in stderr
