"""The driver's progress line: figures every few seconds in logs, ETA from samples when the plan has them."""
from __future__ import annotations

import logging

from pipeline.stage_driver import Progress


def test_progress_logs_batches_of_a_shard_before_the_shard_is_done_with_an_eta_from_samples(caplog):
    caplog.set_level(logging.INFO)
    progress = Progress(logging.getLogger("t"), "pre_encode task 0/1", total=2, every=0.0, total_samples=100)
    progress.update(items=0, samples=25, seconds=50.0)  # one batch of the first shard
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("pre_encode task 0/1 | items 0/2 | samples 25 | audio 50.0 s")
    assert "eta nan" not in line  # 25 of 100 samples: an ETA although no shard has finished


def test_progress_without_sample_counts_takes_its_eta_from_items(caplog):
    caplog.set_level(logging.INFO)
    progress = Progress(logging.getLogger("t"), "render task 0/1", total=4, every=0.0)
    progress.update(items=0, samples=3)
    assert caplog.records[-1].getMessage().endswith("eta nan s")
    progress.update(items=2, samples=2)
    assert "items 2/4" in caplog.records[-1].getMessage() and "eta nan" not in caplog.records[-1].getMessage()
