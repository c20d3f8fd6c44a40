"""Performance targets checked by ``python -m benchmarks.summary results/*.json``.

Each :class:`Target` names one ratio: the ``metric`` of the benchmark chosen by ``numerator``, divided by
that of the one chosen by ``denominator`` (or the numerator's metric alone when there is none), against
``goal``.  A selector is either a string -- every ``&``-separated part must occur in the benchmark's
``fullname`` -- or a dict of ``extra_info`` items that must all match.  ``metric`` is a pytest-benchmark
stats field (``median``, ``mean``, ``min``: seconds, wall clock) or an ``extra_info`` key (for example
``event_ms_median``, the CUDA-event time per call, or ``fraction_of_copy_bw``).

Owners append their own entries to ``TARGETS`` and edit only those (benchmarks/NOTES.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

Selector = Union[str, Dict[str, object]]

__all__ = ["Target", "TARGETS", "Selector"]


@dataclass(frozen=True)
class Target:
    name: str
    goal: float
    numerator: Selector = ""
    denominator: Optional[Selector] = None
    metric: str = "median"
    higher_is_better: bool = True
    note: str = field(default="", compare=False)


def _kd_case(provider: str, B: int, C: int = 1000, dtype: str = "bf16") -> Dict[str, object]:
    return {"bench": "multi_exit_loss", "provider": provider, "K": 5, "B": B, "C": C, "dtype": dtype, "teacher": True}


def _ee_cpu(model: str, micro_batch="auto") -> Dict[str, object]:
    return {"bench": "early_exit", "model": model, "device": "cpu", "batch_size": 1024, "micro_batch": micro_batch}


def _train(case: str) -> Dict[str, object]:
    return {"bench": "train", "case": case}


TARGETS: List[Target] = [
    # ---- kernels (issue #9); owner: kernels helper.  GPU goals are for an H100/H200.
    Target("multi_exit_loss K5 C1000 B256 fwd+bwd: triton vs eager", 15.0,
           numerator=_kd_case("eager", 256), denominator=_kd_case("triton", 256), metric="event_ms_median",
           note="speedup = eager time / fused time (CUDA events)"),
    Target("multi_exit_loss K5 C1000 B256 fwd+bwd: triton vs torch.compile", 2.0,
           numerator=_kd_case("compile", 256), denominator=_kd_case("triton", 256), metric="event_ms_median"),
    Target("multi_exit_loss K5 C1000 B8192 bf16: fraction of copy bandwidth", 0.80,
           numerator=_kd_case("triton", 8192), metric="fraction_of_copy_bw",
           note="bytes_ideal = (2K+1) B C itemsize over the event-timed median"),
    Target("multi_exit_loss K5 C1000 B8192 fp32: fraction of copy bandwidth", 0.80,
           numerator=_kd_case("triton", 8192, dtype="fp32"), metric="fraction_of_copy_bw"),
    *[Target(f"multi_exit_loss K5 C1000 B{b} bf16 fwd+bwd: autotuned vs heuristic launch", 0.97,
             numerator=_kd_case("triton_heuristic", b), denominator=_kd_case("triton", b), metric="event_ms_median",
             note="heuristic time / tuned time (issue #9 item 5): the tuner must not pick a slower configuration; "
                  "> 1 is what tuning gains")
      for b in (256, 8192)],
    Target("ge_backward imagenet_b256_384x7x7 bf16: fraction of copy bandwidth", 0.80,
           numerator={"bench": "ge_backward", "provider": "split_fused", "shape_name": "imagenet_b256_384x7x7",
                      "dtype": "bf16", "channels_last": False},
           metric="fraction_of_copy_bw", note="3 units: read g_head, g_next, write dL/dh"),
    Target("multi_exit_loss host cost per call (launch stubbed) vs eager PyTorch, CPU", 0.25,
           numerator={"bench": "host_cost", "provider": "triton_stubbed"}, metric="ratio_vs_eager_interleaved",
           higher_is_better=False,
           note="CPU proxy for the host-bound B = 256 case (issue #9 item 2); eager and fused timed in "
                "alternating blocks, since separate medians on a shared CPU see different load"),
    # ---- input pipelines (issue #13); owner: data helper.  Goals are for the GPU box (16 cores, H200);
    # the CPU cases also run here (DALI in CPU mode), where the ratios are informational.
    Target("photos 500x375 train transform: DALI vs torchvision DataLoader images/s", 3.0,
           numerator={"bench": "loaders", "loader": "dali", "transform": "train"},
           denominator={"bench": "loaders", "loader": "torchvision", "transform": "train"}, metric="images_per_s",
           note="torchvision: ImageFolder + PIL, pinned, persistent workers; DALI: nvJPEG on CUDA"),
    Target("photos 500x375 eval transform: DALI vs torchvision DataLoader images/s", 3.0,
           numerator={"bench": "loaders", "loader": "dali", "transform": "eval"},
           denominator={"bench": "loaders", "loader": "torchvision", "transform": "eval"}, metric="images_per_s"),
    Target("MSDNet-ImageNet step 4 bf16 train step fed by DALI vs synthetic on-device data", 0.95,
           numerator={"bench": "loaders", "feed": "dali"}, denominator={"bench": "loaders", "feed": "synthetic"},
           metric="images_per_s", note="GPU only"),
    Target("CIFAR-shaped train loader: device backend vs DataLoader images/s", 1.0,
           numerator={"bench": "loaders", "loader": "device", "data": "cifar"},
           denominator={"bench": "loaders", "loader": "dataloader", "data": "cifar"}, metric="images_per_s"),
    Target("MNIST train loader: device backend vs DataLoader images/s", 1.0,
           numerator={"bench": "loaders", "loader": "device", "data": "mnist"},
           denominator={"bench": "loaders", "loader": "dataloader", "data": "mnist"}, metric="images_per_s"),
    # ---- training speed (issue #14); owner: bench_train.  Goals for an H100/H200, MSDNet ImageNet step 4,
    # B = 256, synthetic data on the GPU; a CPU run of bench_train measures the same ratios on a small model.
    Target("train MSDNet full settings vs reference-style, images/s", 4.0,
           numerator=_train("fused_optim"), denominator=_train("reference"), metric="images_per_s"),
    Target("train MSDNet vs ResNet-50 at full settings, images/s", 1.2,
           numerator=_train("fused_optim"), denominator=_train("resnet50"), metric="images_per_s"),
    Target("train DDP world size 1 vs no DDP, images/s", 0.97,
           numerator=_train("ddp_ws1"), denominator=_train("fused_optim"), metric="images_per_s"),
    Target("train IMTA stage 2 (backbone BN train) vs stage 1, images/s", 2.5,
           numerator=_train("stage2_bn_train"), denominator=_train("fused_optim"), metric="images_per_s"),
    Target("train IMTA stage 2 (backbone BN eval) vs stage 1, images/s", 2.5,
           numerator=_train("stage2_bn_eval"), denominator=_train("fused_optim"), metric="images_per_s"),
    Target("train IMTA stage 2 vs stage 1 peak memory", 0.5,
           numerator=_train("stage2_bn_train"), denominator=_train("fused_optim"), metric="peak_mem_mb",
           higher_is_better=False),
    # ---- early exit (issue #10); owner: bench_evaluator. CPU: 1 thread, fp32, channels_last, folded BN,
    # micro-batches 'auto' (the evaluator's CPU default in wall-clock mode).
    *[Target(f"early exit {m} CPU B1024: worst wall-clock/FLOPs speedup over budgets with FLOPs x >= 1.5", 0.8,
             numerator=_ee_cpu(m), metric="min_clock_over_flops") for m in ("msdnet_cifar_anytime", "msdnet_mnist")],
    *[Target(f"early exit {m} CPU B1024: exit agreement with the simulated protocol", 0.999,
             numerator=_ee_cpu(m), metric="min_exit_agreement") for m in ("msdnet_cifar_anytime", "msdnet_mnist")],
    *[Target(f"early exit {m} CPU B1024: latency-model error vs wall clock", 0.10,
             numerator=_ee_cpu(m), metric="max_latency_model_error", higher_is_better=False)
      for m in ("msdnet_cifar_anytime", "msdnet_mnist")],
    Target("early exit msdnet_cifar_anytime CPU B1024: full network, whole stages / micro-batches (ms per image)", 1.5,
           numerator=_ee_cpu("msdnet_cifar_anytime", None), denominator=_ee_cpu("msdnet_cifar_anytime"),
           metric="full_ms_per_image", note="page faults and cache misses of B = 1024 activations (NOTES.md)"),
    *[Target(f"early exit {m} GPU B{b} bf16 CUDA graphs: worst wall-clock/FLOPs speedup", 0.8,
             numerator={"bench": "early_exit", "model": m, "device": "cuda", "batch_size": b, "impl": "cuda_graphs"},
             metric="min_clock_over_flops")
      for m in ("msdnet_cifar_anytime", "msdnet_mnist", "msdnet_imagenet_step4") for b in (256, 1024)],
    # ---- training methods (issue #11): per loaded batch vs ce, CPU or GPU; regression guards, lower is better.
    Target("distill step vs ce step, time per loaded batch", 1.10, numerator={"bench": "methods", "case": "distill"},
           denominator={"bench": "methods", "case": "ce"}, metric="median", higher_is_better=False),
    Target("l2w (meta-interval 1) step vs ce step, time per loaded batch", 5.0,
           numerator={"bench": "methods", "case": "l2w_i1"}, denominator={"bench": "methods", "case": "ce"},
           metric="median", higher_is_better=False, note="two half-batch real steps + two meta steps"),
]
