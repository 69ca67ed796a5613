import glob
import os

import pytest

from pipeline.distributed.engine import check_optimizer_source, read_ds_config, resolve_batch, zero_stage

DS = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs")


def test_auto_batch_sizes_are_filled_from_the_command_line():
    cfg, layout = resolve_batch({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": 3}, "ds.json", micro_batch=4, world_size=2,
                                model_config_path="model.json")
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 3, 24)
    assert layout.global_batch == 24


def test_a_train_batch_size_that_does_not_add_up_names_both_files_and_the_arithmetic():
    with pytest.raises(ValueError, match=r"train_batch_size=32 in ds.json != micro batch 4 x gradient_accumulation_steps "
                                         r"1 x world size 2 = 8 \(model config model.json"):
        resolve_batch({"train_batch_size": 32}, "ds.json", micro_batch=4, world_size=2, model_config_path="model.json")


def test_batch_size_flag_and_ds_config_micro_batch_must_agree():
    with pytest.raises(ValueError, match="--batch-size 4 disagrees with train_micro_batch_size_per_gpu=2 in ds.json"):
        resolve_batch({"train_micro_batch_size_per_gpu": 2}, "ds.json", micro_batch=4, world_size=1,
                      model_config_path="m.json")
    _, layout = resolve_batch({"train_batch_size": 16, "gradient_accumulation_steps": 2}, "ds.json", micro_batch=None,
                              world_size=4, model_config_path="m.json")
    assert layout.micro_batch == 2


def test_an_optimizer_in_both_files_is_an_error_naming_both():
    with pytest.raises(ValueError, match="optimizer defined twice: ds.json has 'optimizer' and model.json has "
                                         "training.optimizer_configs"):
        check_optimizer_source({"optimizer": {"type": "AdamW"}}, "ds.json", model_has_optimizer=True,
                               model_config_path="model.json")
    check_optimizer_source({"optimizer": {"type": "AdamW"}}, "ds.json", model_has_optimizer=False,
                           model_config_path="model.json")


def test_shipped_ds_configs_leave_batch_sizes_to_the_cli_and_clip_gradients():
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DS, "*.json")))
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json", "zero2_cpu.json",
            "zero3_cpu.json"} <= set(names)
    for name in names:
        cfg = read_ds_config(os.path.join(DS, name))
        assert cfg["train_batch_size"] == "auto" and cfg["gradient_clipping"] > 0 and "optimizer" not in cfg, name
        assert cfg.get("bf16", {}).get("enabled", False) == ("_cpu" not in name), name
        if zero_stage(cfg) == 3 and "_cpu" in name:
            assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # really sharded in tests


def test_a_missing_ds_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="--ds_config .*nope.json: file not found"):
        read_ds_config(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_ds_config(str(tmp_path / "bad.json"))
