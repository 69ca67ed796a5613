"""bench/gpu_suite.py --smoke: every table's code path runs on the CPU with tiny configs, so the suite that
measures the GPU goals cannot rot between GPU runs."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLES = ("(1) DiT training step", "(2) one CFG sampling call", "(3) fine-tuning step", "(4) VAE encoding",
          "(5) loader", "(6) precision under bf16 autocast")


def _suite(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_suite.py"), "--smoke", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_the_smoke_run_prints_every_table_with_every_cell_measured():
    out = _suite()
    for title in TABLES:
        assert title in out, out
    assert "skipped" not in out and "OOM" not in out, out
    assert "| compiled |" in out and "| ZeRO-3 |" in out and "| LayerNorm input dtype | {'float32':" in out, out
    assert "FAIL" not in out


def test_a_spent_budget_skips_cells_but_still_prints_every_table():
    out = _suite("--budget-s", "0")
    for title in TABLES:
        assert title in out, out
    assert out.count("skipped (budget)") >= 4 + 2 + 2 + 1 + 2, out
