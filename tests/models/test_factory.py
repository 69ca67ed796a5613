"""create_model_from_config: inputs it accepts, SAT's attribute layout, clear errors, cantus options."""

import json

import pytest
import torch

from pipeline.config import ConfigError, load_model_config
from pipeline.models import create_model_from_config
from pipeline.models.factory import COND_BACKBONES
from test_dit import tiny_config  # tests/models is on sys.path (pytest rootdir-less import)


def test_accepts_dict_path_and_parsed_config(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    keys = [sorted(create_model_from_config(src).state_dict()) for src in (cfg, str(path), load_model_config(cfg))]
    assert keys[0] == keys[1] == keys[2]


def test_wrapper_exposes_sats_layout_and_stage_helpers():
    model = create_model_from_config(tiny_config(dit={"patch_size": 2}))
    assert type(model.model).__name__ == "DiTWrapper" and type(model.model.model).__name__ == "DiffusionTransformer"
    assert model.diffusion_objective == "v" and model.io_channels == 4 and model.sample_rate == 16000
    assert model.min_input_length == 2 and model.pretransform is None
    assert all(k.split(".")[0] in ("model", "conditioner") for k in model.state_dict())


def test_unknown_backbone_argument_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"model\.diffusion\.config.*'embed_dims'"):
        create_model_from_config(tiny_config(dit={"embed_dims": 64}))


def test_cantus_keys_are_not_accepted_inside_the_backbone_block():
    with pytest.raises(ConfigError, match="attention_masks"):
        create_model_from_config(tiny_config(dit={"attention_masks": True}))


def test_unsupported_backbone_type_lists_the_supported_ones(monkeypatch):
    monkeypatch.delitem(COND_BACKBONES, "dit")
    with pytest.raises(ConfigError, match=r"'dit' is not a supported backbone; supported"):
        create_model_from_config(tiny_config())


@pytest.mark.parametrize("setting,expected", [(True, 2), (False, 0), (1, 1), (5, 2)])
def test_cantus_checkpointing_reaches_the_transformer(setting, expected):
    model = create_model_from_config(tiny_config(cantus={"checkpointing": setting}))
    assert model.model.model.transformer.checkpointed_blocks == expected


def test_cantus_attention_masks_reaches_the_dit():
    assert create_model_from_config(tiny_config(cantus={"attention_masks": True})).model.model.attention_masks
    assert not create_model_from_config(tiny_config()).model.model.attention_masks


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = create_model_from_config(tiny_config())
    assert all(p.is_meta for p in model.parameters())
