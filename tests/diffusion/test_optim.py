"""Optimizers and LR schedules from training.optimizer_configs (parsed by pipeline.config_training); InverseLR against SAT's recorded rates."""
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from pipeline.config import load_model_config
from pipeline.config_training import parse_optimizer_configs
from pipeline.diffusion import InverseLR, create_optimizer_and_scheduler

FIXTURES = Path(__file__).parents[1] / "fixtures"
SAO = FIXTURES / "sat_configs" / "external" / "stable_audio_open_1_0.reconstructed.json"


def _param():
    return [torch.nn.Parameter(torch.zeros(3))]


def _lrs_after(scheduler, optimizer, steps):
    """The lr after k scheduler steps, for each k in steps (sorted)."""
    out, done = [], 0
    for k in steps:
        for _ in range(k - done):
            with warnings.catch_warnings():  # no optimizer.step(): the lr does not depend on the weights
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                scheduler.step()
        done = k
        out.append(scheduler.get_last_lr()[0])
    return out


def test_inverse_lr_reproduces_sats_recorded_rates_for_sao_settings():
    ref = json.loads((FIXTURES / "sat_ref" / "ref_inverse_lr.json").read_text())
    cfg = load_model_config(str(SAO))
    scheduler = cfg.training.optimizer_configs["diffusion"].scheduler
    assert {"type": scheduler.type, "config": scheduler.config} == ref["scheduler_config"]
    optimizer, scheduler = create_optimizer_and_scheduler(cfg.training.optimizer_configs, None, _param())
    assert isinstance(optimizer, torch.optim.AdamW) and isinstance(scheduler, InverseLR)
    assert optimizer.defaults["weight_decay"] == 0.001 and optimizer.defaults["betas"] == (0.9, 0.999)
    got = _lrs_after(scheduler, optimizer, ref["steps"])
    assert got == pytest.approx(ref["lr_after_k_steps"], rel=1e-12)


def test_inverse_lr_matches_its_formula_with_a_final_lr_floor():
    optimizer = torch.optim.SGD(_param(), lr=0.1)
    scheduler = InverseLR(optimizer, inv_gamma=20.0, power=2.0, warmup=0.9, final_lr=0.01)
    steps = [0, 1, 2, 5, 10, 50, 200]
    got = _lrs_after(scheduler, optimizer, steps)
    formula = [(1 - 0.9 ** (k + 1)) * max(0.01, 0.1 * (1 + k / 20.0) ** -2.0) for k in steps]
    assert got == pytest.approx(formula, rel=1e-12)
    assert got[-1] == pytest.approx((1 - 0.9 ** 201) * 0.01)  # the floor holds once the decay passes it
    assert optimizer.param_groups[0]["lr"] == got[-1]


def test_learning_rate_alone_gives_constant_adam_like_sat():
    optimizer, scheduler = create_optimizer_and_scheduler(None, 3e-4, _param())
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 3e-4 and scheduler is None
    with pytest.raises(ValueError, match="set either learning_rate or optimizer_configs"):
        create_optimizer_and_scheduler(None, None, _param())


def test_optimizer_configs_win_over_learning_rate_with_a_warning(caplog):
    configs = {"diffusion": {"optimizer": {"type": "SGD", "config": {"lr": 0.5}},
                             "scheduler": {"type": "StepLR", "config": {"step_size": 2, "gamma": 0.5}}}}
    with caplog.at_level(logging.WARNING):
        optimizer, scheduler = create_optimizer_and_scheduler(parse_optimizer_configs(configs), 1e-4, _param())
    assert "learning_rate=0.0001 is ignored" in caplog.text
    assert type(optimizer) is torch.optim.SGD and isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert _lrs_after(scheduler, optimizer, [1, 2, 4]) == [0.5, 0.25, 0.125]


def test_deepspeed_optimizer_names_need_a_lookup_from_the_caller():
    configs = parse_optimizer_configs({"diffusion": {"optimizer": {"type": "FusedAdam", "config": {"lr": 1e-4}}}})
    with pytest.raises(ValueError, match=r"optimizer.type='FusedAdam' is a DeepSpeed optimizer; the caller must supply"):
        create_optimizer_and_scheduler(configs, None, _param())
    optimizer, _ = create_optimizer_and_scheduler(configs, None, _param(), extra_optimizers={"FusedAdam": torch.optim.AdamW})
    assert type(optimizer) is torch.optim.AdamW


@pytest.mark.parametrize("configs, message", [
    ({"diffusion": {"optimizer": {"type": "Adamm", "config": {}}}},
     r"training.optimizer_configs.diffusion.optimizer.type='Adamm' is not a torch.optim optimizer; expected one of .*'AdamW'"),
    ({"diffusion": {"optimizer": {"type": "AdamW", "config": {"lr": 1e-4, "beta": 0.9}}}},
     r"diffusion.optimizer.config: unknown argument\(s\) \['beta'\] for AdamW"),
    ({"diffusion": {"optimizer": {"type": "AdamW", "config": {}},
                    "scheduler": {"type": "InverseLR", "config": {"gamma": 1}}}},
     r"diffusion.scheduler.config: unknown argument\(s\) \['gamma'\] for InverseLR"),
    ({"diffusion": {"optimizer": {"type": "AdamW", "config": {}}, "scheduler": {"type": "Cosine", "config": {}}}},
     r"diffusion.scheduler.type='Cosine' is neither 'InverseLR' nor"),
    ({"autoencoder": {}}, r"training.optimizer_configs.autoencoder: expected an object with 'optimizer'"),
    ({"autoencoder": {"optimizer": {"type": "AdamW"}}},
     r"training.optimizer_configs.diffusion: expected an object with 'optimizer'.*\['autoencoder'\]"),
])
def test_invalid_optimizer_configs_are_errors_naming_the_key(configs, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer_and_scheduler(parse_optimizer_configs(configs), None, _param())


def test_inverse_lr_rejects_warmup_of_one():
    with pytest.raises(ValueError, match="warmup=1.0"):
        InverseLR(torch.optim.SGD(_param(), lr=0.1), warmup=1.0)


def test_fused_asks_torch_for_its_fused_adamw_unless_the_config_chooses():
    """The train stage passes fused=True on CUDA; torch's fused kernel also runs on the CPU, so the update can be
    checked here against the default (foreach) one."""
    adamw = {"diffusion": {"optimizer": {"type": "AdamW", "config": {"lr": 1e-2, "weight_decay": 0.1}}}}
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64))
        optimizer, _ = create_optimizer_and_scheduler(parse_optimizer_configs(adamw), None, [p], fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            p.grad = torch.sin(torch.arange(64.0) + p.detach())
            optimizer.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-6)
    assert not torch.equal(results[0], torch.randn(64, generator=torch.Generator().manual_seed(0)))
    chosen = {"diffusion": {"optimizer": {"type": "AdamW", "config": {"lr": 1e-2, "foreach": False}}}}
    assert create_optimizer_and_scheduler(parse_optimizer_configs(chosen), None, _param(), fused=True)[0].defaults["fused"] is None
    sgd = {"diffusion": {"optimizer": {"type": "SGD", "config": {"lr": 1e-2}}}}
    assert not create_optimizer_and_scheduler(parse_optimizer_configs(sgd), None, _param(), fused=True)[0].defaults.get("fused")
    assert create_optimizer_and_scheduler(None, 1e-3, _param(), fused=True)[0].defaults["fused"] is True
