"""create_model_from_config: inputs it accepts, SAT's attribute layout, clear errors, cantus options."""

import json

import pytest
import torch

from pipeline.config import load_model_config
from pipeline.config_json import ConfigError
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


def test_backbone_type_and_sample_size_are_checked_by_the_factory_on_the_meta_device():
    """The factory's registry is the one list of backbones; the minimum input length is the built model's."""
    wavenet = tiny_config(diffusion={"type": "wavenet"})
    with torch.device("meta"), pytest.raises(ConfigError, match=r"model\.diffusion\.type='wavenet' is not a "
                                                                r"supported backbone; supported: \['DAU1d', "):
        create_model_from_config(wavenet)
    odd = {**tiny_config(dit={"patch_size": 4}), "sample_size": 4098}
    load_model_config(odd)  # the parser leaves this rule to the built model
    with torch.device("meta"), pytest.raises(ConfigError, match=r"sample_size=4098 must be a multiple of the model's "
                                                                r"minimum input length 4 \(pretransform ratio 1 x "
                                                                r"backbone 4\)"):
        create_model_from_config(odd)


def test_dau1d_sample_size_follows_the_product_of_its_strides_not_its_depth():
    """SAT's rule is the module's total stride; with strides of 4 that is more than 2 ** (depth - 1)."""
    config = {"model_type": "diffusion_uncond", "sample_size": 2 ** 12, "sample_rate": 16000, "audio_channels": 1,
              "model": {"type": "DAU1d", "config": {"io_channels": 1, "n_attn_layers": 0, "depth": 4,
                                                    "channels": [8, 8, 8, 8], "strides": [4, 4, 4],
                                                    "learned_resample": True}}}
    with torch.device("meta"), pytest.raises(ConfigError, match=r"multiple of the model's minimum input length 64 "):
        create_model_from_config({**config, "sample_size": 2 ** 3 * 3})
    with torch.device("meta"):
        assert create_model_from_config(config).min_input_length == 64


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


def test_the_factory_builds_exactly_the_backbones_the_config_registry_describes():
    from pipeline import backbones
    from pipeline.models.factory import UNCOND_BACKBONES

    assert set(COND_BACKBONES) == set(backbones.CONDITIONED)
    assert set(UNCOND_BACKBONES) == set(backbones.UNCONDITIONAL)
