"""imta_fast.inference.config: the command line is generated from EvalConfig (defaults written once)."""
import dataclasses

import pytest

import eval as evaluate
from imta_fast.inference.config import EvalConfig, build_parser, parse_eval_config


def test_parser_defaults_are_the_dataclass_defaults():
    cfg = parse_eval_config(["runA"])
    ref = EvalConfig(runs=["runA"])
    assert cfg == ref
    dests = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(EvalConfig)} <= dests


def test_flags_types_and_tristate():
    cfg = parse_eval_config(["a", "b", "--labels", "A", "B", "-b", "32", "-j", "1", "--mode", "wallclock",
                             "--latency-budget", "0.5", "--buckets", "step32", "--no-channels-last", "--threads", "1"])
    assert cfg.runs == ["a", "b"] and cfg.labels == ["A", "B"] and cfg.batch_size == 32 and cfg.workers == 1
    assert cfg.latency_budget == 0.5 and cfg.bucket_spec() == 32 and cfg.channels_last is False and cfg.threads == 1
    assert parse_eval_config(["a", "--channels-last"]).channels_last is True
    assert parse_eval_config(["a"]).channels_last is None
    assert parse_eval_config(["a"]).bucket_spec() is None
    assert parse_eval_config(["a", "--compile"]).bucket_spec() == 64
    assert parse_eval_config(["a"]).run_labels == ["a"]
    assert parse_eval_config(["a"]).micro_batch_spec() == "auto"
    assert parse_eval_config(["a", "--micro-batch", "none"]).micro_batch_spec() is None
    assert parse_eval_config(["a", "--micro-batch", "96"]).micro_batch_spec() == 96


@pytest.mark.parametrize("argv,match", [
    (["a", "b", "--labels", "x"], "1 labels for 2 runs"),
    (["a", "--buckets", "step0"], "--buckets"),
    (["a", "--repeats", "0"], "repeats"),
    (["a", "--streaming", "--latency-budget", "1"], "streaming"),
    (["a", "--micro-batch", "0"], "--micro-batch"),
    (["a", "--micro-batch", "lots"], "--micro-batch"),
])
def test_bad_values_are_one_line_errors(argv, match, capsys):
    with pytest.raises(ValueError, match=match):
        parse_eval_config(argv)
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
