"""benchmarks/bench_train.py on CPU: two tiny rungs for a couple of steps give a well-formed result,
and a recompilation after warm-up is counted (the harness's zero-recompile check can fail)."""
import math

import pytest
import torch

from benchmarks import bench_train as bt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a loaded machine a second OpenMP thread makes these steps many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _specs(names, batch=4):
    return bt.case_specs("msdnet_tiny", batch, CPU, names=names)


def test_ladder_is_cumulative_and_full_settings_skip_triton_on_cpu():
    specs = {s.name: s for s in bt.case_specs("msdnet_tiny", 4, CPU)}
    assert list(specs) == list(bt.CASE_NAMES)
    on = [sum(v for k, v in vars(s).items() if k != "host_sync") + (not s.host_sync) for _, s in bt.LADDER]
    assert on == list(range(len(bt.LADDER)))  # each rung adds exactly one setting
    assert specs["fused_ops"].skip and not specs["fused_optim"].settings.fused_ops
    assert specs["reference"].settings == bt.Settings() and specs["reference"].settings.host_sync
    assert specs["ddp_ws1"].settings.ddp and specs["stage2_bn_eval"].method == "imta"
    with pytest.raises(ValueError, match="unknown case"):
        bt.case_specs("msdnet_tiny", 4, CPU, names=["nope"])


def test_two_rungs_measure_images_memory_and_zero_recompiles():
    # 'compile' here uses the eager backend: the same Dynamo capture and guards, no Inductor codegen.
    results = bt.measure_cases(_specs(["reference", "compile"]), CPU, steps=2, rounds=2, warmup_steps=2,
                               compile_backend="eager", log=lambda m: None)
    assert [r.name for r in results] == ["reference", "compile"]
    for r in results:
        assert r.skipped is None
        assert r.images_per_s > 0 and len(r.images_per_s_rounds) == 2
        assert math.isclose(r.images_per_s, 4 / (r.step_ms / 1e3), rel_tol=1e-9)
        assert r.step_mem_mb > 0 and r.state_mb > 0
        assert math.isclose(r.peak_mem_mb, r.step_mem_mb + r.state_mb)
        assert r.compile_s >= 0 and r.warmup_s > 0
        assert r.recompiles == 0, r
    ref, comp = results
    assert ref.settings["host_sync"] and not ref.settings["compile"]
    assert comp.settings["compile"] and comp.settings["amp"] and comp.settings["channels_last"]
    table = bt.format_table(results, "test cpu")
    assert "| reference | msdnet_tiny | ge | 4 |" in table and "best round" in table and "| compile |" in table
    assert "device: test cpu" in table
    # the script's JSON has pytest-benchmark's shape: benchmarks.summary selects cases from it
    from benchmarks.summary import select

    data = bt.benchmark_json(results, CPU)
    found = select(data["benchmarks"], {"bench": "train", "case": "reference"})
    assert found["fullname"].endswith("test_train[reference]") and found["extra_info"]["images_per_s"] > 0
    assert found["stats"]["median"] == pytest.approx(ref.step_ms / 1e3) and found["stats"]["rounds"] == 2


def test_a_recompile_after_warm_up_is_counted():
    spec = _specs(["compile"])[0]
    case = bt.build_case(spec, CPU, compile_backend="eager")
    bt.warm_up(case, 2)
    before = bt.recompile_counters()
    bt.run_steps(case, 2)
    assert bt.recompiles_since(before) == 0
    case.x, case.y = case.x[:3].clone(), case.y[:3].clone()  # a new batch size: the guards fail
    bt.run_steps(case, 1)
    assert bt.recompiles_since(before) >= 1


def test_step_memory_counts_the_activations():
    small, big = (bt.build_case(s, CPU) for s in (_specs(["reference"], 2)[0], _specs(["reference"], 32)[0]))
    for c in (small, big):
        bt.warm_up(c, 1)
    assert bt.step_memory_bytes(big) > 4 * bt.step_memory_bytes(small) > 0


def test_ratios_name_the_targets():
    mk = lambda name, ips, mem: bt.CaseResult(name, "m", "ge", 4, {}, "g", images_per_s=ips, peak_mem_mb=mem)
    rat = bt.ratios([mk("reference", 10.0, 5), mk("fused_optim", 50.0, 4), mk("resnet50", 25.0, 9),
                     mk("ddp_ws1", 49.0, 4), mk("stage2_bn_eval", 150.0, 1)])
    assert rat["full_vs_reference"] == 5.0 and rat["msdnet_vs_resnet50"] == 2.0
    assert rat["ddp_ws1_vs_no_ddp"] == pytest.approx(0.98) and rat["stage2_bn_eval_vs_stage1"] == 3.0
    assert rat["stage2_bn_eval_vs_stage1_mem"] == 0.25 and "stage2_bn_train_vs_stage1" not in rat


def test_ddp_world_size_one_runs_on_gloo():
    import torch.distributed as dist

    results = bt.measure_cases(_specs(["ddp_ws1"]), CPU, steps=1, rounds=1, warmup_steps=2,
                               compile_backend="eager", log=lambda m: None)
    assert results[0].images_per_s > 0 and results[0].recompiles == 0
    assert not dist.is_initialized()  # the one-process group is torn down


def test_run_gpu_dry_run_lists_every_step(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DALI_WHEEL_PARTS": str(tmp_path / "none")}
    out = subprocess.run(["bash", str(root / "benchmarks" / "run_gpu.sh"), "--dry-run"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for step in ("install", "tests_gpu", "bench_train", "summary"):
        assert f"[dry-run] {step} " in out.stdout
    assert "-m pytest -q -m gpu tests" in out.stdout and "benchmarks.summary" in out.stdout
    assert f"--json {tmp_path / 'out'}/bench_train.json" in out.stdout
    bad = subprocess.run(["bash", str(root / "benchmarks" / "run_gpu.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
