"""The train command line becomes one frozen TrainArgs before it leaves pipeline/train.py."""
import dataclasses

import pytest

from pipeline.train import build_parser
from pipeline.train_args import TrainArgs

ARGV = ["--ds_config", "ds.json", "--model-config", "m.json", "--data", "d", "--output", "o", "--max-steps", "3"]


def test_every_train_option_becomes_a_field_with_the_parsers_value_and_default():
    ns = build_parser().parse_args(ARGV + ["--keep-last", "2", "--compile"])
    args = TrainArgs.from_namespace(ns)
    assert {f.name for f in dataclasses.fields(TrainArgs)} == set(vars(ns))
    assert dataclasses.asdict(args) == vars(ns)
    assert (args.keep_last, args.compile, args.max_steps, args.num_workers) == (2, True, 3, 2)


def test_the_recorded_options_keep_the_command_line_order_and_leave_out_local_rank():
    ns = build_parser().parse_args(ARGV + ["--local_rank", "1"])
    record = TrainArgs.from_namespace(ns).record()
    assert list(record) == [k for k in vars(ns) if k != "local_rank"]


def test_train_args_are_frozen_and_an_option_without_a_field_is_refused():
    args = TrainArgs.from_namespace(build_parser().parse_args(ARGV))
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.max_steps = 4
    ns = build_parser().parse_args(ARGV)
    ns.new_option = 1
    with pytest.raises(TypeError, match=r"no field for the option\(s\) \['new_option'\]"):
        TrainArgs.from_namespace(ns)
