#!/usr/bin/env python
"""Train a multi-exit MSDNet: the MSDNet baseline (``--method ce``), IMTA stage 1 (``ge``) or
IMTA stage 2 (``imta --teacher STAGE1.pt``).  One process on CPU/GPU, or DDP under torchrun:

    python train.py --dataset mnist --method ge --epochs 10 --output runs/ge
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-dir /data/imagenet --amp --channels-last ...
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from imta_fast.train.checkpoint import CheckpointError, CheckpointManager, build_payload, capture_rng_state, \
    check_resume_compatible, load_checkpoint, restore_rng_state
from imta_fast.train.config import ConfigError, TrainConfig, parse_train_args
from imta_fast.data import DataError, build_dali_loader, build_data, build_eval_loader, build_train_loader, \
    samples_of
from imta_fast.distributed import all_gather_object, barrier, cleanup, init_distributed, seed_everything
from imta_fast.inference.protocol import anytime_accuracy
from imta_fast.train.engine import NonFiniteLossError, apply_channels_last, apply_compile, apply_ddp, apply_sync_bn, \
    build_lr_schedule, build_model, build_optimizer, compute_loss, load_teacher_state, train_one_epoch
from imta_fast.inference.predict import predict
from imta_fast.metrics import SummaryWriterCSV, environment_info, setup_logging

log = logging.getLogger("imta_fast")

# A resumed run must agree with its checkpoint on everything that shapes the model or the data.
RESUME_KEYS = ("dataset", "model", "method", "holdout_size", "isc_detach", "backbone_bn", "teacher", "image_size",
               "temperature", "gamma", "kl_reduction", "lr_schedule", "amp_dtype")


def train(cfg: TrainConfig) -> dict:
    """Runs the whole training; returns the final summary (rank 0's view)."""
    dist = init_distributed(cfg.device)
    seed_everything(cfg.seed, dist.rank)
    out = Path(cfg.output)
    if dist.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(str(out / "args.yaml"))
    setup_logging(str(out), dist.is_primary)
    log.info("environment: %s", environment_info())
    progress = cfg.progress and dist.is_primary and sys.stderr.isatty()

    # Data: the train / hold-out split is saved in the run dir and reloaded on resume and in eval.py.
    # Stage 2 inherits stage 1's split file, so no hold-out image can leak into training.
    if cfg.method == "imta" and dist.is_primary and not (out / "split.json").exists():
        teacher_split = Path(cfg.teacher).parent / "split.json"
        if teacher_split.is_file():
            shutil.copyfile(teacher_split, out / "split.json")
    barrier()
    data = build_data(cfg.dataset, cfg.data_dir, split_path=str(out / "split.json"), holdout_size=cfg.holdout_size,
                      holdout_transform=cfg.holdout_transform, seed=cfg.seed, image_size=cfg.image_size)
    if cfg.data_backend == "dali":  # decode + augment on the GPU (nvJPEG), CPU mode without CUDA
        train_loader, train_sampler = build_dali_loader(
            samples_of(data.train), batch_size=cfg.batch_size, train=True, seed=cfg.seed,
            device_id=dist.device.index if dist.device.type == "cuda" else None, shard_id=dist.rank,
            num_shards=dist.world_size, image_size=data.info.image_size, mean=data.info.mean, std=data.info.std,
            num_threads=max(cfg.workers, 2), channels_last=cfg.channels_last), None
    else:
        train_loader, train_sampler = build_train_loader(data.train, cfg.batch_size, cfg.workers, cfg.seed, dist)
    holdout_loader = build_eval_loader(data.holdout, cfg.batch_size * 2, cfg.workers, dist)
    if len(train_loader) == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train) // dist.world_size} "
                          f"training images per process: no full batch to train on")
    if cfg.holdout_size == 0:
        log.warning("--holdout-size 0: the hold-out is the test split, so best.pt and exit thresholds are "
                    "chosen on test (the reference without --use-valid)")
    log.info("data: %s, %d train / %d hold-out / %d test images, split sha256 %s", cfg.dataset, len(data.train),
             len(data.holdout), len(data.test), data.split.sha256[:12])

    # Resume (or fresh start), then the model, optimiser and schedule.
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
    scheduler = build_lr_schedule(optimizer, cfg.lr_schedule, cfg.epochs, len(train_loader) if not cfg.max_steps_per_epoch
                                  else min(cfg.max_steps_per_epoch, len(train_loader)), cfg.milestone_epochs(), cfg.lr_decay)
    # fp16 autocast needs loss scaling (bf16 and fp32 do not); apex's amp successor.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")
    start_epoch, step, best = 0, 0, -1.0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if "scaler" in payload:
            scaler.load_state_dict(payload["scaler"])
        if not restore_rng_state(payload["rng"], rank=dist.rank):  # resumed on more processes than saved
            seed_everything(cfg.seed + payload["epoch"] + 1, dist.rank)
        start_epoch, step, best = payload["epoch"] + 1, payload["step"], payload["metrics"]["best_holdout_top1"]
        log.info("resumed from %s at epoch %d (step %d)", resume_path, start_epoch, step)
        if payload["config"].get("lr") != cfg.lr:
            log.warning("--lr %g ignored: the optimizer and schedule resume with the checkpoint's lr %g",
                        cfg.lr, payload["config"].get("lr"))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s, method %s: %d exits, %.3f M trainable parameters", cfg.model, cfg.method, model.num_exits, n_params / 1e6)

    # Fast paths, each a named step: memory format, BN sync, compile, data parallelism.
    model = apply_sync_bn(model, cfg.sync_bn, dist)
    runner = apply_ddp(apply_compile(apply_channels_last(model, cfg.channels_last), cfg.compile), dist)

    def loss_fn(outputs, target):
        return compute_loss(outputs, target, cfg.method, cfg.temperature, cfg.gamma, cfg.kl_reduction, cfg.loss_impl)

    summary = SummaryWriterCSV(str(out / "summary.csv")) if dist.is_primary else None
    if summary is not None:
        summary.rewind(start_epoch)  # resuming from an older checkpoint re-runs (and re-logs) later epochs
    holdout_top1 = []
    epochs = tqdm(range(start_epoch, cfg.epochs), desc="epochs", initial=start_epoch, total=cfg.epochs,
                  disable=not progress, dynamic_ncols=True)
    for epoch in epochs:
        if train_sampler is not None:  # DALI reshuffles by itself
            train_sampler.set_epoch(epoch)
        stats, step = train_one_epoch(runner, train_loader, optimizer, scheduler, loss_fn, dist.device, epoch, step,
                                      cfg.amp, cfg.amp_dtype, cfg.channels_last, cfg.max_steps_per_epoch,
                                      cfg.log_interval, progress, scaler)
        logits, labels = predict(runner, holdout_loader, dist.device, cfg.amp, cfg.amp_dtype, cfg.channels_last)
        holdout_top1 = anytime_accuracy(logits, labels, topk=(1,))[1]
        is_best = holdout_top1[-1] > best  # selected on the hold-out split, never on test
        best = max(best, holdout_top1[-1])
        rng = all_gather_object(capture_rng_state())  # every rank's generators, restored per rank
        if dist.is_primary:
            payload = build_payload(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, step=step,
                                    config=cfg.to_dict(), split_sha256=data.split.sha256, rng=rng,
                                    scaler=scaler if scaler.is_enabled() else None,
                                    metrics={"holdout_top1": holdout_top1, "best_holdout_top1": best})
            payload["model_kwargs"] = {"num_classes": data.info.num_classes, "in_channels": data.info.in_channels,
                                       "image_size": data.info.image_size}
            ckpt.save(payload, is_best=is_best)
            row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"], "train_loss": stats.loss,
                   **{f"train_top1_exit{k + 1}": a for k, a in enumerate(stats.top1)},
                   **{f"holdout_top1_exit{k + 1}": a for k, a in enumerate(holdout_top1)},
                   "images_per_s": stats.images_per_second, "epoch_s": stats.seconds}
            summary.write(row)
        epochs.set_postfix(loss=f"{stats.loss:.4f}", holdout_top1=f"{holdout_top1[-1]:.2f}")
        log.info("epoch %d/%d  loss %.4f  hold-out top-1 per exit [%s]  %.0f img/s%s", epoch + 1, cfg.epochs, stats.loss,
                 " ".join(f"{a:.2f}" for a in holdout_top1), stats.images_per_second, "  *best" if is_best else "")
    return {"output": str(out), "epochs": cfg.epochs, "holdout_top1": holdout_top1, "best_holdout_top1": best}


def last_line(err: BaseException) -> str:
    """The message itself: errors raised in DataLoader workers arrive wrapped in a multi-line report."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_train_args(argv)
        train(cfg)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as err:
        print(f"error: {last_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is kept (resume with --resume auto)", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
