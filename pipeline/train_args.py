"""The train stage's command line as one typed value: `TrainArgs`, made from argparse's result in
`pipeline.train.main` before it reaches any other module (the run shell, the trainers, the loader, the demos).

The options, their defaults and help texts stay in `pipeline.train.build_parser` (the command line is the
contract); `from_namespace` refuses a parser option without a field here, so the two cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainArgs:
    """`python -m pipeline.train` options (see its ``--help``); URLs are local paths or s3://."""
    ds_config: str
    model_config: str
    data: str
    output: str
    val_data: str | None
    val_every: int
    """0: no validation."""
    pretransform_ckpt: str | None
    pretrained_ckpt: str | None
    allow_partial: bool
    max_steps: int
    batch_size: int | None
    """Micro batch per rank; None: the ds_config's."""
    num_workers: int
    cache_gb: float | None
    max_reject_fraction: float
    seed: int
    data_seed: int | None
    """None: ``seed``."""
    checkpoint_every: int
    keep_last: int | None
    log_every: int
    compile: bool
    scratch_dir: str | None
    rendezvous_timeout: float
    collective_timeout: float
    keep_scratch: bool
    lease_timeout: float
    wandb: str
    """"offline", "online" or "off"."""
    dry_run: bool
    debug: bool
    local_rank: int | None
    """The DeepSpeed launcher's ``--local_rank`` (read once by `distributed.env.detect`)."""

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(vars(ns)) - names)
        if extra:  # a programming error: a parser option was added without its field
            raise TypeError(f"TrainArgs has no field for the option(s) {extra}")
        return cls(**vars(ns))

    def record(self) -> dict:
        """The options as written to the ledger header, config file and W&B (``local_rank`` left out: it
        differs between ranks)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "local_rank"}
