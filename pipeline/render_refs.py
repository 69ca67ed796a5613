"""Real clips beside the generated ones on the render page (``render --reference DIR``).

For each prompt, the reference clips that match it best: most label fields equal (the fields the
prompt line and the clip's ``metadata.jsonl`` row both carry, e.g. ``instrument`` and ``key``), then
most caption words in common. Each is shown as the model's VAE renders it (encoded with a seeded
posterior sample and decoded, `pipeline.probe.through_pretransform`), the best any generated clip can
sound, so a listener compares like with like. Files: ``<out>/references/<prompt-id>/<n>.{flac,png,json}``.
"""
from __future__ import annotations

import logging
import re

import torch

from pipeline import storage
from pipeline.report.clips import clip_files
from pipeline.report.page import Reference

logger = logging.getLogger(__name__)

NOT_LABELS = frozenset({"path", "prompt", "id", "seconds_start", "seconds_total", "negative_prompt"})
"""Fields that are not labels to match on (captions are compared word by word instead)."""


def _words(text: object) -> set[str]:
    return set(re.findall(r"[a-z0-9#]+", str(text or "").lower()))


def match(prompt: dict, clip: dict) -> tuple[int, float]:
    """(label fields equal, caption word overlap as Jaccard index): larger is nearer."""
    labels = sum(str(prompt[k]).lower() == str(clip[k]).lower() for k in prompt if k not in NOT_LABELS and k in clip)
    a, b = _words(prompt.get("prompt")), _words(clip.get("prompt"))
    return labels, len(a & b) / len(a | b) if a | b else 0.0


def nearest(prompt: dict, clips: list[dict], n: int) -> list[int]:
    """Indices of the ``n`` clips nearest to ``prompt`` (ties: listing order)."""
    order = sorted(range(len(clips)), key=lambda i: tuple(-v for v in match(prompt, clips[i])) + (i,))
    return order[:n]


def write_references(output: str, prompts: dict[str, dict], reference: str, per_prompt: int, model, cfg,
                     device: str) -> list[Reference]:
    """Write each prompt's nearest reference clips (through ``model``'s pretransform when it has one)
    below ``<output>/references/`` and return them for the page."""
    from pipeline.data.audio import decode
    from pipeline.probe import through_pretransform
    from pipeline.report.scores import Clip, read_listing

    rows = read_listing(reference)
    through_vae = model.pretransform is not None
    out = []
    for prompt_id, metadata in prompts.items():
        for n, i in enumerate(nearest(metadata, rows, per_prompt)):
            row = rows[i]
            source = storage.join(reference, row["path"])
            audio, rate = decode(storage.read_bytes(source))
            clip = Clip(audio, rate, row.get("key"), row.get("instrument"))
            if through_vae:
                [clip] = through_pretransform(model.pretransform, [clip], cfg, device, seed=i)
            info = {"source": source, "labels": {k: v for k, v in row.items() if k != "path"},
                    "through_vae": through_vae, "match": list(match(metadata, row))}
            stem = f"references/{prompt_id}/{n}"
            for ext, data in clip_files(torch.as_tensor(clip.audio), clip.sample_rate, info).items():
                storage.write(storage.join(output, stem + ext), data)
            label = str(row.get("prompt", row["path"])) + (" (real, through the VAE)" if through_vae else " (real)")
            out.append(Reference(prompt_id, label, stem + ".flac", stem + ".png"))
    logger.info("%d reference clips for %d prompts from %s", len(out), len(prompts), reference)
    return out
