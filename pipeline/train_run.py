"""The shell both trainers share (`train.py`'s `train_diffusion`, `train_autoencoder.py`): everything about a
training run that is not its model or its step.

`TrainRun` owns the output folder: the resume from the ledger's newest checkpoint, the header, config and
metrics files, W&B, the stop flag, when to save, the log line and the exit code. `MetricsWindow` sums a log
window's losses on the device; they are read at log steps only. `run_leased` holds the output's lease around
a trainer and turns storage errors into exit codes; `remove_scratch` deletes the scratch folder after a
finished run. Each trainer builds its own model and writes out its own loop with these.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys
import time
from typing import Callable, Iterator

import torch

from pipeline import lease, manifest, storage
from pipeline.cli import EXIT_USER_ERROR
from pipeline.config import ModelConfig
from pipeline.distributed import checkpoint, collectives, env
from pipeline.distributed.engine import BatchLayout
from pipeline.distributed.ledger import RunOutputs, save_and_publish
from pipeline.distributed.stop import EXIT_STOPPED, StopFlag, request_stop
from pipeline.train_args import TrainArgs

logger = logging.getLogger("pipeline.train")


def scratch_dir(args: TrainArgs) -> str:
    """`--scratch-dir`, or a folder named after the output under $TMPDIR (local disk: staged checkpoints, shards)."""
    name = "cantus-" + os.path.basename(args.output.rstrip("/"))
    return args.scratch_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), name)


SCRATCH_ENTRIES = ("rank-*", "shards", "weights", "ema-consolidate", "wandb-demos", "export-*.safetensors",
                   "metrics.jsonl")
"""Everything the train stage writes under its scratch folder, except W&B's offline run (`wandb/`, kept for
`wandb sync`). A finished run deletes these and then the folder if it is empty; a test checks that nothing is
left, so a new entry must be added here."""


def remove_scratch(scratch: str) -> None:
    """After a finished run (every rank past the last barrier; one call per node): delete the scratch folder."""
    for pattern in SCRATCH_ENTRIES:
        for path in glob.glob(os.path.join(glob.escape(scratch), pattern)):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(scratch)  # only if empty: a --scratch-dir the user shares with other files stays
    if os.path.isdir(scratch):
        logger.info("scratch %s kept: it holds files that are not the train stage's (W&B offline runs in wandb/)",
                    scratch)
    else:
        logger.info("scratch %s removed (--keep-scratch keeps it)", scratch)


def drop_staged(outputs: RunOutputs) -> None:
    """Remove this rank's staged checkpoint folders (an S3 output's local copies): after a resume has loaded
    one, nothing staged is needed any more, and a save that failed half-way leaves nothing behind."""
    if outputs.staged and os.path.isdir(outputs.local_root):
        shutil.rmtree(outputs.local_root)


@contextlib.contextmanager
def output_lease(args: TrainArgs, denv: env.DistEnv) -> Iterator[lease.Lease | None]:
    """Collective: rank 0 holds `<out>/_lease.json` (pipeline/lease.py) for the run; when it cannot, every rank
    raises the same error. The heartbeat's failure asks the loop to stop (with a checkpoint, or without one when
    another trainer took the output over). Released at the end, unless the store is unavailable (releasing would
    wait out the stall limit again; a requeue of this job takes its own lease over at once)."""
    held, error = None, None
    if denv.rank == 0:
        job = env.job_identity()
        try:
            held = lease.acquire(args.output, lease.Holder.this_process(job.job_id, job.restart_count),
                                 args.lease_timeout)
        except (lease.LeaseError, storage.StorageError) as e:
            error = e
    error = collectives.broadcast_from_main(error)  # our own ranks: an exception object from rank 0
    if error is not None:
        raise error
    if held is None:
        yield None
        return

    def release() -> None:
        try:
            held.release()
        except storage.StorageError as e:
            logger.warning("%s: not released (%s); it turns stale after --lease-timeout %g s", held.url, e,
                           held.timeout)

    held.start_heartbeat(lambda message, lost: request_stop(message, save=not lost))
    try:
        yield held
    except storage.StorageUnavailable:
        held.stop_heartbeat()
        raise
    except BaseException:
        release()
        raise
    release()


def exit_code_for(error: BaseException) -> int:
    """Train's exit code for a storage or lease error, after one line on stderr: 75 (requeue, then resume) for a
    temporary storage failure, 2 for a permanent one, a held or unreadable lease."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    # A DataLoader worker's error arrives with the worker's traceback in its message: keep the last line.
    last = last.split(f"{type(error).__name__}: ", 1)[-1]
    temporary = isinstance(error, storage.StorageUnavailable)
    sys.stderr.write(f"error: {last}\n" + ("exiting with 75: a requeue resumes from the last checkpoint\n"
                                           if temporary else ""))
    return EXIT_STOPPED if temporary else EXIT_USER_ERROR


def run_leased(train: Callable[[], int], args: TrainArgs, denv: env.DistEnv) -> int:
    """Run `train()` holding the output's lease; its exit code, or 75/2 for a storage or lease error. A finished
    run (code 0) deletes its scratch folder unless `--keep-scratch`."""
    try:
        with output_lease(args, denv):
            code = train()
    except (lease.LeaseError, storage.StorageError) as e:
        return exit_code_for(e)  # 75 for a temporary storage failure (requeue), else 2
    if code == 0 and not args.keep_scratch and denv.local_rank == 0:
        remove_scratch(scratch_dir(args))
    return code


class MetricsWindow:
    """The sums over one log window (the optimizer steps since the last log line). Tensor values are added on
    the device (float64: the same sum as Python floats) and read only by `means`, at a log step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps = 0
        """Optimizer steps in the window."""
        self.data_wait = 0.0
        """Seconds spent waiting for batches."""
        self.start = time.perf_counter()

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Add one value (a tensor without reading it) to the sum `name`."""
        if isinstance(value, torch.Tensor):
            if name not in self.sums:
                self.sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            self.sums[name] += value.detach()
        else:
            self.sums[name] = self.sums.get(name, 0.0) + value

    def means(self, count: int) -> dict[str, float]:
        """Collective: each sum divided by `count`, averaged over ranks (`loss` first, then by name)."""
        names = sorted(self.sums, key=lambda k: (k != "loss", k))
        return {k: collectives.mean_over_ranks(float(self.sums[k]) / count, self.device) for k in names}

    def rates(self, engine, layout: BatchLayout, epoch: int) -> dict:
        """The fields of a log record after the losses: learning rate, gradient norm (NaN when DeepSpeed reports
        none), samples/s over the window, the fraction of it spent waiting for data, and the data epoch."""
        elapsed = time.perf_counter() - self.start
        norm = engine.get_global_grad_norm()
        return {"lr": engine.get_lr()[0], "grad_norm": float(norm) if norm is not None else float("nan"),
                "samples_per_s": layout.global_batch * self.steps / elapsed,
                "data_wait": self.data_wait / elapsed, "epoch": epoch}


def start_wandb(args: TrainArgs, cfg: ModelConfig, denv: env.DistEnv, scratch: str):
    """A W&B run on rank 0 (offline by default: no network needed; `wandb sync` later), or None."""
    if args.wandb == "off" or denv.rank != 0:
        return None
    import wandb

    os.makedirs(scratch, exist_ok=True)
    return wandb.init(mode=args.wandb, dir=scratch, project="cantus", name=os.path.basename(args.output.rstrip("/")),
                      config={"model_config": cfg.raw, "model_config_sha256": cfg.sha256,
                              "args": args.record()})


class TrainRun:
    """One training run's output folder and control: create it, then `resume`, `start`, and in the loop
    `should_stop`, `log`, `should_save`/`save`; `close` in a `finally`, and return `exit_code()`."""

    def __init__(self, args: TrainArgs, cfg: ModelConfig, ds_config: dict, denv: env.DistEnv, scratch: str):
        self.args, self.cfg, self.ds_config, self.denv, self.scratch = args, cfg, ds_config, denv, scratch
        self.outputs = RunOutputs(out=args.output, scratch=scratch, rank=denv.rank, world_size=denv.world_size)
        drop_staged(self.outputs)  # what a save that failed half-way left
        self.header = {"args": args.record(),
                       "input": manifest.input_ref(args.data), "properties": {"model_config_sha256": cfg.sha256}}
        self.step = 0
        """The step the run resumed at (0 for a new run)."""
        self.stopped = False
        self.stop: StopFlag | None = None
        self.wandb = None
        self.bar = None

    def resume(self, engine, *, generators: dict, ema) -> tuple[checkpoint.ResumeState, dict] | None:
        """Collective: load the ledger's newest checkpoint into engine, generators and EMA; its resume state and
        this rank's extra tensors, or None when the output holds no checkpoint yet."""
        ledger = self.outputs.read_ledger()
        if ledger is None or not ledger.checkpoints:
            return None
        entry = ledger.at_step()
        self.outputs.fetch(entry)
        resumed, extra = checkpoint.load(engine, local_root=self.outputs.local_root, tag=entry.tag,
                                         rank=self.denv.rank, world_size=self.denv.world_size,
                                         config_sha256=self.cfg.sha256, generators=generators, ema=ema)
        self.step = resumed.step
        drop_staged(self.outputs)
        logger.info("resumed from %s at step %d", entry.checkpoint_url, self.step)
        return resumed, extra

    def start(self) -> None:
        """After the resume: the config and metrics files (rank 0), W&B, and the stop flag."""
        if self.denv.rank == 0:
            self.outputs.write_config(self.cfg.raw, self.cfg.sha256,
                                      {"ds_config": self.ds_config, "args": self.header["args"]})
            self.outputs.restart_metrics(self.step)
        self.wandb = start_wandb(self.args, self.cfg, self.denv, self.scratch)
        self.stop = StopFlag()
        if self.denv.rank == 0 and sys.stderr.isatty():  # a bar on a terminal; SLURM logs get the log lines
            from tqdm import tqdm
            self.bar = tqdm(total=self.args.max_steps, initial=self.step, unit="step", dynamic_ncols=True)

    def tick(self, step: int) -> None:
        """One optimizer step done (host-side only: the bar, when there is one)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def should_stop(self, device: torch.device) -> bool:
        """Collective (the flag is all-reduced: a host sync): whether a stop signal reached any rank."""
        self.stopped = self.stop.should_stop(device)
        return self.stopped

    def should_save(self, step: int, stopped: bool) -> bool:
        a = self.args
        return self.stop.may_save and (step % a.checkpoint_every == 0 or stopped or step == a.max_steps)

    def save(self, engine, step: int, *, client: dict, generators: dict, ema, export_tensors,
             extra: dict | None = None) -> None:
        """Collective: checkpoint, export, metrics file and ledger entry for `step`."""
        save_and_publish(self.outputs, engine, step=step, client=client, config_sha256=self.cfg.sha256,
                         generators=generators, ema=ema, export_tensors=export_tensors, model_config=self.cfg.raw,
                         ledger_header=self.header, keep_last=self.args.keep_last, extra=extra)

    def log(self, record: dict, line: str, *values) -> None:
        """Rank 0: the record into the metrics file and W&B, and `line % values` into the log."""
        if self.denv.rank == 0:
            self.outputs.log_metrics(record)
            logger.info(line, *values)
            if self.wandb is not None:
                self.wandb.log(record, step=record["step"])

    def log_stop(self, step: int) -> None:
        logger.warning("stop (%s): %s step %d of %d, exiting with %d", self.stop.reason,
                       "saved" if self.stop.may_save else "did not save", step, self.args.max_steps, EXIT_STOPPED)

    def close(self) -> None:
        """Restore the signal handlers, close the bar and finish W&B (also after an error)."""
        if self.bar is not None:
            self.bar.close()
        if self.stop is not None:
            self.stop.restore()
        if self.wandb is not None:
            self.wandb.finish()

    def exit_code(self, step: int) -> int:
        """Collective (every rank waits for the last save): 75 when a stop signal ended the run before
        --max-steps, else 0."""
        logger.info("done: ledger %s", self.outputs.ledger)
        collectives.barrier()
        return EXIT_STOPPED if self.stopped and step < self.args.max_steps else 0
