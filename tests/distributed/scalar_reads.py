"""Run the train stage in this process and record every read of a tensor's value by the host.

    python tests/distributed/scalar_reads.py OUT.json <train.py arguments>

A `TorchDispatchMode` sees each `aten._local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)` and `if t:`
dispatch to; on a GPU each is a device-to-host sync) and records the Python stack that caused it. Not a test
module: `tests/test_train_syncs.py` runs it as a subprocess and classifies the stacks.
"""
import json
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pipeline.train import main  # noqa: E402


class ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.stacks: list[list[tuple[str, int, str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.stacks.append([(f.filename, f.lineno, f.name) for f in traceback.extract_stack()[:-1]])
        return func(*args, **(kwargs or {}))


if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    with ScalarReads() as reads:
        code = main(argv)
    with open(out, "w") as f:
        json.dump({"exit": code, "stacks": reads.stacks}, f)
    sys.exit(code)
