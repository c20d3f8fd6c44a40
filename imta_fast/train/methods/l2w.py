"""``--method l2w``: meta-learned per-sample exit weights (L2W, Han et al., ECCV 2022; docs/method.md §11).

A weight-prediction network (WPN: per-exit losses in, one tanh MLP) gives every training sample a weight per
exit (§11.2, §11.3).  It is trained by a meta step (§11.5): a *virtual* SGD step of the backbone on one
half-batch, weighted by the WPN, and a meta loss on the other half that scores each sample only at the exit
it would take under the target exit distribution (§11.4).  Then the backbone takes the real, weighted step;
the halves swap, so every loaded batch gives two real steps (§11.6).

Differences from the released code (each intentional, none changes the maths):

* The virtual step runs ``torch.func.functional_call`` on the live module with detached parameter views
  and cloned BN buffers (the virtual net's BN statistics are thrown away, as the reference throws its
  copy away), instead of building and loading a new model each time (docs/method.md §11.10).
* The meta gradient is taken forward-over-reverse by default (``--l2w-meta-grad jvp``: first-order backward
  passes plus one forward-mode JVP of the per-sample loss matrix) instead of differentiating through
  ``create_graph=True`` gradients (``double-backward``, the reference's way, kept as the plain path).  It is
  the same gradient (see :meth:`L2WMethod.meta_gradients`; tested equal and against finite differences).
* The exit allocation is a masked top-k on the device (no per-sample ``.item()``); equal confidences may
  break ties differently from the reference's sort.
* ``--meta-interval`` counts loaded batches over the whole run (the reference: within the epoch; the same
  when the interval divides the epoch length, and always at the default 1).
* The WPN's Adam learning rate follows the backbone's schedule factor (``lr / initial_lr``): the reference's
  per-iteration cosine for both when ``--lr-schedule cosine``.
* With fp16 autocast (GradScaler on) the meta step runs in fp32; with bf16 it runs under autocast and the
  losses are taken in fp32.

Under DDP the virtual step and the meta loss are per rank (the module inside DDP, no gradient all-reduce),
the WPN gradients are averaged over ranks before Adam (as DDP on the reference's WPN does), and the real
step goes through the DDP runner.  The WPN starts from the same seed on every rank.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from imta_fast.distributed import all_gather_cat, all_reduce_sum, get_world_size, is_dist_active, is_primary
from imta_fast.ops.dispatch import multi_exit_loss
from imta_fast.train.config import ConfigError
from imta_fast.train.methods.base import StepResult, TrainingMethod

__all__ = ["L2WMethod", "WeightPredictionNet", "gradient_coefficient", "META_GRADS", "allocate_exits", "allocated_meta_loss", "constrain_weights",
           "exit_counts", "per_sample_losses", "target_exit_distribution", "virtual_sgd_step", "CONSTRAINTS"]

CONSTRAINTS = ("sample", "matrix", "exit")  # the reference's 'col', 'mat', 'row'


# ----------------------------------------------------------------------------- the pieces (§11.2 - §11.5)
class WeightPredictionNet(nn.Module):
    """The WPN (docs/method.md §11.2): ``Linear(K, H) -> ReLU -> Linear(H, K) -> tanh``; output in (-1, 1).

    Shape: ``[B, K]`` per-exit losses -> ``[B, K]``.
    """

    def __init__(self, num_exits: int, hidden: int = 500):
        super().__init__()
        if num_exits < 1 or hidden < 1:
            raise ValueError(f"WPN needs num_exits >= 1 and hidden >= 1, got {num_exits}, {hidden}")
        self.hidden = nn.Linear(num_exits, hidden)
        self.out = nn.Linear(hidden, num_exits)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(F.relu(self.hidden(losses))))


def constrain_weights(u: torch.Tensor, epsilon: float, constraint: str) -> torch.Tensor:
    """``w = 1 + eps (u - mean)`` (docs/method.md §11.3); the mean over each sample's exits (``'sample'``,
    CIFAR), the whole ``[B, K]`` matrix (``'matrix'``, ImageNet) or each exit's batch (``'exit'``)."""
    if constraint == "sample":
        centred = u - u.mean(1, keepdim=True)
    elif constraint == "matrix":
        centred = u - u.mean()
    elif constraint == "exit":
        centred = u - u.mean(0, keepdim=True)
    else:
        raise ValueError(f"L2W constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    return 1.0 + epsilon * centred


def target_exit_distribution(num_exits: int, index: int = 15) -> torch.Tensor:
    """``pi_k = q^k / sum_j q^j``, ``q = index / 20``, k = 1..K (docs/method.md §11.4); float32 like the reference."""
    if not 1 <= index <= 39:
        raise ValueError(f"--l2w-target-index must be in 1..39 (q = index/20), got {index}")
    q = torch.tensor(index / 20.0, dtype=torch.float32)
    p = torch.exp(torch.log(q) * torch.arange(1, num_exits + 1))
    return p / p.sum()


def exit_counts(n: int, probs: torch.Tensor) -> List[int]:
    """Samples each exit takes out of ``n`` (host ints): ``floor(n pi_k)`` for the first ``K-1`` exits (float32
    product, as the reference), the rest to the last exit."""
    counts = [int(math.floor(float(torch.tensor(float(n), dtype=torch.float32) * probs[k])))
              for k in range(len(probs) - 1)]
    return counts + [n - sum(counts)]


def allocate_exits(confidence: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Greedy confidence-ranked exit allocation (docs/method.md §11.5 step 6), on the device.

    Exit ``k < K-1`` takes the ``counts[k]`` samples of highest exit-``k`` confidence among those not taken
    by earlier exits; the last exit takes the rest.

    Args:
        confidence: ``[n, K]`` max-softmax probability of every sample at every exit.
        counts: ``K`` host ints summing to ``n`` (:func:`exit_counts`).

    Returns:
        ``[n, K]`` bool, exactly one True per row.
    """
    n, K = confidence.shape
    taken = torch.zeros(n, dtype=torch.bool, device=confidence.device)
    cols = []
    for k in range(K - 1):
        score = confidence[:, k].masked_fill(taken, float("-inf"))
        idx = score.topk(counts[k]).indices
        sel = torch.zeros_like(taken).index_fill_(0, idx, True)
        taken = taken | sel
        cols.append(sel)
    cols.append(~taken)
    return torch.stack(cols, 1)


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype == torch.float64 else z.float()


def per_sample_losses(logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` cross entropy of every sample at every exit, in fp32 (fp64 logits stay fp64)."""
    return torch.stack([F.cross_entropy(_at_least_fp32(z), target, reduction="none") for z in logits], 1)


_INV_COUNTS: Dict[Tuple, torch.Tensor] = {}


def _inverse_counts(counts: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``1/count_k`` (0 for an empty exit) as a cached device tensor: no host-to-device copy per meta step."""
    key = (counts, str(device), dtype)
    if key not in _INV_COUNTS:
        _INV_COUNTS[key] = torch.tensor([1.0 / c if c else 0.0 for c in counts], dtype=dtype, device=device)
    return _INV_COUNTS[key]


def allocated_meta_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Meta loss (docs/method.md §11.5 step 7): ``sum_k`` mean CE of exit ``k`` over the samples allocated to it
    (exits with no sample skipped).  The allocation itself is not differentiated."""
    with torch.no_grad():
        conf = torch.stack([_at_least_fp32(z).softmax(-1).amax(-1) for z in logits], 1)
        assign = allocate_exits(conf, counts)
    ce = per_sample_losses(logits, target)
    scale = _inverse_counts(tuple(counts), ce.device, ce.dtype)
    return ((ce * assign).sum(0) * scale).sum()


def virtual_sgd_step(params: Dict[str, torch.Tensor], grads: Sequence[torch.Tensor],
                     optimizer: torch.optim.Optimizer, originals: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One SGD step as a function of the gradients (docs/method.md §11.5 step 5, the reference's MetaSGD).

    Uses each parameter's group in the real ``optimizer`` (lr, momentum, dampening, weight decay, nesterov)
    and its momentum buffer, read not updated::

        d = g + wd theta;  b = mu buf + (1 - dampening) d  (d if no buffer yet);  d = d + mu b if nesterov else b
        theta' = theta - lr d

    ``params`` are the leaves the gradients were taken for (``theta``, detached), ``originals`` the real
    parameters (to find group and state).  Returns ``{name: theta'}``, differentiable in ``grads``.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for (name, theta), grad in zip(params.items(), grads):
        if grad is None:  # unused in the forward: SGD skips a parameter without a gradient
            out[name] = theta
            continue
        group = group_of[id(originals[name])]
        if group.get("maximize", False):
            raise ValueError("L2W's virtual step does not support maximize=True")
        lr, mu, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
        d = grad + wd * theta if wd != 0 else grad
        if mu != 0:
            buf = optimizer.state.get(originals[name], {}).get("momentum_buffer")
            b = d if buf is None else mu * buf + (1.0 - group["dampening"]) * d
            d = d + mu * b if group["nesterov"] else b
        out[name] = theta - lr * d
    return out


def gradient_coefficient(group: dict, has_buffer: bool) -> float:
    """``c`` in ``theta' = theta - lr c g + (terms without g)`` for :func:`virtual_sgd_step`'s update."""
    mu, damp = group["momentum"], group["dampening"]
    if mu == 0:
        return 1.0
    b = (1.0 - damp) if has_buffer else 1.0  # d(buffer')/dg
    return 1.0 + mu * b if group["nesterov"] else b


META_GRADS = ("jvp", "double-backward")


# ----------------------------------------------------------------------------- the method
class L2WMethod(TrainingMethod):
    """``--method l2w`` (docs/method.md §11): two half-batch real steps per loaded batch, each preceded by a
    meta step every ``--meta-interval`` batches.

    ``StepResult.loss`` is the size-weighted mean of the two halves' weighted losses, i.e. the mean over the
    loaded batch of ``sum_k w_ik CE_ik`` (so ``loss * batch_size`` sums the per-sample losses as for the other
    methods); ``logits`` are both halves' logits (the first half's from before the first real update).

    State (``state_dict``): the WPN, its Adam state, the loaded-batch counter and the epoch counter (for the
    dump file names).
    """

    name = "l2w"

    def __init__(self, cfg, module: nn.Module = None, dist=None):
        super().__init__(cfg, module, dist)
        if module is None:
            raise ConfigError("--method l2w needs the model (its number of exits) to build the weight network")
        self.num_exits = int(module.num_exits)
        self.epsilon, self.constraint = float(cfg.l2w_epsilon), cfg.l2w_constraint
        for ok, message in ((self.constraint in CONSTRAINTS, f"--l2w-constraint must be one of {CONSTRAINTS}"),
                            (cfg.meta_interval >= 1, f"--meta-interval must be >= 1, got {cfg.meta_interval}"),
                            (1 <= cfg.l2w_target_index <= 39, "--l2w-target-index must be in 1..39 (q = index/20)"),
                            (cfg.meta_net_hidden >= 1, "--meta-net-hidden must be >= 1"),
                            (cfg.meta_lr >= 0 and cfg.meta_weight_decay >= 0, "--meta-lr and --meta-weight-decay "
                                                                              "must be >= 0")):
            if not ok:
                raise ConfigError(message)
        self.meta_interval, self.meta_lr = int(cfg.meta_interval), float(cfg.meta_lr)
        self.meta_grad = getattr(cfg, "l2w_meta_grad", "jvp")
        if self.meta_grad not in META_GRADS:
            raise ConfigError(f"--l2w-meta-grad must be one of {META_GRADS}, got {self.meta_grad!r}")
        self.probs = target_exit_distribution(self.num_exits, cfg.l2w_target_index)
        self.dump = bool(cfg.dump_weights)
        self.output = cfg.output
        device = next(module.parameters()).device
        with torch.random.fork_rng(devices=[]):  # the WPN is initialised on the CPU, then moved
            torch.manual_seed(cfg.seed)  # the same WPN on every rank, without touching the run's RNG streams
            self.wpn = WeightPredictionNet(self.num_exits, cfg.meta_net_hidden).to(device)
        self.meta_optimizer = torch.optim.Adam(self.wpn.parameters(), lr=self.meta_lr,
                                               weight_decay=cfg.meta_weight_decay)
        self.batches = 0  # loaded batches seen (meta-interval clock)
        self.epoch = 0
        self._counts: Dict[int, List[int]] = {}
        self._reset_epoch_stats(device)

    # ---------------------------------------------------------------- weights
    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` weights from per-exit losses (the WPN runs in fp32, outside autocast)."""
        dtype = self.wpn.out.weight.dtype
        with torch.autocast(losses.device.type, enabled=False):
            return constrain_weights(self.wpn(losses.detach().to(dtype)), self.epsilon, self.constraint)

    def counts(self, n: int) -> List[int]:
        if n not in self._counts:
            self._counts[n] = exit_counts(n, self.probs)
        return self._counts[n]

    # ---------------------------------------------------------------- meta step (§11.5)
    def meta_gradients(self, ctx, x_train, y_train, x_meta, y_meta) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """This rank's gradient of the meta loss w.r.t. the WPN parameters, and the meta loss (detached).

        ``theta'(phi) = theta - lr c g(phi) + const`` with ``g = (1/n) sum_ik w_ik(phi) grad_theta l_ik``, so
        ``dM/dphi = -(1/n) sum_ik grad_phi w_ik * <grad_theta l_ik, lr c dM/dtheta'>``.  ``'jvp'`` (default)
        evaluates the inner products as one forward-mode JVP of the ``[n, K]`` loss matrix (first-order passes
        plus one forward); ``'double-backward'`` differentiates through ``create_graph=True`` gradients, as the
        reference does.  Same maths; the tests check them against each other and finite differences.
        """
        module = ctx.module
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        theta = {n: p.detach().requires_grad_() for n, p in trainable.items()}  # views, no copies
        frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
        amp = nullcontext() if ctx.scaler.is_enabled() else ctx.autocast()  # fp16: fp32 meta step

        def forward(params, x):  # BN running stats of the virtual net go to clones and are thrown away
            buffers = {n: b.clone() for n, b in module.named_buffers()}
            with amp:
                return functional_call(module, {**params, **frozen, **buffers}, (x,))[0]

        losses = per_sample_losses(forward(theta, x_train), y_train)
        w = self.weights(losses)  # graph to phi
        second_order = self.meta_grad == "double-backward"
        virtual_loss = ((w if second_order else w.detach()) * losses).mean(0).sum()
        grads = torch.autograd.grad(virtual_loss, list(theta.values()), create_graph=second_order, allow_unused=True)
        with torch.set_grad_enabled(second_order):
            theta_new = virtual_sgd_step(theta, grads, ctx.optimizer, trainable)
        if not second_order:
            theta_new = {n: t.detach().requires_grad_() for n, t in theta_new.items()}
        meta_loss = allocated_meta_loss(forward(theta_new, x_meta), y_meta, self.counts(x_meta.shape[0]))
        phi = list(self.wpn.parameters())
        if second_order:
            return list(torch.autograd.grad(meta_loss, phi)), meta_loss.detach()
        v = torch.autograd.grad(meta_loss, list(theta_new.values()), allow_unused=True)
        group_of = {id(p): g for g in ctx.optimizer.param_groups for p in g["params"]}
        tangent = {}
        for (name, p), g, vp in zip(trainable.items(), grads, v):
            if g is None or vp is None:  # theta' does not depend on phi here (or M not on theta')
                tangent[name] = torch.zeros_like(theta[name])
                continue
            group = group_of[id(p)]
            has_buf = ctx.optimizer.state.get(p, {}).get("momentum_buffer") is not None
            tangent[name] = vp * (float(group["lr"]) * gradient_coefficient(group, has_buf))
        plain = {n: t.detach() for n, t in theta.items()}
        _, jvp = torch.func.jvp(lambda params: per_sample_losses(forward(params, x_train), y_train), (plain,),
                                (tangent,))
        phi_grads = torch.autograd.grad(-(w * jvp.detach()).mean(0).sum(), phi)
        return list(phi_grads), meta_loss.detach()

    def meta_update(self, ctx, x_train, y_train, x_meta, y_meta) -> torch.Tensor:
        """Meta gradients, averaged over DDP ranks, then one Adam step on the WPN; returns the meta loss."""
        grads, meta_loss = self.meta_gradients(ctx, x_train, y_train, x_meta, y_meta)
        if is_dist_active():
            flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / get_world_size()
            grads = list(torch.split(flat, [g.numel() for g in grads]))
        for p, g in zip(self.wpn.parameters(), grads):
            p.grad = g.reshape(p.shape)
        group = ctx.optimizer.param_groups[0]
        factor = float(group["lr"]) / float(group.get("initial_lr", group["lr"]) or 1.0)
        for g in self.meta_optimizer.param_groups:
            g["lr"] = self.meta_lr * factor
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        return meta_loss

    # ---------------------------------------------------------------- real step (§11.6)
    def real_step(self, ctx, x, y, step_scheduler: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        with ctx.autocast():
            logits = list(ctx.model(x)[0])
        with torch.no_grad():
            losses = per_sample_losses(logits, y)
            w = self.weights(losses)
            self._record(losses, logits, w)
        loss = multi_exit_loss(logits, y, sample_weights=w, impl=ctx.loss_impl)  # sum_k mean_i w_ik CE_ik
        ctx.apply_gradients(loss, step_scheduler=step_scheduler)
        return loss.detach(), [z.detach() for z in logits]

    def train_step(self, ctx, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        B = y.shape[0]
        if B < 2:
            raise ConfigError(f"--method l2w splits every batch in two halves: needs >= 2 samples, got {B}")
        xs, ys = x.chunk(2), y.chunk(2)
        meta_due = self.batches % self.meta_interval == 0
        total, parts = None, []
        for i, j in ((0, 1), (1, 0)):
            if meta_due:
                self.meta_update(ctx, xs[i], ys[i], xs[j], ys[j])
            loss, logits = self.real_step(ctx, xs[i], ys[i], step_scheduler=i == 1)  # one schedule step per batch
            part = loss * (ys[i].shape[0] / B)
            total = part if total is None else total + part
            parts.append(logits)
        self.batches += 1
        return StepResult(total, [torch.cat([a, b]) for a, b in zip(*parts)], B)

    # ---------------------------------------------------------------- bookkeeping
    def _reset_epoch_stats(self, device) -> None:
        self._w_sum = torch.zeros(self.num_exits, dtype=torch.float64, device=device)
        self._w_count = 0
        self._dump: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _record(self, losses, logits, w) -> None:
        if self._w_sum.device != w.device:
            self._w_sum = self._w_sum.to(w.device)
        self._w_sum += w.sum(0).double()
        self._w_count += w.shape[0]
        if self.dump:
            conf = torch.stack([_at_least_fp32(z).softmax(-1).amax(-1) for z in logits], 1)
            self._dump.append((losses, conf, w))

    def epoch_metrics(self) -> Dict[str, float]:
        """Mean weight per exit over the epoch (all ranks); writes the per-sample dump when ``--dump-weights``."""
        w_sum = all_reduce_sum(self._w_sum)
        n = int(all_reduce_sum(torch.tensor([self._w_count], dtype=torch.int64, device=w_sum.device)))
        mean = (w_sum / max(n, 1)).tolist()
        if self.dump:
            self._write_dump()
        self._reset_epoch_stats(self._w_sum.device)
        self.epoch += 1
        return {f"l2w_weight_exit{k + 1}": v for k, v in enumerate(mean)}

    def _write_dump(self) -> None:
        from imta_fast.fileio import atomic_torch_save

        K, dev = self.num_exits, self._w_sum.device
        cols = [torch.cat([rec[i] for rec in self._dump]) if self._dump else torch.zeros(0, K, device=dev)
                for i in range(3)]
        cols = [all_gather_cat(c.contiguous()) for c in cols]
        if is_primary():
            path = os.path.join(self.output, "l2w", f"epoch{self.epoch:04d}.pt")
            atomic_torch_save(path, {"losses": cols[0].cpu(), "confidences": cols[1].cpu(),
                                     "weights": cols[2].cpu()})

    def state_dict(self) -> Dict:
        return {"wpn": {k: v.detach().cpu().clone() for k, v in self.wpn.state_dict().items()},
                "meta_optimizer": self.meta_optimizer.state_dict(), "batches": self.batches, "epoch": self.epoch}

    def load_state_dict(self, state: Dict) -> None:
        missing = {"wpn", "meta_optimizer", "batches", "epoch"} - set(state)
        if missing:
            raise ValueError(f"l2w state lacks {sorted(missing)} (checkpoint of another method?)")
        self.wpn.load_state_dict(state["wpn"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.batches, self.epoch = int(state["batches"]), int(state["epoch"])

