"""benchmarks.summary on synthetic pytest-benchmark JSON: ratios, goals in both directions, selectors by
fullname and by extra_info, missing cases, later files overriding earlier ones, exit codes."""
from __future__ import annotations

import json

import pytest

from benchmarks import summary
from benchmarks.targets import TARGETS, Target


def _bench(fullname, median=None, **extra):
    return {"fullname": fullname, "name": fullname.split("::")[-1], "stats": {"median": median, "mean": median},
            "extra_info": extra}


def _write(tmp_path, name, benches):
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return str(path)


SPEEDUP = Target("speedup", 15.0, numerator={"provider": "eager", "B": 256},
                 denominator={"provider": "triton", "B": 256}, metric="event_ms_median")
BW = Target("bandwidth", 0.8, numerator="bench_x.py::test_loss & B8192 & triton", metric="fraction_of_copy_bw")
HOST = Target("host", 0.25, numerator={"bench": "host_cost", "provider": "stub"},
              denominator={"bench": "host_cost", "provider": "eager"}, higher_is_better=False)


def _benches(eager_ms=3.0, triton_ms=0.1, frac=0.85, host=(2e-4, 4e-5)):
    return [
        _bench("bench_x.py::test_loss[triton-B256]", 1e-3, provider="triton", B=256, event_ms_median=triton_ms),
        _bench("bench_x.py::test_loss[eager-B256]", 1e-2, provider="eager", B=256, event_ms_median=eager_ms),
        _bench("bench_x.py::test_loss[triton-B8192]", 1e-2, provider="triton", B=8192, fraction_of_copy_bw=frac),
        _bench("bench_x.py::test_host[eager]", host[0], bench="host_cost", provider="eager"),
        _bench("bench_x.py::test_host[stub]", host[1], bench="host_cost", provider="stub"),
    ]


def test_all_targets_met(tmp_path, capsys):
    path = _write(tmp_path, "a.json", _benches())
    assert summary.main([path], targets=[SPEEDUP, BW, HOST]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["target", "measured", "goal", "ok"]
    row = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert row["speedup"][1:] == ["30", ">=", "15", "yes"]
    assert row["bandwidth"][1:] == ["0.85", ">=", "0.8", "yes"]
    assert row["host"][1:] == ["0.2", "<=", "0.25", "yes"]


@pytest.mark.parametrize("kw,missed", [(dict(triton_ms=0.5), "speedup"), (dict(frac=0.31), "bandwidth"),
                                       (dict(host=(2e-4, 1.2e-4)), "host")])
def test_a_miss_exits_1_and_is_named(tmp_path, capsys, kw, missed):
    path = _write(tmp_path, "a.json", _benches(**kw))
    assert summary.main([path], targets=[SPEEDUP, BW, HOST]) == 1
    captured = capsys.readouterr()
    row = [ln for ln in captured.out.splitlines() if ln.startswith(missed)][0]
    assert row.split()[-1] == "MISS"
    assert missed in captured.err


def test_missing_benchmarks_are_na_and_fail_only_with_require_all(tmp_path, capsys):
    path = _write(tmp_path, "cpu.json", _benches()[3:])  # a CPU run: only the host-cost cases
    assert summary.main([path], targets=[SPEEDUP, BW, HOST]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[-1] for ln in out.splitlines()[2:]] == ["n/a", "n/a", "yes"]
    assert summary.main([path, "--require-all"], targets=[SPEEDUP, BW, HOST]) == 1


def test_later_file_wins_and_ambiguity_is_an_error(tmp_path, capsys):
    old = _write(tmp_path, "old.json", _benches(frac=0.2))
    new = _write(tmp_path, "new.json", _benches(frac=0.9))
    assert summary.main([old, new], targets=[BW]) == 0
    assert summary.main([new, old], targets=[BW]) == 1
    ambiguous = Target("amb", 1.0, numerator={"provider": "triton"}, metric="median")
    assert summary.main([new], targets=[ambiguous]) == 2
    assert "matches 2 benchmarks" in capsys.readouterr().err


def test_unreadable_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert summary.main([str(bad)], targets=[BW]) == 2
    other = _write(tmp_path, "x.json", [])
    (tmp_path / "y.json").write_text(json.dumps({"results": []}))
    assert summary.main([other, str(tmp_path / "y.json")], targets=[BW]) == 2
    assert "no 'benchmarks' list" in capsys.readouterr().err


def test_project_targets_are_well_formed():
    names = [t.name for t in TARGETS]
    assert len(names) == len(set(names))
    for t in TARGETS:
        assert t.goal > 0 and t.numerator
        for sel in (t.numerator, t.denominator):
            assert sel is None or isinstance(sel, (str, dict))
    # the issue #9 goals are all there
    goals = {(t.goal, t.higher_is_better) for t in TARGETS}
    assert {(15.0, True), (2.0, True), (0.8, True), (0.25, False)} <= goals
