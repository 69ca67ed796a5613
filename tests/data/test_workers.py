"""DataLoader workers die with the stage that started them, even when it is killed with SIGKILL."""
import os
import signal
import subprocess
import sys
import time

import proctree  # tests/proctree.py (conftest.py puts tests/ on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import os, sys, time, torch
from pipeline.data.workers import die_with_parent

class Stuck(torch.utils.data.Dataset):  # a worker blocked in a read that never returns
    def __len__(self):
        return 8
    def __getitem__(self, i):
        open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
        time.sleep(3600)

init = die_with_parent(os.getpid()) if sys.argv[2] == "pdeathsig" else None
for _ in torch.utils.data.DataLoader(Stuck(), num_workers=2, worker_init_fn=init):
    pass
"""


def _start_and_kill(tmp_path, mode: str) -> list[int]:
    """Run the script, wait until both workers are stuck, SIGKILL the parent; return the workers' pids."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path), mode], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.monotonic() + 120
    while len(os.listdir(tmp_path)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "workers never started"
        time.sleep(0.1)
    workers = proctree.descendants(proc.pid)
    assert sorted(workers) == sorted(int(n) for n in os.listdir(tmp_path))
    proc.kill()
    proc.wait()
    return workers


def test_workers_are_killed_with_their_parent(tmp_path):
    proctree.assert_all_exit(_start_and_kill(tmp_path, "pdeathsig"), timeout=20)


def test_without_it_a_stuck_worker_outlives_a_killed_parent(tmp_path):
    """The control: what the stages did before, and why the test above can fail."""
    workers = _start_and_kill(tmp_path, "none")
    try:
        time.sleep(3)
        assert all(proctree.alive(p) for p in workers)
    finally:
        for p in workers:
            if proctree.alive(p):
                os.kill(p, signal.SIGKILL)
        proctree.assert_all_exit(workers)
