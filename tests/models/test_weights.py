"""Loading SAT autoencoder checkpoints strictly, and the pretransform identity hashes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.factory import create_autoencoder_from_config
from pipeline.models.weights import (architecture_sha256, autoencoder_state_dict, load_autoencoder_weights,
                                     load_state_dict, safetensors_header, weights_sha256)

CONFIGS = Path(__file__).parents[1] / "fixtures" / "sat_configs"


def tiny_vae_config() -> dict:
    oobleck = {"channels": 4, "c_mults": [1, 2], "strides": [2, 4], "use_snake": True}
    return {"model_type": "autoencoder", "sample_size": 2048, "sample_rate": 16000, "audio_channels": 1,
            "model": {"encoder": {"type": "oobleck", "config": {"in_channels": 1, "latent_dim": 6, **oobleck}},
                      "decoder": {"type": "oobleck", "config": {"out_channels": 1, "latent_dim": 3, **oobleck}},
                      "bottleneck": {"type": "vae"}, "latent_dim": 3, "downsampling_ratio": 8, "io_channels": 1}}


@pytest.fixture
def trained(tmp_path):
    """A VAE with non-default weights, saved as SAT writes them: standalone and inside a full model."""
    torch.manual_seed(0)
    model = create_autoencoder_from_config(tiny_vae_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    standalone = tmp_path / "vae.safetensors"
    save_file(weights, str(standalone))
    full = {f"pretransform.model.{k}": v for k, v in weights.items()}
    full |= {"model.model.transformer.layers.0.weight": torch.randn(4, 4), "conditioner.conditioners.x.w": torch.ones(2)}
    full_ckpt = tmp_path / "sao_like.ckpt"
    torch.save({"state_dict": full}, full_ckpt)
    return model, standalone, full_ckpt


def test_standalone_and_full_model_checkpoints_load_strict_with_equal_hashes(trained):
    model, standalone, full_ckpt = trained
    x = torch.randn(1, 1, 64)
    hashes = []
    for path in (standalone, full_ckpt):
        fresh = create_autoencoder_from_config(tiny_vae_config())
        hashes.append(load_autoencoder_weights(fresh, str(path)))
        with torch.no_grad():
            torch.testing.assert_close(fresh.encode_pre_bottleneck(x), model.encode_pre_bottleneck(x))
    assert hashes[0] == hashes[1] == weights_sha256(model.state_dict())


def test_strict_loading_refuses_a_missing_tensor(trained, tmp_path):
    model, standalone, _ = trained
    weights = load_state_dict(str(standalone))
    weights.pop("decoder.layers.0.bias")
    with pytest.raises(ValueError, match=r"state dict: the weights do not match .*1 missing .*decoder.layers.0.bias"):
        load_autoencoder_weights(create_autoencoder_from_config(tiny_vae_config()), weights)


def test_a_tensor_of_another_shape_is_one_line_naming_the_file_and_both_shapes(trained, tmp_path):
    _, standalone, _ = trained
    weights = load_state_dict(str(standalone))
    weights["decoder.layers.0.bias"] = torch.zeros(5)
    path = str(tmp_path / "wrong.safetensors")
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"wrong.safetensors: the weights do not match .*1 of another shape "
                                         r"\(e.g. decoder.layers.0.bias is \[5\], expected \[[0-9]+\]\)$") as e:
        load_autoencoder_weights(create_autoencoder_from_config(tiny_vae_config()), path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_is_one_line_naming_the_file(trained, tmp_path, damage):
    _, standalone, _ = trained
    data = standalone.read_bytes()
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a tensor file " * 20, "empty": b""}[damage])
    for read in (load_state_dict, safetensors_header,
                 lambda p: load_autoencoder_weights(create_autoencoder_from_config(tiny_vae_config()), p)):
        with pytest.raises(ValueError, match=f"^{path}: not a readable .safetensors file") as e:
            read(str(path))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="nope.safetensors: no such file"):
        load_state_dict(str(tmp_path / "nope.safetensors"))


def test_weights_hash_sees_values_dtypes_and_refuses_mixed_dicts(trained):
    model, _, full_ckpt = trained
    weights = model.state_dict()
    base = weights_sha256(weights)
    changed = dict(weights)
    changed["encoder.layers.0.bias"] = weights["encoder.layers.0.bias"] + 1e-3
    assert weights_sha256(changed) != base
    assert weights_sha256({k: v.to(torch.bfloat16) for k, v in weights.items()}) != base
    full = load_state_dict(str(full_ckpt))
    with pytest.raises(ValueError, match="autoencoder_state_dict"):
        weights_sha256(full)
    assert weights_sha256(autoencoder_state_dict(full)) == base
    assert weights_sha256({f"pretransform.model.{k}": v for k, v in weights.items()}) == base


def test_a_diffusion_checkpoint_without_a_vae_is_refused():
    with pytest.raises(ValueError, match="--pretransform-ckpt"):
        autoencoder_state_dict({"model.model.w": torch.ones(1), "conditioner.c": torch.ones(1)})


def test_pickles_with_more_than_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "callback": Path("/tmp")}, path)
    with pytest.raises(ValueError, match=r"evil.ckpt: refused to load: it asks for the Python object `pathlib.*`") as e:
        load_state_dict(str(path))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)  # torch's advice is not passed on


def test_a_ckpt_whose_unpickling_would_write_a_file_is_refused_and_writes_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": WritesMarker(str(marker))}, path)
    torch.load(path, weights_only=False)  # the file is really hostile: an unsafe load writes the marker
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="hostile.ckpt: refused to load: it asks for the Python object `io.open`"):
        load_state_dict(str(path))
    with pytest.raises(ValueError, match="hostile.ckpt: refused to load"):
        load_state_dict(path.read_bytes(), "hostile.ckpt")
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="hostile.ckpt: not a readable torch checkpoint"):
        load_state_dict(str(path))


class WritesMarker:
    """Unpickling this object opens (creates) `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_architecture_hash_ignores_requires_grad_and_sees_strides():
    reconstructed = json.loads((CONFIGS / "external" / "stable_audio_open_1_0.reconstructed.json").read_text())
    fork = json.loads((CONFIGS / "external" / "stable_audio_open_1_0.friendly_fork.json").read_text())
    vae = json.loads((CONFIGS / "model_configs" / "autoencoders" / "stable_audio_2_0_vae.json").read_text())
    a = reconstructed["model"]["pretransform"]["config"]
    assert a["encoder"]["requires_grad"] is False  # the two copies really differ there
    assert architecture_sha256(a) == architecture_sha256(fork["model"]["pretransform"]["config"])
    assert architecture_sha256(a) == architecture_sha256(vae["model"])
    a["decoder"]["config"]["strides"] = [2, 4, 4, 8, 4]
    assert architecture_sha256(a) != architecture_sha256(vae["model"])
    with pytest.raises(ValueError, match="missing"):
        architecture_sha256(reconstructed["model"])
