"""The distillation loop: Adam on the student's trainable weights, loss = normalised squared error of
its outputs against the teacher's, early stop on the held-back images, the best epoch kept.

Runs under fixed torch threads and deterministic algorithms, so one seed gives one set of bytes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from .. import progress
from . import augment
from .student import Student


#: Fit loss below this share of the held-back loss before training: the solver has fitted the fit
#: images themselves (EfficientNet-Lite0, benchmarks/results/section_recover2.md: 0.037 against 0.139).
OVERFIT_GAP = 0.5


def nmse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over outputs of sum((s - t)^2) / sum(t^2): each output counts alike whatever its scale."""
    terms = [((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


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


def held_back_loss(student: Student, held: dict, targets: list[np.ndarray], batch: int) -> float:
    """NMSE over a whole set of images, the held-back ones or (before training) the fit ones: sums over
    batches first, then the ratio."""
    n = len(next(iter(held.values())))
    err = np.zeros(len(targets))
    with torch.no_grad():
        for i in range(0, n, batch):
            out = student(_tensors({k: v[i:i + batch] for k, v in held.items()}))
            for j, (s, t) in enumerate(zip(out, targets)):
                err[j] += float(((s.double() - torch.from_numpy(t[i:i + batch]).double()) ** 2).sum())
    return float(np.mean([e / max(float((t.astype(np.float64) ** 2).sum()), 1e-12) for e, t in zip(err, targets)]))


def _groups(student: Student, lr: float) -> list[dict]:
    """One Adam group per weight tensor with lr relative to the tensor's RMS: a step changes every
    tensor by the same fraction, whatever the scale the solver gave it (factor pairs can be very
    unequal), so one default suits any model. Biases near zero use a floor of 1 % of the largest RMS."""
    rms = [float(p.detach().pow(2).mean().sqrt()) for p in student.parameters()]
    floor = 0.01 * max(rms + [1e-12])
    return [{"params": [p], "lr": lr * max(r, floor)} for p, r in zip(student.parameters(), rms)]


def fit(student: Student, teacher, fit_data: dict, held: dict, cfg, augmentations: list[str]) -> dict:
    """Train; leave the student at its best epoch; return the per-epoch record."""
    rng = np.random.default_rng(cfg.seed)
    held_targets = teacher(held)
    plain_targets = teacher(fit_data)
    n = len(next(iter(fit_data.values())))
    opt = torch.optim.Adam(_groups(student, cfg.lr), lr=cfg.lr)
    steps_per_epoch = -(-n // cfg.batch_size)
    # Warm up over the first epoch: Adam's first steps move every weight by about lr at once.
    warm = cfg.warmup or steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    best = held_back_loss(student, held, held_targets, cfg.batch_size)
    fit_before = held_back_loss(student, fit_data, plain_targets, cfg.batch_size)
    epochs = [{"epoch": 0, "fit_loss": fit_before, "held_back_loss": best, "seconds": 0.0}]
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
                loss = nmse(student(_tensors(feed)), [torch.from_numpy(t) for t in targets])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
                update(len(idx))
                if cfg.time_limit and time.perf_counter() - t0 > cfg.time_limit:
                    break   # a partial epoch still gets its held-back check below
        held_loss = held_back_loss(student, held, held_targets, cfg.batch_size)
        better = held_loss < best
        epochs.append({"epoch": epoch, "fit_loss": total / count, "held_back_loss": held_loss,
                       "seconds": time.perf_counter() - t0, "images": count})
        progress.log(f"recovery: epoch {epoch}/{cfg.epochs}, fit loss {total / count:.5g}, held-back loss "
                     f"{held_loss:.5g}" + (" (best so far)" if better else ""))
        if better:
            best, best_state, kept, stale = held_loss, student.state(), epoch, 0
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
            "held_back_loss_after": best}
