"""The whole training run, top to bottom: run directory, data, model, step context, resume, epochs.

``train(cfg)`` is what ``train.py`` calls; every piece it uses is built by a named function, so the
order of construction (which fixes the random streams and therefore the results) is visible here.
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from imta_fast.data import build_data, make_loader
from imta_fast.distributed import DistInfo, all_gather_object, barrier, init_distributed, seed_everything
from imta_fast.inference.predict import predict
from imta_fast.inference.protocol import anytime_accuracy
from imta_fast.metrics import SummaryWriterCSV, environment_info, setup_logging
from imta_fast.models.build import build_model
from imta_fast.train.checkpoint import (CheckpointError, CheckpointManager, ModelState, TrainState, capture_rng_state,
                                        check_resume_compatible, load_checkpoint, payload_from_states,
                                        restore_rng_state, restore_states)
from imta_fast.train.config import ConfigError, TrainConfig
from imta_fast.train.loop import train_one_epoch
from imta_fast.train.methods import build_method
from imta_fast.train.optim import build_lr_schedule, build_optimizer
from imta_fast.train.parallel import apply_channels_last, apply_compile, apply_ddp, apply_sync_bn
from imta_fast.train.step import StepContext

__all__ = ["train", "RESUME_KEYS", "load_teacher_state"]

log = logging.getLogger("imta_fast")

# A resumed run must agree with its checkpoint on everything that shapes the model or the data.
RESUME_KEYS = ("dataset", "model", "method", "holdout_size", "isc_detach", "backbone_bn", "teacher", "image_size",
               "temperature", "gamma", "kl_reduction", "lr_schedule", "amp_dtype",
               "distill_c", "distill_temperature", "distill_anneal_factor", "distill_anneal_threshold",
               "meta_net_hidden", "meta_interval", "meta_lr", "l2w_constraint", "l2w_epsilon", "l2w_target_index",
               "l2w_meta_grad")


def load_teacher_state(path: str, config: Dict, split_sha256: str) -> Dict:
    """Stage-1 weights for stage 2; refuses a checkpoint of another model/dataset or data split
    (a different split would leak stage-1 hold-out images into training, docs/method.md §9.1 item 7)."""
    payload = load_checkpoint(path)
    saved = payload["config"]
    if payload.get("split_sha256") != split_sha256:
        raise CheckpointError(f"--teacher {path}: it was trained on another train/hold-out split than this run's "
                              f"split.json; start stage 2 in a fresh --output so the teacher's split is copied")
    for key in ("model", "dataset"):
        if saved.get(key) != config[key]:
            raise CheckpointError(f"--teacher {path}: it was trained with {key}={saved.get(key)!r}, "
                                  f"this run has {key}={config[key]!r}")
    if saved.get("method") == "imta":
        raise CheckpointError(f"--teacher {path}: is a stage-2 (imta) checkpoint; pass the stage-1 (ge) one")
    if saved.get("method") != "ge":
        log.warning("--teacher %s was trained with method=%s, not ge (IMTA's stage 1)", path, saved.get("method"))
    return payload["model"]


def prepare_run_dir(cfg: TrainConfig, dist: DistInfo) -> Path:
    """Create the run directory, save args.yaml, set up logging; stage 2 inherits stage 1's split file,
    so no hold-out image can leak into training."""
    out = Path(cfg.output)
    if dist.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(str(out / "args.yaml"))
        if cfg.method == "imta" and not (out / "split.json").exists():
            teacher_split = Path(cfg.teacher).parent / "split.json"
            if teacher_split.is_file():
                shutil.copyfile(teacher_split, out / "split.json")
    setup_logging(str(out), dist.is_primary)
    log.info("environment: %s", environment_info())
    barrier()
    return out


def build_train_loaders(cfg: TrainConfig, data, dist: DistInfo):
    """(train loader, hold-out loader) of the chosen backend (``--data-backend``, see imta_fast.data.backends)."""
    common = dict(backend=cfg.data_backend, workers=cfg.workers, seed=cfg.seed, dist=dist,
                  skip_corrupt=cfg.skip_corrupt)
    train_loader = make_loader(data.train, train=True, batch_size=cfg.batch_size, channels_last=cfg.channels_last,
                               **common)
    holdout_loader = make_loader(data.holdout, train=False, batch_size=cfg.batch_size * 2, **common)
    if len(train_loader) == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train) // dist.world_size} "
                          f"training images per process: no full batch to train on")
    return train_loader, holdout_loader


def train(cfg: TrainConfig) -> dict:
    """Runs the whole training; returns the final summary (rank 0's view)."""
    dist = init_distributed(cfg.device)
    seed_everything(cfg.seed, dist.rank)
    out = prepare_run_dir(cfg, dist)
    progress = cfg.progress and dist.is_primary and sys.stderr.isatty()

    # Data: the train / hold-out split is saved in the run dir and reloaded on resume and in eval.py.
    data = build_data(cfg.dataset, cfg.data_dir, split_path=str(out / "split.json"), holdout_size=cfg.holdout_size,
                      holdout_transform=cfg.holdout_transform, seed=cfg.seed, image_size=cfg.image_size)
    train_loader, holdout_loader = build_train_loaders(cfg, data, dist)
    if cfg.holdout_size == 0:
        log.warning("--holdout-size 0: the hold-out is the test split, so best.pt and exit thresholds are "
                    "chosen on test (the reference without --use-valid)")
    log.info("data: %s, %d train / %d hold-out / %d test images, split sha256 %s", cfg.dataset, len(data.train),
             len(data.holdout), len(data.test), data.split.sha256[:12])
    model_kwargs = {"num_classes": data.info.num_classes, "in_channels": data.info.in_channels,
                    "image_size": data.info.image_size}

    # Resume (or fresh start), then the model, optimiser, schedule and method.
    ckpt = CheckpointManager(str(out))
    resume_path = ckpt.resolve_resume(cfg.resume)
    payload = load_checkpoint(resume_path) if resume_path else None
    if payload is not None:
        check_resume_compatible(payload["config"], cfg.to_dict(), RESUME_KEYS)
        if payload["split_sha256"] != data.split.sha256:
            raise CheckpointError(f"cannot resume from {resume_path}: its data split differs from {out / 'split.json'}")
    teacher_state = None
    if cfg.method == "imta" and payload is None:
        teacher_state = load_teacher_state(cfg.teacher, cfg.to_dict(), data.split.sha256)
    model = build_model(cfg.to_dict(), data.info.num_classes, data.info.in_channels, teacher_state).to(dist.device)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov, dist.device)
    steps_per_epoch = min(cfg.max_steps_per_epoch, len(train_loader)) if cfg.max_steps_per_epoch else len(train_loader)
    scheduler = build_lr_schedule(optimizer, cfg.lr_schedule, cfg.epochs, steps_per_epoch, cfg.milestone_epochs(),
                                  cfg.lr_decay)
    # fp16 autocast needs loss scaling (bf16 and fp32 do not); apex's amp successor.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")
    method = build_method(cfg, model, dist)
    states = {"model": ModelState(model), "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
              "method": method}
    state = TrainState()
    if payload is not None:
        state = restore_states(payload, states)
        if not restore_rng_state(payload["rng"], rank=dist.rank):  # resumed on more processes than saved
            seed_everything(cfg.seed + payload["epoch"] + 1, dist.rank)
        log.info("resumed from %s at epoch %d (step %d)", resume_path, state.next_epoch, state.step)
        if payload["config"].get("lr") != cfg.lr:
            log.warning("--lr %g ignored: the optimizer and schedule resume with the checkpoint's lr %g",
                        cfg.lr, payload["config"].get("lr"))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s, method %s: %d exits, %.3f M trainable parameters", cfg.model, cfg.method, model.num_exits,
             n_params / 1e6)

    # Fast paths, each a named step: memory format, BN sync, compile, data parallelism.
    model = apply_sync_bn(model, cfg.sync_bn, dist)
    runner = apply_ddp(apply_compile(apply_channels_last(model, cfg.channels_last), cfg.compile), dist)
    ctx = StepContext(model=runner, module=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dist=dist,
                      amp=cfg.amp, amp_dtype=cfg.amp_dtype, channels_last=cfg.channels_last, loss_impl=cfg.loss_impl)

    summary = SummaryWriterCSV(str(out / "summary.csv")) if dist.is_primary else None
    if summary is not None:
        summary.rewind(state.next_epoch)  # resuming from an older checkpoint re-runs (and re-logs) later epochs
    epochs = tqdm(range(state.next_epoch, cfg.epochs), desc="epochs", initial=state.next_epoch, total=cfg.epochs,
                  disable=not progress, dynamic_ncols=True)
    for epoch in epochs:
        train_loader.set_epoch(epoch)  # the epoch's order and augmentation draws: f(seed, epoch, rank)
        stats, step = train_one_epoch(ctx, method, train_loader, epoch=epoch, start_step=state.step,
                                      max_steps=cfg.max_steps_per_epoch, log_interval=cfg.log_interval,
                                      progress=progress)
        logits, labels = predict(runner, holdout_loader, dist.device, cfg.amp, cfg.amp_dtype, cfg.channels_last)
        holdout_top1 = anytime_accuracy(logits, labels, topk=(1,))[1]
        is_best = holdout_top1[-1] > state.best_holdout_top1  # selected on the hold-out split, never on test
        state = TrainState(epoch=epoch, step=step, holdout_top1=holdout_top1,
                           best_holdout_top1=max(state.best_holdout_top1, holdout_top1[-1]))
        method_metrics = method.epoch_metrics()
        if train_loader.skipped:
            log.warning("%d unreadable image(s) skipped so far (--skip-corrupt), e.g. %s", len(train_loader.skipped),
                        train_loader.skipped[0])
        rng = all_gather_object(capture_rng_state())  # every rank's generators, restored per rank
        if dist.is_primary:
            ckpt.save(payload_from_states(states, state, config=cfg.to_dict(), split_sha256=data.split.sha256,
                                          model_kwargs=model_kwargs, rng=rng), is_best=is_best)
            summary.write({"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                           "train_loss": stats.loss,
                           **{f"train_top1_exit{k + 1}": a for k, a in enumerate(stats.top1)},
                           **{f"holdout_top1_exit{k + 1}": a for k, a in enumerate(holdout_top1)},
                           **method_metrics, "images_per_s": stats.images_per_second, "epoch_s": stats.seconds})
        epochs.set_postfix(loss=f"{stats.loss:.4f}", holdout_top1=f"{holdout_top1[-1]:.2f}")
        log.info("epoch %d/%d  loss %.4f  hold-out top-1 per exit [%s]  %.0f img/s%s", epoch + 1, cfg.epochs,
                 stats.loss, " ".join(f"{a:.2f}" for a in holdout_top1), stats.images_per_second,
                 "  *best" if is_best else "")
    return {"output": str(out), "epochs": cfg.epochs, "holdout_top1": state.holdout_top1,
            "best_holdout_top1": state.best_holdout_top1}
