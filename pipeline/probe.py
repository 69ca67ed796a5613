"""Is it learning? ``python -m pipeline.probe --checkpoint ... --data <val manifest URL>``.

Two checks a user can trust (SAT issues #26, #50, #63, #137 ask "is it learning?"):

1. **Does the model use its prompts?** The validation loss at fixed t in {0.1, ..., 0.9} (SAT's
   validation timesteps), with fixed seeded noise, once with each clip's TRUE prompt and once with the
   prompts SHUFFLED across clips (same latents, same t, same noise: a paired comparison). A model that
   uses its conditioning has a lower loss with the true prompts. Reported: the mean of the per-clip
   difference (shuffled - true, averaged over t) and its standard error over clips; a difference above
   3 standard errors is evidence that the prompts are used. Only the content conditioners' inputs are
   shuffled (``--shuffle-keys``; by default every conditioner id except the timing ids); timing stays
   true, so the test asks about the prompt, not about the clip length.
2. **Does generated audio follow the prompt?** (the demo dataset, whose metadata carries ``key`` and
   ``instrument``): generate from the val prompts, then score the key (MIREX) and the instrument
   (nearest centroid fitted on the real clips of ``--reference DIR``) against the prompted ones, next to
   chance (the same audio against shuffled prompts) and two ceilings: the real clips against their own
   prompts, and the real clips passed through the model's VAE (generated audio comes out of that
   decoder too; the instrument classifier for generated audio is fitted on these). Prompts are taken in
   turn from each instrument (``--num-prompts``), each generated with ``--seeds-per-prompt`` seeds, so
   the report also says whether clips differ more between prompts than between seeds (the ratio of the
   two in timbre features, next to its no-effect value) and shows per-class confusion tables for the
   generated and the through-the-VAE clips. See `pipeline.report.scores`.

Prints a table and writes the numbers as JSON (``--out``). Exit code 0 whatever the verdict: the probe
reports, it does not judge a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from pipeline import manifest as mf
from pipeline import storage
from pipeline.cli import USER_ERRORS, report_error
from pipeline.config import ModelConfig
from pipeline.config_json import ConfigError
from pipeline.data.latents import derived_seed
from pipeline.data.shards import iter_samples, read_json
from pipeline.diffusion import Guidance, create_objective
from pipeline.models.conditioning import Conditioning
from pipeline.pretransform_identity import identity_differences, pretransform_identity
from pipeline.report import scores

logger = logging.getLogger(__name__)

TIMESTEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""SAT's validation timesteps (t = 1 is noise)."""
TIMING_IDS = ("seconds_start", "seconds_total")
EVIDENCE_Z = 3.0
"""A loss difference above this many standard errors counts as evidence that the prompts are used."""


# ------------------------------------------------------------------------------------ inputs


def load_checkpoint(spec: str, step: int | None, model_config: str | None, device: str
                    ) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """``--checkpoint``: a ledger URL (its newest entry, or ``step``) or a ``.safetensors`` file.
    Returns (model in eval mode on ``device``, config, a description with the VAE weights' hash)."""
    from pipeline.models.weights import PRETRANSFORM_PREFIX, strip_prefix, weights_sha256
    from pipeline.render_plan import Checkpoint, load_checkpoint_config, load_checkpoint_weights

    if spec.endswith(".json"):
        entry = mf.read_ledger(spec).at_step(step)
        checkpoint = Checkpoint(entry.tag, entry.export_url, entry.step, {"sha256": entry.export_sha256})
    elif spec.endswith(".safetensors"):
        if step is not None:
            raise ConfigError("--step selects an entry of a ledger; with a .safetensors file leave it out")
        checkpoint = Checkpoint(os.path.basename(spec), spec, None, {})
    else:
        raise ConfigError(f"--checkpoint {spec}: expected a ledger (<train out>/checkpoints/manifest.json) "
                          "or a .safetensors export")
    cfg = load_checkpoint_config(checkpoint, model_config)
    model, tensors = load_checkpoint_weights(checkpoint, cfg)
    vae = strip_prefix(tensors, PRETRANSFORM_PREFIX)
    about = {"url": checkpoint.url, "step": checkpoint.step, "model_config_sha256": cfg.sha256,
             "pretransform_weights_sha256": weights_sha256(vae) if vae else None}
    return model.to(device).eval().requires_grad_(False), cfg, about


@dataclasses.dataclass(frozen=True, slots=True)
class ValSet:
    """The first clips of a latent manifest, cut to the model's length from frame 0."""
    latents: list[torch.Tensor]
    """Per clip (2, C, T) ``mean`` and ``std`` (a VAE's latents) or (1, C, T) ``latents``, divided by the
    pretransform's scale; T at most the model's frames."""
    valid: list[int]
    """Per clip: frames that hold audio (the rest is padding, left out of the loss)."""
    metadata: list[dict]
    """Per clip: the shard JSON (prompt, timing, key, instrument, ...) plus ``__key__``."""


def read_val_set(url: str, cfg: ModelConfig, about: dict, limit: int, channels: int) -> tuple[ValSet, int]:
    """Read up to ``limit`` clips of the pre_encode manifest at ``url``, refusing latents made by another
    pretransform than the checkpoint's (the identity train checks). Returns the clips and the model's
    frames per clip (``sample_size`` in latent frames)."""
    data = mf.read_manifest(url)
    if data.stage != "pre_encode":
        raise ConfigError(f"--data {url}: a {data.stage!r} manifest; the probe reads latent shards (the output "
                          "of pipeline.pre_encode, e.g. <latents>/val/manifest.json)")
    props, pre = data.properties, cfg.model.pretransform
    if pre is not None:
        differ = identity_differences(props, pretransform_identity(pre.config, pre.scale,
                                                                   about["pretransform_weights_sha256"]))
        if differ:
            raise ConfigError(f"--data {url} was encoded by another pretransform than the checkpoint's "
                              f"(differs: {', '.join(differ)}); probe with latents of this model's VAE")
    ratio = props.get("downsampling_ratio") or (1 if pre is None else pre.autoencoder.downsampling_ratio)
    frames = cfg.sample_size // ratio
    scale = 1.0 if pre is None else pre.scale
    val = ValSet([], [], [])
    for shard in data.outputs:
        for key, members in iter_samples(shard["url"]):
            if "latents.safetensors" not in members:
                raise ConfigError(f"{shard['url']}: sample {key} has no .latents.safetensors (has {sorted(members)})")
            t = load_safetensors(members["latents.safetensors"])
            parts = torch.stack([t["mean"], t["std"]] if "mean" in t else [t["latents"]])
            parts = parts.float()[..., :frames] / scale  # SAT divides pre-encoded latents by the scale
            if parts.shape[1] != channels:
                raise ConfigError(f"{shard['url']}: sample {key} has {parts.shape[1]} latent channels, the "
                                  f"model's backbone takes {channels}")
            meta = read_json(members, shard["url"], key)
            val.latents.append(parts)
            val.valid.append(min(int(meta.get("valid_frames", parts.shape[-1])), parts.shape[-1]))
            val.metadata.append(dict(meta, __key__=key))
            if len(val.metadata) >= limit:
                return val, frames
    if not val.metadata:
        raise ConfigError(f"--data {url}: the manifest lists no sample")
    return val, frames


def shuffle_keys(cfg: ModelConfig, requested: list[str] | None) -> list[str]:
    """The metadata keys whose values are shuffled across clips: ``--shuffle-keys``, or the content
    conditioners' ids (and their ``default_keys`` fallbacks)."""
    if requested:
        return list(requested)
    cond = cfg.model.conditioning
    ids = [c.id for c in cond.configs if c.id not in TIMING_IDS]
    return ids + [cond.default_keys[i] for i in ids if i in cond.default_keys]


def derangement(values: list, seed: int) -> list[int]:
    """A seeded permutation ``p`` with ``p[i] != i`` that, where possible, gives every clip a partner
    whose ``values`` entry differs from its own (two clips with the same prompt teach nothing)."""
    n = len(values)
    if n < 2:
        raise ConfigError("the prompt test needs at least 2 clips")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    perm = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):  # one cycle through a random order: no fixed point
        perm[a] = b
    for i in range(n):
        if values[perm[i]] != values[i]:
            continue
        for j in range(n):  # swap partners with a clip j when both then get a different value
            if perm[j] != i and perm[i] != j and values[perm[j]] != values[i] and values[perm[i]] != values[j]:
                perm[i], perm[j] = perm[j], perm[i]
                break
    return perm


def shuffled_metadata(metadata: list[dict], keys: list[str], perm: list[int]) -> list[dict]:
    return [{**m, **{k: metadata[p][k] for k in keys if k in metadata[p]}} for m, p in zip(metadata, perm)]


# ------------------------------------------------------------------------------------ the loss test


def prompt_losses(model: torch.nn.Module, objective, val: ValSet, frames: int, metadata: list[dict],
                  seed: int, batch_size: int, device: str) -> np.ndarray:
    """(clips, len(TIMESTEPS)) validation MSE with ``metadata`` as the conditioning. The latent sample
    (``mean + std * e``), the noise and t depend only on the clip index and ``seed``, so two calls with
    different metadata are a paired comparison. Padding frames are left out of the loss."""
    out = np.zeros((len(metadata), len(TIMESTEPS)))
    for start in range(0, len(metadata), batch_size):
        idx = range(start, min(start + batch_size, len(metadata)))
        xs, noises, masks = [], [], []
        for i in idx:
            g = torch.Generator().manual_seed(derived_seed(seed, i))
            parts = val.latents[i]
            # A VAE latent is a draw (mean + std * e), as in training; seeded per clip like the noise.
            x = parts[0] + parts[1] * torch.randn(parts[0].shape, generator=g) if len(parts) == 2 else parts[0]
            x = torch.nn.functional.pad(x, (0, frames - x.shape[-1]))
            xs.append(x)
            noises.append(torch.randn((len(TIMESTEPS), *x.shape), generator=g))
            masks.append(torch.arange(frames) < val.valid[i])
        x, noise, mask = (torch.stack(v).to(device) for v in (xs, noises, masks))
        batch_meta = [metadata[i] for i in idx]
        with torch.no_grad():
            cond = (model.route(model.conditioner(batch_meta, device)) if model.conditioner is not None
                    else Conditioning())
            for j, t in enumerate(TIMESTEPS):
                t_vec = torch.full((len(idx),), t, device=device)
                result = objective.loss(lambda x_t, tt: model.predict(x_t, tt, cond, Guidance()), x, t_vec,
                                        noise[:, j], padding_mask=mask)
                out[start:start + len(idx), j] = result.per_sample.double().cpu().numpy()
    return out


def loss_report(true: np.ndarray, shuffled: np.ndarray | None, same_fraction: float | None, keys: list[str]) -> dict:
    report = {"timesteps": list(TIMESTEPS), "clips": int(true.shape[0]), "true_loss": _round(true.mean(0)),
              "mean_true_loss": float(true.mean())}
    if shuffled is None:
        report["note"] = "the model has no conditioner: only the validation loss is reported"
        return report
    diff = shuffled - true  # (clips, t)
    per_clip = diff.mean(axis=1)
    se = float(per_clip.std(ddof=1) / math.sqrt(len(per_clip)))
    mean = float(per_clip.mean())
    z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    report.update({
        "shuffled_keys": keys, "same_prompt_fraction": same_fraction,
        "shuffled_loss": _round(shuffled.mean(0)), "difference": _round(diff.mean(0)),
        "difference_se": _round(diff.std(0, ddof=1) / math.sqrt(len(diff))),
        "mean_shuffled_loss": float(shuffled.mean()), "mean_difference": mean, "mean_difference_se": se,
        "z": z, "uses_prompts": bool(z > EVIDENCE_Z),
    })
    return report


def _round(a: np.ndarray) -> list[float]:
    return [float(v) for v in a]


# ------------------------------------------------------------------------------------ the audio test


def audio_scores(model: torch.nn.Module, cfg: ModelConfig, val: ValSet, frames: int, args) -> dict:
    """Generate from the val prompts that carry ``key`` and ``instrument`` and score them
    (`pipeline.report.scores.prompt_following`); ``{"skipped": reason}`` when that cannot be done."""
    from pipeline.generate import generate, latent_unit
    if args.num_prompts <= 0:
        return {"skipped": "--num-prompts 0"}
    if getattr(model, "conditioner", None) is None:
        return {"skipped": "the model is unconditional: there is no prompt to follow"}
    usable = [i for i, m in enumerate(val.metadata) if m.get("key") is not None and m.get("instrument") is not None]
    if len(usable) < 2:
        return {"skipped": f"{len(usable)} of {len(val.metadata)} val clips carry 'key' and 'instrument' metadata "
                           "(the demo dataset's clips do); need at least 2"}
    chosen = choose_prompts([val.metadata[i] for i in usable], args.num_prompts)
    chosen = [usable[c] for c in chosen]
    # Each prompt S times with S seeds: seed-to-seed spread is what the between-prompt spread is judged by.
    clips = [(i, s) for i in chosen for s in range(args.seeds_per_prompt)]
    metas = [{k: v for k, v in val.metadata[i].items() if k != "__key__"} for i, _ in clips]
    demo = cfg.training.demo
    steps = args.steps or (demo.demo_steps if demo is not None else 100)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (
        demo.demo_cfg_scales[0] if demo is not None and demo.demo_cfg_scales else 6.0)
    unit = latent_unit(model)
    length = -(-frames // unit) * unit
    ratio = model.pretransform.downsampling_ratio if model.pretransform is not None else 1
    logger.info("generating %d clips (%d prompts x %d seeds, %d steps, cfg %g) for the audio scores", len(metas),
                len(chosen), args.seeds_per_prompt, steps, cfg_scale)
    audio = []
    for start in range(0, len(metas), args.batch_size):
        batch = metas[start:start + args.batch_size]
        out = generate(model, batch, [args.seed + start + k for k in range(len(batch))], steps=steps, length=length,
                       cfg_scale=cfg_scale, sampler=args.sampler, device=args.device)
        audio += [a.numpy() for a in out.audio]
    # Each clip is cut to the length of real audio in the val clip it takes its prompt from.
    generated = [scores.Clip(a[:, :val.valid[i] * ratio], cfg.sample_rate, m["key"], m["instrument"])
                 for a, (i, _), m in zip(audio, clips, metas)]
    perm = derangement([str(m.get("prompt")) for m in metas], args.seed + 1)
    shuffled = [scores.Clip(g.audio, g.sample_rate, metas[p]["key"], metas[p]["instrument"])
                for g, p in zip(generated, perm)]
    reference = scores.read_reference(args.reference, args.max_reference) if args.reference else None
    through_vae = None
    if reference and model.pretransform is not None:
        logger.info("passing %d reference clips through the VAE", len(reference))
        through_vae = through_pretransform(model.pretransform, reference, cfg, args.device, args.seed)
    result = scores.prompt_following(generated, shuffled, reference, through_vae,
                                     prompt_ids=[chosen.index(i) for i, _ in clips])
    result["settings"] = {"steps": steps, "cfg_scale": cfg_scale, "sampler": out.sampler, "length_frames": length,
                          "prompts": len(chosen), "seeds_per_prompt": args.seeds_per_prompt,
                          "reference": args.reference, "reference_clips": len(reference or [])}
    return result


def choose_prompts(metadata: list[dict], n: int) -> list[int]:
    """Indices of up to ``n`` clips with distinct prompts, taken in turn from each instrument (in order of
    first appearance), so the generated set covers as many instrument classes as the val set has."""
    by_instrument: dict[str, list[int]] = {}
    seen: set[str] = set()
    for i, m in enumerate(metadata):
        prompt = str(m.get("prompt"))
        if prompt not in seen:
            seen.add(prompt)
            by_instrument.setdefault(str(m["instrument"]), []).append(i)
    queues = list(by_instrument.values())
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def through_pretransform(pretransform, clips: list, cfg: ModelConfig, device: str, seed: int) -> list:
    """Real clips as the model's decoder renders them: at the model's rate and channels, encoded (a
    seeded posterior sample, what the diffusion model learns to produce) and decoded."""
    from pipeline.data import audio as audio_io
    from pipeline.models.pretransforms import AutoencoderPretransform
    ratio = pretransform.downsampling_ratio
    out = []
    for n, clip in enumerate(clips):
        audio = np.atleast_2d(clip.audio)
        audio = audio_io.set_channels(audio_io.resample(audio, clip.sample_rate, cfg.sample_rate), cfg.audio_channels)
        x = torch.from_numpy(np.ascontiguousarray(audio[:, :audio.shape[-1] // ratio * ratio]))[None].float().to(device)
        with torch.inference_mode():
            if isinstance(pretransform, AutoencoderPretransform):
                latents = pretransform.encode(x, generator=torch.Generator(device).manual_seed(seed + n))
            else:
                latents = pretransform.encode(x)
            decoded = pretransform.decode(latents).float().cpu()[0].numpy()
        out.append(dataclasses.replace(clip, audio=decoded, sample_rate=cfg.sample_rate))
    return out


# ------------------------------------------------------------------------------------ output


def format_table(result: dict) -> str:
    loss = result["loss"]
    lines = [f"checkpoint {result['checkpoint']['url']} (step {result['checkpoint']['step']}), "
             f"{loss['clips']} val clips from {result['data']}", ""]
    if "shuffled_loss" in loss:
        lines.append(f"{'t':>4} {'true':>9} {'shuffled':>9} {'diff':>9} {'se':>8}")
        for j, t in enumerate(loss["timesteps"]):
            lines.append(f"{t:4.1f} {loss['true_loss'][j]:9.5f} {loss['shuffled_loss'][j]:9.5f} "
                         f"{loss['difference'][j]:9.5f} {loss['difference_se'][j]:8.5f}")
        lines.append(f"mean {loss['mean_true_loss']:9.5f} {loss['mean_shuffled_loss']:9.5f} "
                     f"{loss['mean_difference']:9.5f} {loss['mean_difference_se']:8.5f}")
        verdict = ("the model USES its prompts" if loss["uses_prompts"] else
                   "no evidence that the model uses its prompts")
        lines.append(f"shuffled - true = {loss['mean_difference']:.5f} +- {loss['mean_difference_se']:.5f} "
                     f"(z = {loss['z']:.1f}, evidence above {EVIDENCE_Z:g}): {verdict}")
    else:
        lines.append(f"{'t':>4} {'loss':>9}")
        lines += [f"{t:4.1f} {v:9.5f}" for t, v in zip(loss["timesteps"], loss["true_loss"])]
        lines.append(loss["note"])
    lines += ["", scores.format_table(result["audio"])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train ledger URL (<out>/checkpoints/manifest.json) or a "
                   ".safetensors export")
    p.add_argument("--step", type=int, default=None, help="with a ledger: the checkpoint at this step (default newest)")
    p.add_argument("--data", required=True, help="validation latent manifest URL (pre_encode output)")
    p.add_argument("--model-config", default=None, help="model config for checkpoints without model_config metadata")
    p.add_argument("--reference", default=None, help="folder (or URL) of real clips with metadata.jsonl (path, key, "
                   "instrument): fits the instrument classifier and gives the ceiling")
    p.add_argument("--out", default=None, help="write the results as JSON here (path or URL)")
    p.add_argument("--num-clips", type=int, default=256, help="val clips for the loss test")
    p.add_argument("--shuffle-keys", nargs="*", default=None, help="metadata keys to shuffle (default: every "
                   "conditioner id except seconds_start/seconds_total)")
    p.add_argument("--num-prompts", type=int, default=8, help="distinct val prompts to generate from, taken in turn "
                                                             "from each instrument (0: skip the audio scores)")
    p.add_argument("--seeds-per-prompt", type=int, default=4, help="clips generated per prompt (seeds)")
    p.add_argument("--max-reference", type=int, default=400, help="real clips read from --reference")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: training.demo.demo_steps)")
    p.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: the first demo_cfg_scales)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the objective's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seeds the latent samples, noise, shuffles and generation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--debug", action="store_true", help="raise errors with a traceback")
    return p


def run(args) -> dict:
    started = time.time()
    model, cfg, about = load_checkpoint(args.checkpoint, args.step, args.model_config, args.device)
    val, frames = read_val_set(args.data, cfg, about, args.num_clips, model.io_channels)
    objective = create_objective(cfg.model.diffusion.diffusion_objective)
    true = prompt_losses(model, objective, val, frames, val.metadata, args.seed, args.batch_size, args.device)
    shuffled, same, keys = None, None, []
    if getattr(model, "conditioner", None) is not None:
        keys = shuffle_keys(cfg, args.shuffle_keys)
        values = [tuple(str(m.get(k)) for k in keys) for m in val.metadata]
        perm = derangement(values, args.seed)
        same = float(np.mean([values[p] == v for p, v in zip(perm, values)]))
        shuffled = prompt_losses(model, objective, val, frames, shuffled_metadata(val.metadata, keys, perm),
                                 args.seed, args.batch_size, args.device)
    result = {"checkpoint": about, "data": args.data, "seed": args.seed,
              "loss": loss_report(true, shuffled, same, keys)}
    result["audio"] = audio_scores(model, cfg, val, frames, args)
    result["seconds"] = round(time.time() - started, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s probe %(message)s")
    try:
        result = run(args)
        sys.stdout.write(format_table(result))
        if args.out:
            storage.write(args.out, (json.dumps(result, indent=1, allow_nan=True) + "\n").encode())
            logger.info("results -> %s", args.out)
    except USER_ERRORS as e:
        return report_error(e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
