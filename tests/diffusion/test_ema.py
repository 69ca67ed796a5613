"""EMA against a hand computation of ema-pytorch 0.2.3's rule with SAT's settings."""
import pytest
import torch

from pipeline.diffusion import EMA


def reference_ema(values, beta, power, every, after):
    """ema-pytorch 0.2.3 EMA.update / get_current_decay (inv_gamma 1), one float per call, float64."""
    shadow, out = values[0], []
    for step, value in enumerate(values):
        if step % every == 0:
            if step <= after:
                shadow = value
            else:
                epoch = max(step - after - 1, 0)
                decay = 0.0 if epoch <= 0 else min(beta, 1 - (1 + epoch) ** -power)
                shadow = shadow + (value - shadow) * (1 - decay)
        out.append(shadow)
    return out


@pytest.mark.parametrize("every", [1, 3])
def test_ema_follows_sats_warmup_rule_with_fp32_shadow(every):
    values = [float(v) for v in torch.linspace(-1, 2, 40).tolist()]
    weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
    bias = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([weight, bias], beta=0.9, power=0.75, update_every=every, update_after_step=1)
    expected = reference_ema(values, 0.9, 0.75, every, 1)
    for value, want in zip(values, expected):
        with torch.no_grad():
            weight.fill_(value)
            bias.fill_(value)
        ema.update([weight, bias])
        assert ema.shadow[0].dtype == torch.float32
        assert ema.shadow[1] == pytest.approx(torch.full((3,), want), abs=1e-6)
        # The bf16 weight rounds the value, the fp32 shadow averages the rounded values exactly.
        assert ema.shadow[0].max().item() == pytest.approx(ema.shadow[0].min().item())


def test_sat_settings_copy_three_times_then_warm_up_to_beta():
    ema = EMA([torch.zeros(1)])
    assert [ema.decay(s) for s in range(3)] == [0.0, 0.0, 0.0]
    assert ema.decay(3) == pytest.approx(1 - 2 ** -0.75)
    assert ema.decay(12) == pytest.approx(1 - 11 ** -0.75)
    assert ema.decay(10 ** 7) == 0.9999


def test_copy_to_state_dict_and_mismatch_errors():
    p = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    ema = EMA(p, beta=0.5)
    for value in (1.0, 2.0, 3.0, 5.0):
        with torch.no_grad():
            p[0].fill_(value)
        ema.update(p)
    state = ema.state_dict()
    restored = EMA([torch.zeros(4), torch.zeros(2)])
    restored.load_state_dict(state)
    assert restored.step == 4 and torch.equal(restored.shadow[0], ema.shadow[0])
    target = [torch.zeros(4), torch.zeros(2, dtype=torch.bfloat16)]
    ema.copy_to(target)
    assert torch.allclose(target[0], ema.shadow[0]) and target[1].dtype == torch.bfloat16
    # Calls 0-2 copy (3.0); call 3 lerps with decay 1 - 2**-0.75 (below beta 0.5): 3 + 2 * 2**-0.75.
    assert target[0][0].item() == pytest.approx(3 + 2 * 2 ** -0.75, rel=1e-6)
    with pytest.raises(ValueError, match="EMA was built for 2 tensors"):
        ema.update(p[:1])
    with pytest.raises(ValueError, match="ema_beta=1.0"):
        EMA(p, beta=1.0)
