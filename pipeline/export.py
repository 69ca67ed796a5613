"""Export a trained model as one `.safetensors` in SAT's unwrapped layout, the model config in its metadata.

    python -m pipeline.export --checkpoint <ledger URL [--step N] | checkpoint folder | .safetensors> --out FILE
        [--model-config FILE] [--no-ema]

The train stage already writes `<tag>/ema.safetensors` at every checkpoint; this command picks one (from the
ledger, by step), checks its sha256 against the ledger, checks that its tensor names are exactly the model's,
and writes it to `--out`. `--no-ema` exports the raw (non-averaged) weights: DeepSpeed's fp32 consolidation
of the checkpoint's ZeRO partitions, with the frozen tensors (`pretransform.*`) taken from the export.
DeepSpeed's partition files are unpickled weights-only (`pipeline.distributed.safe_load`); the embedded model
config is validated like any config before the model is built. A problem with the input is one line naming
it and exit code 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

from pipeline import manifest, storage
from pipeline.cli import USER_ERRORS, report_error
from pipeline.config import load_model_config
from pipeline.config_json import ConfigError, read_json
from pipeline.distributed.checkpoint import fetch, zero_fp32_state_dict
from pipeline.export_file import MODEL_CONFIG_KEY, read_export, write_export
from pipeline.models.weights import check_layout as check_tensor_layout

logger = logging.getLogger("pipeline.export")

EXPORT_NAME = "ema.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ledger URL (<out>/checkpoints/manifest.json), a "
                                                       "checkpoint folder (<out>/checkpoints/<tag>) or a .safetensors")
    p.add_argument("--step", type=int, default=None, help="with a ledger: the checkpoint at this step (default newest)")
    p.add_argument("--out", required=True, help="the .safetensors to write (local path or s3://)")
    p.add_argument("--model-config", default=None, help="model config JSON, for files that carry none (replaces "
                                                        "the embedded one)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _raw_weights(tag_url: str, work: str) -> dict[str, torch.Tensor]:
    """fp32 weights consolidated from the DeepSpeed checkpoint's ZeRO partitions (ZeRO 1-3)."""
    folder = tag_url
    if storage.is_s3(tag_url):
        folder = os.path.join(work, "ckpt", os.path.basename(tag_url.rstrip("/")))
        fetch(tag_url, folder)
    return zero_fp32_state_dict(folder, tag_url)


def resolve(args, work: str) -> tuple[dict[str, torch.Tensor], dict | None, bool]:
    """(tensors, embedded model config, ema?) of what `--checkpoint` names."""
    src = args.checkpoint.rstrip("/")
    tag_url = None
    if src.endswith(".safetensors"):
        path = storage.local_path(src, work)
    elif src.endswith(".json"):
        entry = manifest.read_ledger(src).at_step(args.step)
        path = storage.local_path(entry.export_url, work)
        if not os.path.isfile(path):
            raise ValueError(f"{entry.export_url}: no such file (listed by the ledger {src})")
        with open(path, "rb") as f:
            got = manifest.sha256_bytes(f.read())
        if got != entry.export_sha256:
            raise ValueError(f"{entry.export_url}: sha256 {got[:12]}... differs from the ledger's "
                             f"{entry.export_sha256[:12]}... (file changed after the checkpoint was recorded)")
        tag_url = entry.checkpoint_url
    else:
        tag_url = src
        path = storage.local_path(storage.join(src, EXPORT_NAME), work)
    tensors, config, meta = read_export(path)
    ema = meta.get("cantus_weights", "raw") == "ema"
    if args.no_ema and ema:
        if tag_url is None:
            raise ValueError(f"{src} holds EMA weights; for the raw weights give its checkpoint folder or the ledger")
        raw = _raw_weights(tag_url, work)
        unknown = sorted(set(raw) - set(tensors))
        if unknown:
            raise ValueError(f"{tag_url}: checkpoint tensors {unknown[:3]} are not in {EXPORT_NAME}")
        tensors.update(raw)
        ema = False
    return tensors, config, ema


def check_layout(tensors: dict[str, torch.Tensor], config: dict, source: str) -> None:
    """The tensor names and shapes must be exactly those of the model the config builds (SAT's layout)."""
    from pipeline.models.factory import create_model_from_config

    cfg = load_model_config(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in create_model_from_config(cfg).state_dict().items()}
    check_tensor_layout(expected, tensors, source, "the model config")


def export(args, work: str) -> tuple[int, bool]:
    """Write `--out`; return (tensor count, EMA weights?)."""
    tensors, config, ema = resolve(args, work)
    if args.model_config is not None:
        config, where = read_json(args.model_config), args.model_config
    else:
        where = f"{args.checkpoint} (embedded model_config)"
    if config is None:
        raise ValueError(f"{args.checkpoint} carries no model config (metadata key {MODEL_CONFIG_KEY}): pass "
                         "--model-config")
    try:
        check_layout(tensors, config, args.checkpoint)
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('<dict>: ')}") from None
    local = args.out if not storage.is_s3(args.out) else os.path.join(work, "out.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    write_export(local, tensors, config, ema=ema)
    if local != args.out:
        storage.upload(local, args.out)
    return len(tensors), ema


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="cantus-export-") as work:
            count, ema = export(args, work)
    except USER_ERRORS as e:
        return report_error(e, args.debug)
    logger.info("wrote %s (%d tensors, %s weights)", args.out, count, "EMA" if ema else "raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
