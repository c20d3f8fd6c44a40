"""Multi-exit CE + KD loss, forward + backward: eager PyTorch reference vs torch.compile'd reference vs
the fused Triton kernel, side by side in one run (one pytest-benchmark group per shape).

GPU cases (skipped without CUDA): K = 5 exits, B in {256, 1024, 8192}, C in {100, 1000}, fp32 and bf16,
with and without a teacher (IMTA OFA: T = 1, gamma = 0.1, 'mean'; label smoothing 0.1).  The logits
arrive as a list of K tensors, as the model returns them, so every provider pays its own stacking (the
fused path takes the K tensors without stacking).  ``compile`` gets a fresh ``torch.compile`` object per
case after ``torch._dynamo.reset()`` (one object reused across shapes hit the recompile limit), and runs
only where a target needs it (B = 256, C = 1000, teacher): each case is a cold inductor compile of
seconds, and the file has one minute in benchmarks/run_gpu.sh.  GB/s and the copy-bandwidth fraction
come from CUDA-event times (benchmarks/conftest.py).

``bytes_ideal`` = read the K logit tensors (+ the teacher) and write their gradient once:
(2K (+1)) * B * C * itemsize -- the floor for any implementation; GB/s are against that.

Launch tuning (issue #9 item 5): in the C = 1000 cases with a teacher ``triton`` runs as a training step
would, so its warm-up rounds tune the launch configuration (each candidate is one more kernel compile;
the other cases run the heuristic's, ``IMTA_FAST_KERNEL_AUTOTUNE=0``, to stay within the time cap).
``extra_info`` records the configuration used (``launch_config``), the heuristic's, and where tuned the
tuner's own per-candidate times (``autotune_ms``: CUDA events, L2 flushed, the kernel alone).
``triton_heuristic`` (B = 256 and 8192 of those cases) forces the heuristic's configuration, for the
tuned-vs-heuristic ratio of the whole forward + backward in benchmarks/targets.py.

CPU case (``cpu_bench``, runs anywhere): host cost per forward + backward call of the fused path with the
kernel launches replaced by no-ops, against the eager PyTorch loss on a problem so small that its
arithmetic is negligible (target <= 0.25x, benchmarks/targets.py); ``triton_op_stubbed`` is the previous
route (stack + ``torch.library`` op + its autograd wrapper) for comparison.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

K = 5
BATCHES = [256, 1024, 8192]
CLASSES = [100, 1000]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["eager", "compile", "triton", "triton_heuristic"]
# (B, C, teacher) of the cases where ...
COMPILE_CASES = {(256, 1000, True)}  # ... torch.compile runs (the target's shape)
TUNED_CASES = {(b, 1000, True) for b in BATCHES}  # ... the launch configuration is tuned
HEURISTIC_CASES = {(256, 1000, True), (8192, 1000, True)}  # ... triton_heuristic runs


def _loss_kwargs(kd: bool) -> dict:
    kw = dict(label_smoothing=0.1)
    if kd:
        kw.update(temperature=1.0, kd_weight=0.1, kl_reduction="mean")
    return kw


def _provider(name: str, kd: bool):
    from imta_fast.ops import dispatch, losses

    kw = _loss_kwargs(kd)
    if name == "eager":
        return lambda z, y, t: losses.multi_exit_loss(z, y, t, **kw)
    if name == "compile":
        def ref(z, y, t):
            return losses.multi_exit_loss(z, y, t, **kw)

        torch._dynamo.reset()  # one compiled callable per case: no recompile limit, no stale guards
        return torch.compile(ref, fullgraph=True, dynamic=False)
    return lambda z, y, t: dispatch.multi_exit_loss(z, y, t, impl="triton", **kw)


def _launch_info(B: int, C: int, dtype: torch.dtype, kd: bool) -> dict:
    """The launch configuration the fused path used for this case: the tuner's record (heuristic, chosen,
    per-candidate ms) when it tuned, else the heuristic's (tuning off, or a single candidate)."""
    from imta_fast.kernels import multi_exit_kd as kd_mod

    name = str(dtype).replace("torch.", "")
    for rec in kd_mod.autotune_log():
        if (rec["B"], rec["C"], rec["K"], rec["dtype"], rec["teacher"], rec["write_grad"]) == (B, C, K, name, kd, True):
            return {"launch_config": rec["chosen"], "launch_heuristic": rec["heuristic"], "autotuned": True,
                    "autotune_ms": rec["times_ms"]}
    heuristic = str(kd_mod.candidate_configs(B, C, K)[0])
    return {"launch_config": heuristic, "launch_heuristic": heuristic, "autotuned": False}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kd", [False, True], ids=["ce", "kd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
def test_multi_exit_loss_fwd_bwd(cuda_bench, benchmark, monkeypatch, B, C, dtype, kd, provider):
    from imta_fast.kernels import multi_exit_kd as kd_mod

    if provider == "triton_heuristic" and (B, C, kd) not in HEURISTIC_CASES:
        pytest.skip("heuristic-vs-tuned launch is compared on the target cases only")
    if provider == "compile" and (B, C, kd) not in COMPILE_CASES:
        pytest.skip("torch.compile (a cold inductor compile per case) runs on the target shape only")
    if (B, C, kd) not in TUNED_CASES:
        monkeypatch.setenv(kd_mod.AUTOTUNE_ENV, "0")
    dt = DTYPES[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = [(torch.randn(B, C, device="cuda", generator=gen) * 3).to(dt).requires_grad_(True) for _ in range(K)]
    y = torch.randint(0, C, (B,), device="cuda", generator=gen)
    t = (torch.randn(B, C, device="cuda", generator=gen) * 3).to(dt) if kd else None
    fn = _provider("triton" if provider == "triton_heuristic" else provider, kd)
    heuristic = kd_mod.candidate_configs(B, C, K)[0]
    forced = kd_mod.launch_config(heuristic) if provider == "triton_heuristic" else contextlib.nullcontext()

    def step():
        loss = fn(zs, y, t)
        torch.autograd.grad(loss, zs)

    itemsize = torch.finfo(dt).bits // 8
    nbytes = (2 * K + (1 if kd else 0)) * B * C * itemsize
    with forced:
        cuda_bench(step, nbytes, group=f"multi_exit_loss K{K} B{B} C{C} {dtype} {'kd' if kd else 'ce'}",
                   bench="multi_exit_loss", provider=provider, K=K, B=B, C=C, dtype=dtype, teacher=kd)
    if provider == "triton":
        benchmark.extra_info.update(_launch_info(B, C, dt, kd))
    elif provider == "triton_heuristic":
        benchmark.extra_info.update(launch_config=str(heuristic), launch_heuristic=str(heuristic), autotuned=False)


# ----------------------------------------------------------------------------- host cost (CPU)
HOST_B, HOST_C = 8, 10  # tiny: the eager loss's arithmetic is ~free, what is left is host work per op


def _host_case(provider: str, monkeypatch):
    from imta_fast.kernels import multi_exit_kd as kd_mod
    from imta_fast.ops import dispatch, losses

    kw = dict(temperature=1.0, kd_weight=0.1, kl_reduction="mean", label_smoothing=0.1)
    zs = [torch.randn(HOST_B, HOST_C, requires_grad=True) for _ in range(K)]
    y = torch.randint(0, HOST_C, (HOST_B,))
    t = torch.randn(HOST_B, HOST_C)
    if provider == "eager":
        def call():
            torch.autograd.grad(losses.multi_exit_loss(zs, y, t, **kw), zs)
        return call
    monkeypatch.setattr(kd_mod, "_run", lambda *a, **k: None)  # the launch becomes a no-op
    if provider == "triton_stubbed":
        def call():
            torch.autograd.grad(dispatch.multi_exit_loss(zs, y, t, impl="triton", **kw), zs)
        return call
    coef, _ = dispatch._exit_coef(K, True, 0.1, None, None, zs[0].device)

    def call():  # the pre-#9 route: stack + registered op + its autograd wrapper + backward multiply
        z = torch.stack(zs, 0)
        row_loss, _ = torch.ops.imta_fast.multi_exit_kd(z, y, t, None, coef, 1.0, 0.1, False, False, True)
        torch.autograd.grad(row_loss.sum(1).sum(), zs)
    return call


def _interleaved_ratio(call, baseline, blocks: int = 41, n: int = 20) -> float:
    """Median over alternating blocks of (time of n ``call``s) / (time of n ``baseline`` calls): both
    see the same background load, which a shared machine's separate medians do not."""
    import time

    ratios = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(n):
            baseline()
        t1 = time.perf_counter()
        for _ in range(n):
            call()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    ratios.sort()
    return ratios[len(ratios) // 2]


@pytest.mark.cpu_bench
@pytest.mark.parametrize("provider", ["eager", "triton_stubbed", "triton_op_stubbed"])
def test_host_cost(benchmark, provider, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work only: no intra-op thread pool waking up (noisy on a shared CPU)
    try:
        call = _host_case(provider, monkeypatch)
        call()  # warm-up: imports, caches
        benchmark.group = f"host_cost K{K} B{HOST_B} C{HOST_C} cpu"
        benchmark.pedantic(call, rounds=300, iterations=5, warmup_rounds=20)
        extra = dict(bench="host_cost", provider=provider, K=K, B=HOST_B, C=HOST_C, device="cpu", threads=1)
        if provider != "eager":
            eager = _host_case("eager", monkeypatch)
            extra["ratio_vs_eager_interleaved"] = round(_interleaved_ratio(call, eager), 4)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(extra)
