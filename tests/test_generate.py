"""generate(): one path for render and train demos; items independent of their batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import renderkit
from pipeline.generate import generate, latent_length, latent_unit

PROMPTS = [{"prompt": "a solo flute melody", "seconds_start": 0, "seconds_total": 1},
           {"prompt": "fast drums and bass", "seconds_start": 0, "seconds_total": 1},
           {"prompt": "a string quartet in D minor", "seconds_start": 2, "seconds_total": 9}]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def model():
    return renderkit.tiny_model(renderkit.tiny_config())


class NoiseEchoModel(nn.Module):
    """An unconditional v-model that predicts v = -x: one v-ddim step from t = 1 then returns its input
    noise (denoised = x cos(pi/2) - v sin(pi/2) = x), which exposes the noise generate() drew."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.io_channels, self.min_input_length, self.diffusion_objective = channels, 1, "v"
        self.conditioner, self.pretransform = None, None

    def predict(self, x, t, cond, guidance, mask=None):  # the wrappers' typed call, which generate() makes
        return -x + 0 * self.weight


def test_initial_noise_is_drawn_per_item_from_a_cpu_generator_seeded_with_its_seed():
    out = generate(NoiseEchoModel(3), [{}, {}], [5, 7], steps=1, length=10, sampler="v-ddim", decode=False)
    for i, seed in enumerate([5, 7]):
        expected = torch.randn(3, 10, generator=torch.Generator("cpu").manual_seed(seed))
        torch.testing.assert_close(out.latents[i], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["v-ddim", "dpmpp-3m-sde"])
def test_an_item_gives_the_same_audio_alone_or_in_any_batch(model, sampler):
    """dpmpp-3m-sde draws fresh noise every step: per-item generators keep it batch-independent too."""
    kwargs = dict(steps=4, length=64, cfg_scale=3.0, sampler=sampler)
    together = generate(model, PROMPTS, SEEDS, **kwargs)
    reordered = generate(model, PROMPTS[::-1], SEEDS[::-1], **kwargs)
    for i in range(3):
        alone = generate(model, PROMPTS[i:i + 1], SEEDS[i:i + 1], **kwargs)
        torch.testing.assert_close(together.audio[i], alone.audio[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(reordered.audio[2 - i], alone.audio[0], rtol=0, atol=1e-5)
    assert together.audio.abs().max() > 1e-3  # not trivially silent
    assert (together.audio[0] - together.audio[1]).abs().max() > 1e-3  # items differ


def test_output_is_decoded_float32_audio_in_range_with_latents(model):
    out = generate(model, PROMPTS[:2], SEEDS[:2], steps=2, length=16, cfg_scale=3.0)
    assert out.audio.dtype == torch.float32 and out.audio.shape == (2, 1, 16 * 4)
    assert out.latents.shape == (2, 4, 16)
    assert out.audio.abs().max() <= 1.0
    assert out.sampler == "v-ddim"  # the v objective's default
    torch.testing.assert_close(out.audio, model.pretransform.decode(out.latents).clamp(-1, 1))


def test_seed_prompt_cfg_and_negative_prompt_each_change_the_result(model):
    base = dict(steps=3, length=16)
    ref = generate(model, PROMPTS[:1], [1], cfg_scale=3.0, **base).audio
    assert torch.equal(ref, generate(model, PROMPTS[:1], [1], cfg_scale=3.0, **base).audio)
    changed = {
        "seed": generate(model, PROMPTS[:1], [2], cfg_scale=3.0, **base).audio,
        "prompt": generate(model, PROMPTS[1:2], [1], cfg_scale=3.0, **base).audio,
        "cfg": generate(model, PROMPTS[:1], [1], cfg_scale=6.0, **base).audio,
        "negative": generate(model, PROMPTS[:1], [1], cfg_scale=3.0, **base,
                             negative_metadata=[{**PROMPTS[0], "prompt": "noise"}]).audio,
    }
    for what, audio in changed.items():
        assert (audio - ref).abs().max() > 1e-4, f"changing the {what} did not change the audio"


def test_without_guidance_the_negative_prompt_is_unused(model):
    plain = generate(model, PROMPTS[:1], [3], steps=2, length=16, cfg_scale=1.0).audio
    negative = generate(model, PROMPTS[:1], [3], steps=2, length=16, cfg_scale=1.0,
                        negative_metadata=[{**PROMPTS[0], "prompt": "noise"}]).audio
    torch.testing.assert_close(plain, negative, rtol=0, atol=0)


def test_bfloat16_autocast_runs_and_stays_close_to_float32(model):
    fp32 = generate(model, PROMPTS[:1], [4], steps=2, length=16, cfg_scale=3.0).audio
    bf16 = generate(model, PROMPTS[:1], [4], steps=2, length=16, cfg_scale=3.0, dtype=torch.bfloat16).audio
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_rectified_flow_model_uses_euler_by_default():
    model = renderkit.tiny_model(renderkit.tiny_config(objective="rectified_flow"))
    out = generate(model, PROMPTS[:2], SEEDS[:2], steps=2, length=16, cfg_scale=3.0)
    alone = generate(model, PROMPTS[1:2], SEEDS[1:2], steps=2, length=16, cfg_scale=3.0)
    assert out.sampler == "euler"
    torch.testing.assert_close(out.audio[1], alone.audio[0], rtol=0, atol=1e-5)


def test_bad_arguments_are_refused_with_the_reason(model):
    with pytest.raises(ValueError, match="one seed per metadata item"):
        generate(model, PROMPTS[:2], [1], steps=1, length=16)
    with pytest.raises(ValueError, match="samples 'rectified_flow' models"):
        generate(model, PROMPTS[:1], [1], steps=1, length=16, sampler="euler")
    with pytest.raises(ValueError, match="must not set 'generator'"):
        generate(model, PROMPTS[:1], [1], steps=1, length=16, sampler_options={"generator": None})
    with pytest.raises(ValueError, match="length=0"):
        generate(model, PROMPTS[:1], [1], steps=1, length=0)


def test_latent_length_rounds_seconds_up_to_the_backbone_unit(model):
    assert latent_unit(model) == 1
    assert latent_length(1.0, 8000, 4, 1) == 2000
    assert latent_length(1.0, 44100, 2048, 2) == 22  # 21.53 frames -> 22
    assert latent_length(0.0001, 44100, 2048, 4) == 4


def test_generate_imports_no_deepspeed_and_no_storage():
    """The train stage calls generate() on every rank under ZeRO-3: it must stay pure model code."""
    import subprocess
    import sys
    code = ("import sys, pipeline.generate; "
            "print([m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'boto3', 'botocore') "
            "or m == 'pipeline.storage'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
