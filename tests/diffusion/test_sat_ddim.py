"""v-DDIM driven by the seeded ``dit_prepend`` reference model reproduces SAT's recorded 10-step samples.

SAT call (tests/fixtures/sat_ref/ref_dit_prepend.json, ``sample_ddim10_cfg1/3``):
``stable_audio_tools.inference.sampling.sample(model.model, in.noise, 10, eta=0, **condinputs, cfg_scale=cfg)``
with ``condinputs`` = the recorded ``out.condinputs.*`` tensors, sigma_max 1, no distribution shift.
"""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.diffusion import create_sampler

REF = Path(__file__).parents[1] / "fixtures" / "sat_ref"
TOL = 1e-5


@pytest.mark.parametrize("cfg_scale, output", [(1.0, "out.sample_ddim10_cfg1"), (3.0, "out.sample_ddim10_cfg3")])
def test_v_ddim_on_the_reference_dit_reproduces_sats_ten_step_samples(cfg_scale, output):
    from pipeline.models import create_model_from_config
    meta = json.loads((REF / "ref_dit_prepend.json").read_text())
    call = next(c for c in meta["calls"] if c["outputs"] == output)
    assert call["kwargs"] == {"steps": 10, "eta": 0.0, "cfg_scale": cfg_scale, "sigma_max": 1.0,
                              "dist_shift": None, "cfg_pp": False}
    tensors = load_file(REF / "ref_dit_prepend.safetensors")
    model = create_model_from_config(json.loads((REF / "cfg_dit_prepend.json").read_text())).eval()
    model.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}, strict=True)
    inputs = {name: tensors[f"out.condinputs.{name}"] for name in ("cross_attn_cond", "cross_attn_mask", "global_cond")}

    def model_fn(x, t):  # the caller closes over conditioning and CFG; the sampler sees only (x, t)
        return model.model(x, t, **inputs, cfg_scale=cfg_scale)

    sampler = create_sampler(None, "v")
    assert sampler.name == "v-ddim"
    sample = sampler(model_fn, tensors["in.noise"], call["kwargs"]["steps"], sigma_max=call["kwargs"]["sigma_max"])
    assert sample.shape == tensors[output].shape
    assert (sample - tensors[output]).abs().max().item() <= TOL
