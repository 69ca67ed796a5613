"""SAT's dataset configs (its four types), with errors that name the key as the model config's do.

Our stages read their data as a manifest URL. `python -m pipeline.config check` checks a user's SAT dataset
config, and train takes an SAT `pre_encoded` one as `--data` (a folder of `.npy` latents).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from pipeline.config_json import ConfigError, Section, read_json

logger = logging.getLogger(__name__)

DATASET_TYPES = ("audio_dir", "pre_encoded", "s3", "wds")

_frozen = dict(frozen=True, kw_only=True, slots=True)


@dataclass(**_frozen)
class DatasetSource:
    id: str
    path: str | None = None
    """Local folder (audio_dir, pre_encoded)."""
    s3_path: str | None = None
    """s3:// prefix (s3)."""
    custom_metadata_module: str | None = None
    """Python file SAT imports for per-sample metadata (never opened by ``check``)."""
    latent_crop_length: int | None = None


@dataclass(**_frozen)
class DatasetConfig:
    dataset_type: str
    datasets: tuple[DatasetSource, ...]
    random_crop: bool = True
    drop_last: bool = True
    source: str = "<dict>"
    unknown_keys: tuple[str, ...] = ()


def load_dataset_config(source: "str | dict") -> DatasetConfig:
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    name = source if isinstance(source, str) else "<dict>"
    raw = read_json(source) if isinstance(source, str) else source
    unknown: list[str] = []
    try:
        top = Section(raw, "", unknown)
        kind = top.str("dataset_type", required=True, choices=DATASET_TYPES)
        sources = []
        for i, entry in enumerate(top.list("datasets", required=True)):
            s = Section(entry, f"datasets[{i}]", unknown)
            src = DatasetSource(id=s.str("id", f"dataset{i}"), path=s.str("path"), s3_path=s.str("s3_path"),
                                custom_metadata_module=s.str("custom_metadata_module"),
                                latent_crop_length=s.int("latent_crop_length", minimum=1))
            need = "s3_path" if kind in ("s3", "wds") else "path"
            if getattr(src, need) is None:
                raise ConfigError(f"datasets[{i}].{need}: required for dataset_type {kind}")
            s.done()
            sources.append(src)
        if not sources:
            raise ConfigError("datasets: expected at least one dataset")
        cfg = DatasetConfig(dataset_type=kind, datasets=tuple(sources), random_crop=top.bool("random_crop", True),
                            drop_last=top.bool("drop_last", True), source=name)
        top.done()
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None
    if unknown:
        logger.warning("%s: unknown config keys (ignored, as SAT does): %s", name, ", ".join(unknown))
    return dataclasses.replace(cfg, unknown_keys=tuple(unknown))
