"""``onnx-lowrank recover``: a short distillation of a factorised model towards its original (optional extra)."""

from __future__ import annotations

from pathlib import Path

import click

from . import progress
from .cli import CONTEXT, main
from .cli_options import image_options, preprocess
from .recover.run import LOSS_CHOICES


@main.command("recover", context_settings=CONTEXT)
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("factorised", type=click.Path(path_type=Path))
@click.option("--calib", required=True, metavar="DATA", help="Calibration inputs (as for compress); no labels needed.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Recovered model (same nodes and ranks as FACTORISED).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Most epochs of training.")
@click.option("--patience", type=click.IntRange(min=1), default=2, show_default=True,
              help="Stop after this many epochs without a better held-back loss.")
@click.option("--outputs", metavar="NAMES", help="Comma-separated tensors compared [default: every float graph output].")
@click.option("--lr", type=float, default=None,
              help="Adam step relative to each weight tensor's RMS [default: 1e-4, see README].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train", "train", type=click.Choice(["factorised", "all"]), default="factorised", show_default=True,
              help="Which weights train: the factorised layers', or every Conv / Gemm / MatMul weight.")
@click.option("--augment", default="none", show_default=True, metavar="none|auto|NAMES",
              help="Image inputs: flip, crop, zoom, noise, mixup, cutmix (auto: crop and noise for image inputs, "
                   "none otherwise). None by default: on the measured models they cost more than they gave.")
@click.option("--loss", type=click.Choice(list(LOSS_CHOICES)), default="nmse", show_default=True,
              help="What training and early stopping minimise: nmse (squared error of the outputs over their energy, "
                   "any output) or kl (T^2 KL divergence of the softmax at --temperature over the last axis, for "
                   "class logits).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Softmax temperature T of --loss kl.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch / onnxruntime threads.")
@click.option("--max-images", type=int, default=None, help="Use at most this many calibration samples.")
@click.option("--time-limit", type=float, default=None, metavar="SECONDS", help="Stop training after this long; "
              "the best epoch so far is kept.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON report.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or table.")
@image_options
def recover_cmd(original, factorised, calib, output, epochs, patience, outputs, lr, batch_size, seed, train, augment,
                loss, temperature, threads, max_images, time_limit, report_path, quiet, **image):
    """Win back accuracy the factorisation cost: distil FACTORISED towards ORIGINAL on the calibration data.

    The original model is the teacher, the factorised model the student; only the weights change,
    so OUTPUT has the same nodes, ranks and latency as FACTORISED. Needs the optional extra:
    pip install "onnx-lowrank[recover]".

    \b
      onnx-lowrank recover net.onnx net.lowrank.onnx --calib calib.npz -o net.recovered.onnx --epochs 5
    """
    from .recover import RecoverConfig, format_recovery, recover, require_torch

    require_torch()
    progress.set_enabled(not quiet)
    kw = {"lr": lr} if lr is not None else {}
    cfg = RecoverConfig(epochs=epochs, patience=patience, batch_size=batch_size, seed=seed, train=train,
                        augment=augment, loss=loss, temperature=temperature, threads=threads, max_images=max_images, time_limit=time_limit,
                        outputs=[o.strip() for o in outputs.split(",") if o.strip()] if outputs else None, **kw)
    result = recover(original, factorised, calib, output, cfg, report=report_path, preprocess=preprocess(**image))
    if not quiet:
        click.echo(format_recovery(result.report))
        click.echo(f"wrote {output}" + (f" and {report_path}" if report_path else ""))
