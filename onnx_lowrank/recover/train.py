"""The distillation loop: Adam on the student's trainable weights, loss (losses.REGISTRY: NMSE by default)
of its outputs against the teacher's, early stop on the held-back images by the same loss, the best epoch kept.

Runs under fixed torch threads and deterministic algorithms, so one seed gives one set of bytes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from .. import progress
from . import augment
from .losses import NMSE, Loss
from .student import Student


#: Fit loss below this share of the held-back loss before training: the solver has fitted the fit
#: images themselves (EfficientNet-Lite0, benchmarks/results/section_recover2.md: 0.037 against 0.139).
OVERFIT_GAP = 0.5


@contextmanager
def deterministic(threads: int, seed: int):
    """Fixed threads and deterministic kernels for the run; the caller's torch settings come back after."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _tensors(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}


def set_losses(student: Student, data: dict, targets: list[np.ndarray], batch: int, losses: list[Loss]
               ) -> list[float]:
    """Each loss over a whole set of images, the held-back ones or (before training) the fit ones, in
    float64: numerators and denominators summed over batches first, then the ratio."""
    n = len(next(iter(data.values())))
    num = np.zeros((len(losses), len(targets)))
    den = np.zeros((len(losses), len(targets)))
    with torch.no_grad():
        for i in range(0, n, batch):
            out = student(_tensors({k: v[i:i + batch] for k, v in data.items()}))
            for j, (s, t) in enumerate(zip(out, targets)):
                t = torch.from_numpy(t[i:i + batch]).double()
                for k, loss in enumerate(losses):
                    a, b = loss.parts(s.double(), t)
                    num[k, j] += float(a)
                    den[k, j] += float(b)
    return [float(np.mean(num[k] / np.maximum(den[k], 1e-12))) for k in range(len(losses))]


def _groups(student: Student, lr: float) -> list[dict]:
    """One Adam group per weight tensor with lr relative to the tensor's RMS: a step changes every
    tensor by the same fraction, whatever the scale the solver gave it (factor pairs can be very
    unequal), so one default suits any model. Biases near zero use a floor of 1 % of the largest
    weight RMS. Only biases: a weight far below the floor is one factor of a pair scaled apart, and a
    step set by another layer's scale (a bias of RMS 170 in the PP-OCRv4 detector) moves it many times
    its own size (benchmarks/results/recover_det_notes.reading.md)."""
    params = student.parameters()
    rms = [float(p.detach().pow(2).mean().sqrt()) for p in params]
    floor = 0.01 * max([r for p, r in zip(params, rms) if p.dim() > 1] + [1e-12])
    return [{"params": [p], "lr": lr * (max(r, floor) if p.dim() == 1 else r)} for p, r in zip(params, rms)]


def fit(student: Student, teacher, fit_data: dict, held: dict, cfg, augmentations: list[str], loss_fn: Loss) -> dict:
    """Train on ``loss_fn``; leave the student at its best epoch by it; return the per-epoch record (with
    the held-back NMSE beside, so runs with different losses compare)."""
    rng = np.random.default_rng(cfg.seed)
    held_targets = teacher(held)
    plain_targets = teacher(fit_data)
    for name, t in zip(student.outputs, held_targets):
        loss_fn.check(name, t.shape)
    judged = [loss_fn] + ([NMSE()] if loss_fn.name != NMSE.name else [])

    def held_back() -> tuple[float, float]:
        values = set_losses(student, held, held_targets, cfg.batch_size, judged)
        return values[0], values[-1]

    n = len(next(iter(fit_data.values())))
    opt = torch.optim.Adam(_groups(student, cfg.lr), lr=cfg.lr)
    steps_per_epoch = -(-n // cfg.batch_size)
    # Warm up over the first epoch: Adam's first steps move every weight by about lr at once.
    warm = cfg.warmup or steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    best, nmse_before = held_back()
    fit_before = set_losses(student, fit_data, plain_targets, cfg.batch_size, [loss_fn])[0]
    epochs = [{"epoch": 0, "fit_loss": fit_before, "held_back_loss": best, "held_back_nmse": nmse_before,
               "seconds": 0.0}]
    best_nmse = nmse_before
    progress.log(f"recovery: before training, fit loss {fit_before:.5g}, held-back loss {best:.5g}")
    if fit_before < OVERFIT_GAP * best:
        progress.log("recovery: the factorised model fits these images far better than the held-back ones (the "
                     "compression was fitted to them), so training on them has little that carries over: give "
                     "recover other images than the compression's calibration data")
    best_state, kept, stale = student.state(), 0, 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(n)
        total, count = 0.0, 0
        with progress.bar(f"recovery epoch {epoch}/{cfg.epochs}", n, "img") as update:
            for i in range(0, n, cfg.batch_size):
                idx = np.sort(order[i:i + cfg.batch_size])
                feed = {k: v[idx] for k, v in fit_data.items()}
                if augmentations:
                    feed = augment.apply(augmentations, feed, rng)
                    targets = teacher(feed)
                else:
                    targets = [t[idx] for t in plain_targets]
                loss = loss_fn(student(_tensors(feed)), [torch.from_numpy(t) for t in targets])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
                update(len(idx))
                if cfg.time_limit and time.perf_counter() - t0 > cfg.time_limit:
                    break   # a partial epoch still gets its held-back check below
        held_loss, held_nmse = held_back()
        better = held_loss < best
        epochs.append({"epoch": epoch, "fit_loss": total / count, "held_back_loss": held_loss,
                       "held_back_nmse": held_nmse, "seconds": time.perf_counter() - t0, "images": count})
        progress.log(f"recovery: epoch {epoch}/{cfg.epochs}, fit loss {total / count:.5g}, held-back loss "
                     f"{held_loss:.5g}" + (" (best so far)" if better else ""))
        if better:
            best, best_nmse, best_state, kept, stale = held_loss, held_nmse, student.state(), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience and epoch < cfg.epochs:
                progress.log(f"recovery: no better held-back loss for {stale} epochs, stopping early")
                break
        if cfg.time_limit and time.perf_counter() - t0 > cfg.time_limit:
            progress.log(f"recovery: time limit of {cfg.time_limit:g} s reached, stopping")
            break
    student.load(best_state)
    return {"epochs": epochs, "epoch_kept": kept, "fit_loss_before": fit_before,
            "held_back_loss_before": epochs[0]["held_back_loss"],
            "held_back_loss_after": best, "held_back_nmse_before": nmse_before, "held_back_nmse_after": best_nmse}
