"""Recovery from start to end: check, read the data, distil, write back, verify, write atomically.

Importing this module imports no torch: :func:`require_torch` is the one place that tries, so a
user without the ``recover`` extra gets one line saying how to install it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .. import progress
from ..calibration.inputs import open_source
from ..errors import LowRankError
from ..files import check_writable, json_default, write_together
from ..graph.loading import load_model, model_writer, real_inputs

INSTALL_HINT = 'pip install "onnx-lowrank[recover]"'
TRAIN_CHOICES = ("factorised", "all")
LOSS_CHOICES = ("nmse", "kl")          # losses.REGISTRY's names, kept here so checking a config imports no torch


@dataclass
class RecoverConfig:
    """How the distillation runs. ``lr``: see benchmarks/RESULTS.md "Recovery" for the sweep behind it."""

    epochs: int = 5
    lr: float = 1e-4                   # Adam step relative to each weight tensor's RMS (train._groups)
    batch_size: int = 16
    seed: int = 0
    train: str = "factorised"          # which weights train: the factorised stages, or every weight
    outputs: list[str] | None = None   # tensors compared (default: every float graph output)
    augment: str = "none"              # none, auto (image inputs: crop, noise) or names: see augment.REGISTRY.
    # Not auto by default: crop + noise raised the held-back loss on EfficientNet-Lite0 from the first epoch
    # and did worse than none on the demo (benchmarks/results/section_recover2.md).
    patience: int = 2                  # epochs without a better held-back loss before stopping
    holdout_every: int = 5             # every n-th calibration image is held back (as the solver does)
    threads: int = 1                   # torch and onnxruntime threads: 2 are many times slower on a busy 2-core machine
    max_images: int | None = None
    time_limit: float | None = None    # seconds of training; the best epoch so far is kept
    warmup: int | None = None          # steps of linear lr warm-up (None: one epoch)
    loss: str = "nmse"                 # nmse (any output) or kl (class logits, softened at temperature)
    temperature: float = 1.0           # kl only: softmax temperature T (loss T^2 KL)

    def check(self) -> None:
        if self.epochs < 1:
            raise LowRankError(f"--epochs must be 1 or more, not {self.epochs}")
        if not self.lr > 0:
            raise LowRankError(f"--lr must be a positive learning rate, not {self.lr}")
        if self.batch_size < 1 or self.threads < 1:
            raise LowRankError("--batch-size and --threads must be 1 or more")
        if self.train not in TRAIN_CHOICES:
            raise LowRankError(f"--train takes {' or '.join(TRAIN_CHOICES)}, not {self.train!r}")
        if self.loss not in LOSS_CHOICES:
            raise LowRankError(f"--loss takes {' or '.join(LOSS_CHOICES)}, not {self.loss!r}")
        if not self.temperature > 0:
            raise LowRankError(f"--temperature must be positive, not {self.temperature}")


@dataclass
class RecoveryResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)


def require_torch() -> None:
    """One line, before any work, when the optional dependencies are missing (looked up, not imported)."""
    import importlib.util

    missing = [m for m in ("torch", "onnx2torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise LowRankError(f"recovery needs torch and onnx2torch ({', '.join(missing)} not installed): "
                           f"{INSTALL_HINT}")


def recover(original, factorised, data, output: str | Path | None = None, config: RecoverConfig | None = None, *,
            report: str | Path | None = None, preprocess=None, **overrides) -> RecoveryResult:
    """Distil ``original`` (the teacher) into ``factorised`` (the student) on calibration ``data``.

    Models are paths or ModelProtos; ``data`` is anything ``compress`` accepts. The result has the
    factorised model's nodes and ranks with trained initializer values; ``report`` gets the loss
    per epoch. Keyword overrides set fields of :class:`RecoverConfig`.
    """
    cfg = RecoverConfig(**{**(asdict(config) if config else {}), **overrides})
    cfg.check()
    require_torch()
    if output is not None:
        for m in (original, factorised):
            if isinstance(m, (str, Path)) and Path(output).resolve() == Path(m).resolve():
                raise LowRankError("the output path is an input model: choose another (inputs are never modified)")
        check_writable(output, "output")
        if report is not None:
            check_writable(report, "report")
    teacher_model = _load(original, "original")
    student_model = _load(factorised, "factorised")
    from ..calibration.batching import input_specs

    source = open_source(data, input_specs(student_model), preprocess)
    result = recover_models(teacher_model, student_model, source, cfg)
    if output is not None:
        write_together([(output, model_writer(result.model))]
                       + ([(report, lambda tmp: _write_json(tmp, result.report))] if report else []))
    return result


def recover_models(teacher_model: onnx.ModelProto, student_model: onnx.ModelProto, source, cfg: RecoverConfig
                   ) -> RecoveryResult:
    """The work of :func:`recover` on loaded models and an open :class:`FeedSource`."""
    from . import augment, losses
    from .student import Student
    from .teacher import Teacher, choose_outputs, load_all, split
    from .train import deterministic, fit

    t0 = time.perf_counter()
    _check_inputs(teacher_model, student_model)
    outputs = choose_outputs(teacher_model, student_model, cfg.outputs)
    arrays = load_all(source, cfg.max_images)
    fit_data, held = split(arrays, cfg.holdout_every)
    augmentations = augment.resolve(cfg.augment, arrays)
    teacher = Teacher(teacher_model, outputs, cfg.threads)
    with deterministic(cfg.threads, cfg.seed):
        student = Student(student_model, outputs, cfg.train)
        if not student.bindings:
            raise LowRankError("the factorised model has no factorised layers to train: give the output of "
                               "compress, or --train all")
        probe = {k: v[:4] for k, v in held.items()}
        conversion = _agreement(student, student_model, outputs, probe)
        if conversion > 1e-3:
            raise LowRankError(f"onnx2torch converts this model inexactly (relative difference {conversion:.2g} "
                               "against onnxruntime): recovery would train a different model")
        record = fit(student, teacher, fit_data, held, cfg, augmentations, losses.resolve(cfg.loss, cfg.temperature))
        written = student.written()
        writeback = _agreement(student, written, outputs, probe)
    if writeback > 1e-3:
        raise LowRankError(f"the written-back model differs from the trained one (relative difference "
                           f"{writeback:.2g}): please report this model")
    trained = sum(int(np.prod(b.tensor.shape)) for b in student.bindings.values())
    report = {**record, "seconds": time.perf_counter() - t0, "lr": cfg.lr, "batch_size": cfg.batch_size,
              "seed": cfg.seed, "loss": cfg.loss,
              **({"temperature": cfg.temperature} if cfg.loss == "kl" else {}), "threads": cfg.threads, "train": cfg.train, "trained_tensors": len(student.bindings),
              "trained_parameters": trained, "augmentations": augmentations, "outputs": outputs,
              "fit_images": len(next(iter(fit_data.values()))), "held_back_images": len(next(iter(held.values()))),
              "conversion_difference": conversion, "writeback_difference": writeback}
    progress.log(f"recovery: kept epoch {record['epoch_kept']}, held-back loss {record['held_back_loss_before']:.5g} "
                 f"-> {record['held_back_loss_after']:.5g} in {report['seconds']:.1f} s")
    return RecoveryResult(written, report)


def _agreement(student, model: onnx.ModelProto, outputs: list[str], feed: dict) -> float:
    """Largest difference between torch and onnxruntime on ``feed``, relative to the output's size."""
    import torch

    from .teacher import Teacher
    from .train import _tensors

    with torch.no_grad():
        got = [t.numpy() for t in student(_tensors(feed))]
    want = Teacher(model, outputs, threads=1)(feed)
    return max(float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-6) for g, w in zip(got, want))


def _check_inputs(teacher: onnx.ModelProto, student: onnx.ModelProto) -> None:
    a = sorted(i.name for i in real_inputs(teacher))
    b = sorted(i.name for i in real_inputs(student))
    if a != b:
        raise LowRankError(f"the original model's inputs ({', '.join(a)}) are not the factorised model's "
                           f"({', '.join(b)}): give the model that was compressed and its compressed version")


def _load(model, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if not Path(model).exists():
        raise LowRankError(f"{what} model not found: {model} (check the path)")
    return load_model(model)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=json_default)
        f.write("\n")


def _loss_name(rep: dict) -> str:
    return "output NMSE" if rep["loss"] == "nmse" else f"T^2 KL of softmax at T = {rep['temperature']:g}"


def format_recovery(rep: dict) -> str:
    """The report's recovery as a table: loss per epoch on fit and held-back images (and the held-back
    NMSE when another loss trains), the epoch kept."""
    both = rep["loss"] != "nmse"
    lines = ["epoch  fit loss    held-back loss" + ("  held-back NMSE" if both else ""),
             "-----  ----------  --------------" + ("  --------------" if both else "")]
    for e in rep["epochs"]:
        fit = f"{e['fit_loss']:.5g}"
        mark = "  <- kept" if e["epoch"] == rep["epoch_kept"] else ""
        nmse = f"  {e['held_back_nmse']:>14.5g}" if both else ""
        lines.append(f"{e['epoch']:>5}  {fit:>10}  {e['held_back_loss']:>14.5g}{nmse}{mark}")
    aug = ", ".join(rep["augmentations"]) or "none"
    lines.append(f"recovered {rep['trained_tensors']} weight tensors ({rep['train']}, {rep['trained_parameters']} values) "
                 f"on {rep['fit_images']} images, early stop on {rep['held_back_images']} held back; augmentations: "
                 f"{aug}; lr {rep['lr']:g}, {rep['seconds']:.1f} s")
    lines.append(f"held-back loss ({_loss_name(rep)} against the original): {rep['held_back_loss_before']:.5g} -> "
                 f"{rep['held_back_loss_after']:.5g} (epoch {rep['epoch_kept']} kept); fit loss before training "
                 f"{rep['fit_loss_before']:.5g} (the images the compression was fitted to)")
    if both:
        lines.append(f"held-back output NMSE: {rep['held_back_nmse_before']:.5g} -> {rep['held_back_nmse_after']:.5g}")
    return "\n".join(lines)
