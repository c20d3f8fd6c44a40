"""``--method distill``: multi-exit self-distillation with an annealed temperature (Phuong & Lampert, ICCV 2019).

The last exit, detached, teaches every earlier exit from the same forward pass (docs/method.md §10.1)::

    L = g [ (1-C) CE(z_K, y) + sum_{k<K} ( (1-C) CE(z_k, y) + C T^2 H(p_T(z_K), p_T(z_k)) ) ],   g = 10/K

``H`` is the soft cross-entropy averaged over the batch.  One global temperature ``T`` (docs/method.md
§10.2) starts at 1 and is multiplied by 1.05 after every training step while the teacher's batch-mean top
probability at ``T`` exceeds 0.5; it never decreases.  ``--distill-temperature`` fixes ``T`` instead (the
reference's ``DistillationLossConstTemp``).

Keeping the decision on the device: ``T`` is a float64 device tensor updated with ``torch.where``, so a
step never reads a value back to the host.  The fused loss op takes ``T`` as a Python float, so with an
annealed ``T`` the early exits are handed to it a second time already divided by ``T`` (see
:func:`distill_loss`); a fixed ``T`` goes to the op directly.  Under DDP the teacher statistic is
averaged over ranks before the comparison (one scalar all-reduce per step), so every rank takes the same
decision and it equals the single-process decision on the concatenated batch (equal per-rank batches).
``T`` is training state: saved in ``state_dict``, restored on resume, reported per epoch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from imta_fast.distributed import all_reduce_mean
from imta_fast.ops.dispatch import multi_exit_loss
from imta_fast.train.config import ConfigError
from imta_fast.train.methods.base import TrainingMethod

__all__ = ["AnnealedTemperature", "DistillMethod", "distill_loss", "global_scale"]


def global_scale(num_exits: int) -> float:
    """The reference's loss rescale ``g = 2 * 5 / K`` (docs/method.md §10.1)."""
    return 10.0 / num_exits


def distill_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, temperature: Union[float, torch.Tensor], *,
                 C: float = 0.5, scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """The Phuong & Lampert loss (docs/method.md §10.1) through :func:`imta_fast.ops.dispatch.multi_exit_loss`.

    Args:
        logits: ``K`` tensors ``[B, C]``; the last one is the (detached) teacher.
        target: ``[B]`` class indices.
        temperature: a Python float (passed to the op as is) or a 0-dim device tensor (never read on
            the host: see below).
        C: distillation weight; early exits get ``(1-C) CE + C T^2 H``, the last exit ``(1-C) CE``.
        scale: global factor ``g``; default ``10 / K``.
        impl: loss implementation (``'auto'``, ``'torch'``, ``'triton'``).

    With a tensor ``T`` the op runs on ``2K-1`` stacked rows: rows ``0..K-1`` are the raw logits and
    carry the CE terms only (``kd_exits`` excludes them); rows ``K..2K-2`` are ``z_k / T`` (fp32) with the
    teacher ``z_K / T`` at op temperature 1, ``kd_weight = 1`` (so their CE coefficient is 0) and exit
    weights ``g C T^2`` built on the device.  ``softmax((z/T)/1) = softmax(z/T)``, so this is the same
    loss, and autograd carries the ``1/T`` of the division into the gradient.

    Returns:
        float32 scalar.
    """
    logits = list(logits)
    K = len(logits)
    g = global_scale(K) if scale is None else float(scale)
    teacher = logits[-1].detach()
    if K == 1:
        return multi_exit_loss(logits, target, exit_weights=[g * (1.0 - C)], impl=impl)
    if not isinstance(temperature, torch.Tensor):
        return multi_exit_loss(logits, target, teacher, temperature=float(temperature), kd_weight=C,
                               exit_weights=[g] * (K - 1) + [g * (1.0 - C)], kd_form="soft_ce",
                               kl_reduction="batchmean", kd_exits=range(K - 1), impl=impl)
    T = temperature.detach().float()
    rows = torch.stack([z.float() for z in logits] + [z.float() / T for z in logits[:-1]])  # [2K-1, B, C]
    ce_w = torch.full((K,), g * (1.0 - C), dtype=torch.float32, device=T.device)
    kd_w = (g * C) * (T * T).expand(K - 1)
    return multi_exit_loss(rows, target, teacher.float() / T, temperature=1.0, kd_weight=1.0,
                           exit_weights=torch.cat([ce_w, kd_w]), kd_form="soft_ce", kl_reduction="batchmean",
                           kd_exits=range(K, 2 * K - 1), impl=impl)


class AnnealedTemperature:
    """The global temperature of docs/method.md §10.2, kept on the device.

    ``update(teacher_logits)``: ``m = mean_b max_c softmax(t_b / T)``, averaged over DDP ranks; then
    ``T <- T * factor`` if ``m > threshold``.  No host sync: ``T`` is a float64 0-dim tensor and the
    comparison is a ``torch.where``.  The epoch mean of ``m`` is accumulated for the summary.
    """

    def __init__(self, init: float = 1.0, factor: float = 1.05, threshold: float = 0.5):
        if not (init > 0 and factor >= 1.0 and 0.0 < threshold < 1.0):
            raise ValueError(f"annealed temperature needs init > 0, factor >= 1, 0 < threshold < 1; got "
                             f"init={init}, factor={factor}, threshold={threshold}")
        self.factor, self.threshold = float(factor), float(threshold)
        self.value = torch.tensor(float(init), dtype=torch.float64)
        self._m_sum = torch.zeros((), dtype=torch.float64)
        self._m_count = 0

    def to(self, device: torch.device) -> "AnnealedTemperature":
        self.value = self.value.to(device)
        self._m_sum = self._m_sum.to(device)
        return self

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """One step of the schedule; returns the (rank-averaged) statistic ``m`` as a device tensor."""
        if self.value.device != teacher_logits.device:
            self.to(teacher_logits.device)
        p = (teacher_logits.detach().float() / self.value.float()).softmax(-1)
        m = all_reduce_mean(p.amax(-1).mean().double())  # a copy in one process; the rank mean under DDP
        self.value.copy_(torch.where(m > self.threshold, self.value * self.factor, self.value))
        self._m_sum += m
        self._m_count += 1
        return m

    def epoch_metrics(self) -> Dict[str, float]:
        """``temperature`` (after the epoch's last step) and the epoch-mean ``teacher_maxprob``; resets the mean.

        The one host read of the epoch."""
        out = {"temperature": float(self.value),
               "teacher_maxprob": float(self._m_sum) / self._m_count if self._m_count else float("nan")}
        self._m_sum.zero_()
        self._m_count = 0
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"temperature": self.value.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        t = torch.as_tensor(state["temperature"], dtype=torch.float64)
        if t.dim() != 0 or not bool(t > 0):
            raise ValueError(f"distill state: temperature must be a positive scalar, got {t}")
        self.value = t.clone().to(self.value.device)


class DistillMethod(TrainingMethod):
    """``--method distill`` (docs/method.md §10): the default train step with the distillation loss, then
    one temperature update per step (annealed mode).

    Config: ``distill_c`` (C), ``distill_temperature`` (None: annealed from 1; a number: fixed T),
    ``distill_anneal_factor`` (1.05), ``distill_anneal_threshold`` (0.5), ``loss_impl``.
    """

    name = "distill"

    def __init__(self, cfg, module=None, dist=None):
        super().__init__(cfg, module, dist)
        self.C = float(cfg.distill_c)
        if not 0.0 <= self.C <= 1.0:
            raise ConfigError(f"--distill-c must be in [0, 1], got {self.C}")
        self.loss_impl = cfg.loss_impl
        self.fixed_temperature = cfg.distill_temperature
        if self.fixed_temperature is not None and not self.fixed_temperature > 0:
            raise ConfigError(f"--distill-temperature must be > 0, got {self.fixed_temperature}")
        if self.fixed_temperature is None:
            try:
                self.schedule = AnnealedTemperature(1.0, cfg.distill_anneal_factor, cfg.distill_anneal_threshold)
            except ValueError as err:
                raise ConfigError(f"--distill-anneal-factor / --distill-anneal-threshold: {err}") from None
        else:
            self.schedule = None

    @property
    def temperature(self) -> Union[float, torch.Tensor]:
        """The current T: the fixed float, or the device tensor of the annealed schedule."""
        return self.fixed_temperature if self.schedule is None else self.schedule.value

    def loss(self, outputs, target: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        logits = list(outputs[0])
        if self.schedule is not None and self.schedule.value.device != logits[-1].device:
            self.schedule.to(logits[-1].device)
        return distill_loss(logits, target, self.temperature, C=self.C, impl=self.loss_impl), logits

    def after_step(self, outputs) -> None:
        # The reference updates T after computing the step's loss, from the same teacher logits at the old T.
        if self.schedule is not None:
            self.schedule.update(outputs[0][-1])

    def epoch_metrics(self) -> Dict[str, float]:
        if self.schedule is None:
            return {"temperature": float(self.fixed_temperature)}
        return self.schedule.epoch_metrics()

    def state_dict(self) -> Dict:
        return {} if self.schedule is None else self.schedule.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        if self.schedule is not None:
            if "temperature" not in state:
                raise ValueError("distill state has no temperature (checkpoint of a fixed-T or another method?)")
            self.schedule.load_state_dict(state)
