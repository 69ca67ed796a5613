"""Training demos: every `training.demo.demo_every` steps the EMA model renders `demo_cond` x `demo_cfg_scales`.

    <out>/demos/step-<n>/<prompt-id>/cfg<scale>-seed<s>.{flac,png,json}
    <out>/demos/index.json   every step so far (rank 0 rewrites it; a resume drops the steps it redoes)
    <out>/demos/index.html   rows = demo prompts, columns = step x CFG (`pipeline.report.page`, as render)

Each clip is made by `pipeline.generate.generate` (the one generation path, also render's), so a demo equals
render's output for the exported EMA weights with the same seed, CFG, sampler and steps. Demo `i` uses seed
`training.cantus.demo_seed + i` at every CFG scale.

Unlike SAT's rank-zero demo callback (whose other ranks wait at the next collective, and which would hang
under ZeRO-3), the work is split: demo `i` is rendered by rank `i % world`, every rank calls `generate` once
per CFG scale (a rank without a demo renders a dummy copy of demo 0 and discards it), so under ZeRO-3 every
rank runs the same number of forward passes and the parameter all-gathers match. Each rank writes its own
files; rank 0 writes the index after a barrier.

EMA weights: the engine's module runs with the EMA values swapped into its (ZeRO) parameters and the trained
values put back afterwards (`pipeline.distributed.ema_swap`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import torch

from pipeline import storage
from pipeline.config import ModelConfig
from pipeline.config_json import ConfigError
from pipeline.diffusion import create_sampler
from pipeline.distributed import collectives
from pipeline.distributed.ema import ShardedEMA
from pipeline.distributed.ema_swap import ema_swapped_in
from pipeline.generate import generate
from pipeline.report.clips import clip_files
from pipeline.report.page import Clip, clip_stem, prompt_header, render_page

logger = logging.getLogger(__name__)

INDEX_FORMAT = "cantus-demo-index/1"
BITS = 24
"""Demo FLACs are 24-bit: with the peak recorded in the JSON they hold the model's output to ~1e-7 of its peak,
so a demo can be checked against `generate` (tests) and quiet early outputs keep their detail."""


def ema_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the EMA averages: the trainable backbone (`model.*`), not the conditioners, as in SAT."""
    return [(n, p) for n, p in module.named_parameters() if n.startswith("model.") and p.requires_grad]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DemoItem:
    index: int
    prompt_id: str
    metadata: dict
    seed: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DemoPlan:
    every: int
    """Steps between demos (`training.demo.demo_every`)."""
    steps: int
    """Sampler steps (`training.demo.demo_steps`)."""
    sampler: str
    cfg_scales: tuple[float, ...]
    """1.0 only for an unconditional model (nothing to guide)."""
    length: int
    """Latent frames (`sample_size // downsampling_ratio`, as render's default)."""
    sample_rate: int
    seconds: float
    items: tuple[DemoItem, ...]

    def mine(self, rank: int, world_size: int) -> list[DemoItem]:
        return [it for it in self.items if it.index % world_size == rank]

    def stem(self, step: int, item: DemoItem, cfg_scale: float) -> str:
        """Path of a clip below `<out>/demos/`, without extension."""
        return f"step-{step}/{clip_stem(item.prompt_id, cfg_scale, item.seed)}"


def plan_demos(cfg: ModelConfig, objective: str) -> DemoPlan | None:
    """The demo plan of `training.demo`, None without one. Checked at start (also by --dry-run)."""
    demo = cfg.training.demo
    if demo is None:
        return None
    sampler = create_sampler(cfg.training.cantus.demo_sampler, objective, key="training.cantus.demo_sampler").name
    seed = cfg.training.cantus.demo_seed
    if cfg.model_type == "diffusion_uncond":
        metadata, scales = [{} for _ in range(demo.num_demos)], (1.0,)
    else:
        if not demo.demo_cond:
            raise ConfigError("training.demo.demo_cond is empty, but a conditioned model needs one metadata object "
                              "per demo (e.g. {\"prompt\": ..., \"seconds_start\": 0, \"seconds_total\": 10})")
        metadata, scales = [dict(m) for m in demo.demo_cond], tuple(float(s) for s in demo.demo_cfg_scales)
    length = cfg.sample_size // cfg.downsampling_ratio
    items = tuple(DemoItem(index=i, prompt_id=f"demo-{i:02d}", metadata=m, seed=seed + i) for i, m in enumerate(metadata))
    return DemoPlan(every=demo.demo_every, steps=demo.demo_steps, sampler=sampler, cfg_scales=scales, length=length,
                    sample_rate=cfg.sample_rate, seconds=length * cfg.downsampling_ratio / cfg.sample_rate, items=items)


@contextlib.contextmanager
def ema_weights(module: torch.nn.Module, ema: ShardedEMA | None):
    """Collective: inside the block `module` runs with the EMA weights (`ema` None: unchanged); on exit the
    trained weights are back, bit for bit. Every rank must enter, with the same module."""
    if ema is None:
        yield module
        return
    with ema_swapped_in(ema_parameters(module), ema):
        yield module


@contextlib.contextmanager
def _with_pretransform(module: torch.nn.Module, pretransform: torch.nn.Module | None):
    """The train stage keeps the frozen VAE out of the engine; `generate` decodes through `model.pretransform`."""
    kept = module.pretransform
    module.pretransform = pretransform
    try:
        yield module
    finally:
        module.pretransform = kept


# ------------------------------------------------------------------------------------------------ demos


@dataclasses.dataclass(kw_only=True)
class DemoRenderer:
    plan: DemoPlan
    module: torch.nn.Module
    """The engine's module (partitioned under ZeRO-3)."""
    pretransform: torch.nn.Module | None
    ema: ShardedEMA | None
    out: str
    """The run's output URL; demos go to `<out>/demos/`."""
    device: torch.device
    dtype: torch.dtype
    """The network's compute dtype (the engine's precision)."""
    rank: int = 0
    world_size: int = 1
    scratch: str = ""
    """Local folder for W&B's copies of the files."""
    wandb_run: object = None

    @property
    def root(self) -> str:
        return storage.join(self.out, "demos")

    def render(self, step: int) -> None:
        """Collective: render this rank's demos at `step`, then (rank 0) the index and W&B."""
        mine = self.plan.mine(self.rank, self.world_size)
        batch = mine or [self.plan.items[0]]  # a dummy keeps the forward count equal on every rank (ZeRO-3)
        fork = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork), ema_weights(self.module, self.ema), \
                _with_pretransform(self.module, self.pretransform):
            for scale in self.plan.cfg_scales:
                out = generate(self.module, [it.metadata for it in batch], [it.seed for it in batch],
                               steps=self.plan.steps, length=self.plan.length, cfg_scale=scale,
                               sampler=self.plan.sampler, device=self.device, dtype=self.dtype)
                for item, audio in zip(mine, out.audio):
                    self._write(step, item, scale, audio)
        collectives.barrier()  # every rank's files exist before the index links them
        if self.rank == 0:
            page = self._write_index(step)
            logger.info("step %d | demos: %d clips (%s, %d steps, %s weights) -> %s", step,
                        len(self.plan.items) * len(self.plan.cfg_scales), self.plan.sampler, self.plan.steps,
                        "EMA" if self.ema is not None else "raw", page)
            if self.wandb_run is not None:
                self._log_wandb(step)

    def _write(self, step: int, item: DemoItem, scale: float, audio: torch.Tensor) -> None:
        info = {"prompt_id": item.prompt_id, "metadata": item.metadata, "prompt": item.metadata.get("prompt"),
                "seed": item.seed, "cfg": scale, "sampler": self.plan.sampler, "steps": self.plan.steps,
                "length": self.plan.length, "seconds": self.plan.seconds, "sample_rate": self.plan.sample_rate,
                "step": step, "rank": self.rank, "weights": "ema" if self.ema is not None else "raw",
                "peak": float(audio.abs().max()), "bits": BITS}
        stem = storage.join(self.root, self.plan.stem(step, item, scale))
        for ext, data in clip_files(audio, self.plan.sample_rate, info, bits=BITS).items():  # JSON last
            storage.write(stem + ext, data)

    def clips(self, step: int) -> list[dict]:
        out = []
        for item in self.plan.items:
            meta = item.metadata
            text = prompt_header(meta, f"unconditional sample {item.index}", self.plan.seconds)
            for scale in self.plan.cfg_scales:
                stem = self.plan.stem(step, item, scale)
                out.append(dataclasses.asdict(Clip(
                    column=f"step {step}", prompt_id=item.prompt_id, prompt=text, cfg_scale=scale, seed=item.seed,
                    audio_href=stem + ".flac", image_href=stem + ".png",
                    details=f"{self.plan.sampler}, {self.plan.steps} steps, {self.plan.seconds:.2f} s")))
        return out

    def _write_index(self, step: int) -> str:
        """Rank 0: `index.json` with the steps before this one plus this one, then `index.html`."""
        url = storage.join(self.root, "index.json")
        steps = []
        if storage.exists(url):
            index = json.loads(storage.read_bytes(url))
            if index.get("format") != INDEX_FORMAT:
                raise ValueError(f"{url}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
            steps = [s for s in index["steps"] if s["step"] < step]  # later ones belong to a run we resumed over
        steps.append({"step": step, "clips": self.clips(step)})
        storage.write(url, json.dumps({"format": INDEX_FORMAT, "steps": steps}, indent=1).encode())
        clips = [Clip(**c) for s in steps for c in s["clips"]]
        weights = "EMA weights" if self.ema is not None else "raw weights (use_ema false)"
        notes = [f"Training demos, {weights}: {self.plan.sampler} sampler, {self.plan.steps} steps, "
                 f"{self.plan.seconds:.2f} s, {len(steps)} steps so far (newest {step})."]
        page = storage.join(self.root, "index.html")
        storage.write(page, render_page("Cantus training demos", clips, notes).encode())
        return page

    def _log_wandb(self, step: int) -> None:
        """Rank 0: every clip of this step as W&B audio and image (read back: other ranks wrote theirs)."""
        import wandb

        folder = os.path.join(self.scratch, "wandb-demos", f"step-{step}")
        logged = {}
        for item in self.plan.items:
            for scale in self.plan.cfg_scales:
                stem = self.plan.stem(step, item, scale)
                local = os.path.join(folder, stem.replace("/", "__"))
                os.makedirs(folder, exist_ok=True)
                for ext in (".flac", ".png"):
                    storage.download(storage.join(self.root, stem + ext), local + ext)
                key = f"demo/{item.prompt_id}/cfg{scale:g}"
                caption = str(item.metadata.get("prompt", item.prompt_id))
                logged[key] = wandb.Audio(local + ".flac", sample_rate=self.plan.sample_rate, caption=caption)
                logged[key + "/mel"] = wandb.Image(local + ".png", caption=caption)
        self.wandb_run.log(logged, step=step)
