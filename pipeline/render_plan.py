"""Render's inputs made explicit: which checkpoints, which prompts, and the work items they make.

Kept apart from the CLI in `pipeline.render` so the stage file reads in one sitting. Everything here
is cheap: a checkpoint's model config is read from the safetensors header (the first bytes of the
file, also on S3), never from its weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile

import torch

from pipeline import manifest as mf
from pipeline import storage
from pipeline.config import DemoConfig, ModelConfig, load_model_config
from pipeline.config_json import ConfigError, sha256_of
from pipeline.diffusion import create_sampler
from pipeline.export_file import MODEL_CONFIG_KEY, embedded_config, read_export, read_metadata
from pipeline.generate import latent_length, latent_unit
from pipeline.models import create_model_from_config
from pipeline.models.weights import load_strict
from pipeline.report.page import check_name, clip_stem

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    name: str
    """Folder name under the output: the ledger tag, or the file name without ``.safetensors``."""
    url: str
    """The exported ``.safetensors``."""
    step: int | None
    identity: dict
    """``{"sha256", "ema"}`` from the ledger, else ``{"size", "etag"}`` of the file."""


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    id: str
    metadata: dict
    negative: dict | None
    """The metadata with ``prompt`` replaced by the line's ``negative_prompt``; None without one."""


def resolve_checkpoints(specs: list[str], steps: list[int] | None) -> list[Checkpoint]:
    """``--checkpoints``: one ledger URL, or ``.safetensors`` files."""
    if len(specs) == 1 and specs[0].endswith(".json"):
        ledger = mf.read_ledger(specs[0])
        entries = [ledger.at_step(s) for s in steps] if steps else list(ledger.checkpoints)
        if not entries:
            raise ConfigError(f"--checkpoints {specs[0]}: the ledger lists no checkpoint yet")
        return [Checkpoint(check_name(e.tag, f"{specs[0]}: checkpoint tag"), e.export_url, e.step,
                           {"sha256": e.export_sha256, "ema": e.ema}) for e in entries]
    if not all(s.endswith(".safetensors") for s in specs):
        raise ConfigError(f"--checkpoints {' '.join(specs)}: expected one ledger URL "
                          "(<train out>/checkpoints/manifest.json) or .safetensors files")
    if steps:
        raise ConfigError("--checkpoint-steps selects entries of a ledger; with .safetensors files list the files")
    out, seen = [], {}
    for url in specs:
        name = check_name(os.path.basename(url)[: -len(".safetensors")], f"--checkpoints {url}: file name")
        if name in seen:
            raise ConfigError(f"--checkpoints: {seen[name]} and {url} would both render into {name}/; rename one")
        seen[name] = url
        info = storage.stat(url)
        out.append(Checkpoint(name, url, None, {"size": info.size, "etag": info.etag}))
    return out


def load_checkpoint_config(checkpoint: Checkpoint, model_config: str | None) -> ModelConfig:
    """The checkpoint's embedded model config, or ``--model-config`` (which wins, with a warning when
    the checkpoint carries a different one)."""
    embedded = embedded_config(checkpoint.url, read_metadata(checkpoint.url))
    if model_config is not None:
        cfg = load_model_config(model_config)
        if embedded is not None and sha256_of(embedded) != cfg.sha256:
            logger.warning("%s carries a model config that differs from --model-config %s; using the latter",
                           checkpoint.url, model_config)
    elif embedded is not None:
        try:
            cfg = load_model_config(embedded)
        except ConfigError as e:
            raise ConfigError(f"{checkpoint.url} (embedded model_config): {str(e).removeprefix('<dict>: ')}") from None
    else:
        raise ConfigError(f"{checkpoint.url}: no '{MODEL_CONFIG_KEY}' in its safetensors metadata (an SAT or SAO "
                          "checkpoint?); pass its config with --model-config FILE")
    if cfg.model_type not in ("diffusion_cond", "diffusion_uncond"):
        raise ConfigError(f"{checkpoint.url}: model_type={cfg.model_type!r} cannot render; expected a diffusion model")
    return cfg


def load_checkpoint_weights(checkpoint: Checkpoint, cfg: ModelConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model built from ``cfg`` (on CPU) with the checkpoint's exported weights, strictly (every key
    must match), and those weights; an S3 file is downloaded to a temporary folder first."""
    with tempfile.TemporaryDirectory(prefix="cantus-checkpoint-") as tmp:
        tensors, _, _ = read_export(storage.local_path(checkpoint.url, tmp))
    model = create_model_from_config(cfg)
    try:  # names and shapes: one line naming the file
        load_strict(model, tensors, checkpoint.url, "the model config")
    except ValueError as e:
        raise ConfigError(f"{e} (wrong --model-config?)") from None
    return model, tensors


def read_prompts(url: str) -> list[Prompt]:
    prompts, ids = [], set()
    lines = storage.read_bytes(url).decode("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{url}:{n}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{url}:{n}: expected an object of conditioner metadata, got {record!r}")
        pid = check_name(str(record.pop("id", f"p{len(prompts):03d}")), f"{url}:{n}: id")
        if pid in ids:
            raise ConfigError(f"{url}:{n}: id {pid!r} is used twice; ids name output folders")
        ids.add(pid)
        negative = record.pop("negative_prompt", None)
        prompts.append(Prompt(pid, record, None if negative is None else {**record, "prompt": negative}))
    if not prompts:
        raise ConfigError(f"{url}: no prompts")
    return prompts


def _check_metadata(cfg: ModelConfig, prompts: list[Prompt], where: str) -> None:
    """Each conditioner must find its key (or its default key) in every prompt's metadata."""
    cond = cfg.model.conditioning
    if cond is None:
        return
    for c in cond.configs:
        for p in prompts:
            fallback = cond.default_keys.get(c.id)
            if c.id not in p.metadata and (fallback is None or fallback not in p.metadata):
                raise ConfigError(f"prompt {p.id!r}: no {c.id!r} for the model's {c.type!r} conditioner ({where}); "
                                  f"add \"{c.id}\" to that line of --prompts")


def plan_items(checkpoints: list[Checkpoint], configs: dict[str, ModelConfig], prompts: list[Prompt], *,
               cfg_scales: list[float] | None, seeds: list[int], steps: int | None, sampler: str | None,
               seconds: float | None) -> list[dict]:
    """One item per checkpoint x prompt x CFG x seed, each carrying all it needs to be rendered alone."""
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps={steps}: expected at least 1")
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"--seconds={seconds}: expected a positive number")
    items = []
    for ck_index, ck in enumerate(checkpoints):
        cfg = configs[ck.name]
        _check_metadata(cfg, prompts, ck.url)
        with torch.device("meta"):  # shapes only: the latent unit and channels, no weights
            model = create_model_from_config(cfg)
        demo = cfg.training.demo or DemoConfig()
        chosen = create_sampler(sampler or cfg.training.cantus.demo_sampler, model.diffusion_objective,
                                key="--sampler").name
        ratio = cfg.downsampling_ratio
        length = (latent_length(seconds, cfg.sample_rate, ratio, latent_unit(model)) if seconds is not None
                  else cfg.sample_size // ratio)
        # An unconditional model has nothing to guide: one column at CFG 1.
        scales = [1.0] if cfg.model_type == "diffusion_uncond" else [float(s) for s in (cfg_scales or demo.demo_cfg_scales)]
        for p_index, p in enumerate(prompts):
            for scale in scales:
                for seed in seeds:
                    items.append({
                        "id": f"{ck.name}/{clip_stem(p.id, scale, seed)}", "checkpoint": ck.name,
                        "checkpoint_url": ck.url, "step": ck.step, "checkpoint_identity": ck.identity,
                        "model_config_sha256": cfg.sha256, "prompt_id": p.id, "metadata": p.metadata,
                        "negative_metadata": p.negative, "cfg": scale, "seed": int(seed), "sampler": chosen,
                        "steps": steps or demo.demo_steps, "length": length, "sample_rate": cfg.sample_rate,
                        "seconds": length * ratio / cfg.sample_rate,
                        "order": [p_index, ck_index]})  # the page's row and column group, as given
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("--cfg-scales/--seeds: repeated values give the same output twice; list each once")
    return items
