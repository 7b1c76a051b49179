"""The ``onnx-lowrank`` command line: a thin layer over :mod:`onnx_lowrank.api` and :mod:`.measure`."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from . import progress
from .config import METHODS
from .cli_options import (executor_options as _executor_options, image_options as _image_options,
                          objective_options as _objective_options, parse_ranks as _parse_ranks,
                          samples_files as _samples_files, parse_samples as _parse_samples,
                          parse_schedule as _parse_schedule, preprocess as _preprocess,
                          shapes_option as _shapes_option, max_memory_option as _max_memory_option)
from .errors import LowRankError
from .executors import executor_kind
from .files import json_default as _json_default

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turn user errors into one line on stderr and their own exit code, never a traceback."""

    def invoke(self, ctx):
        # A terminated run unwinds like an interrupted one, so temporary caches are removed.
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except LowRankError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)


def _terminate(signum, frame):
    raise KeyboardInterrupt


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="onnx-lowrank")
def main():
    """Make convolutional ONNX models faster by low-rank factorisation of their Conv layers.

    \b
    Typical use:
      onnx-lowrank compress model.onnx --calib calib.npz --speedup 3 -o model.lowrank.onnx
      onnx-lowrank eval model.onnx model.lowrank.onnx --data heldout.npz --labels label
      onnx-lowrank bench model.onnx model.lowrank.onnx

    Each Conv (k x k, c -> d) becomes k x k c -> d' followed by 1 x 1 d' -> d, solved from
    sampled responses on calibration data (Zhang et al., CVPR 2015 / TPAMI 2016).
    """


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("more_samples", nargs=-1, type=click.Path(path_type=Path), metavar="")
@click.option("--calib", "calib", metavar="DATA",
              help="Calibration inputs: .npz (keys = input names, first axis = sample), .npy (single input), "
                   "a folder of images, or 'synthetic' (random inputs: latency experiments only).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model [default: MODEL with .lowrank.onnx beside it].")
@click.option("--samples", "samples", type=click.Path(path_type=Path), metavar="FILE...",
              help="Samples from `onnx-lowrank calibrate` instead of a calibration pass: one file, or every "
                   "--shard part (e.g. --samples part*.npz), merged; --calib is still read by the asymmetric pass.")
@click.option("--shards", type=click.IntRange(min=1), default=None, metavar="N",
              help="Calibrate in N image ranges on --executor (same result as one process).")
@_executor_options
@click.option("--speedup", default=None, metavar="S|auto",
              help="Target whole-model speed-up: measured latency (--objective latency) or FLOPs, e.g. 3 = three "
                   "times faster; 'auto' (with a budget) finds the largest within the budget [default: 2, or none "
                   "with --ranks].")
@click.option("--ranks", metavar="NAME=R,...|FILE.json", help="Set ranks by hand (layer names as in `onnx-lowrank layers`).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave matching layers alone (glob on the name; repeatable).")
@click.option("--method", type=click.Choice(sorted(METHODS, reverse=True)), default="nonlinear", show_default=True,
              help="nonlinear: minimise the error after the activation (the paper); linear: PCA of the responses.")
@click.option("--asymmetric/--no-asymmetric", default=True, show_default=True,
              help="Fit each layer on inputs from the already-compressed layers before it, so errors do not pile up.")
@click.option("--schedule", default="25:0.01,25:1", show_default=True, metavar="ITERS:LAMBDA,...",
              help="Nonlinear solver: iterations at each penalty lambda, in order (the paper's schedule by default).")
@click.option("--samples-per-image", default="auto", show_default=True, metavar="N|auto",
              help="Random output positions sampled per image and layer; 'auto' takes, per layer, enough for "
                   "at least 16 fitted rows per output channel (never fewer than 10, never more than the layer has).")
@click.option("--max-images", type=int, default=None, help="Use at most this many calibration images.")
@_max_memory_option
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per onnxruntime call during calibration.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the sampled positions (same seed, same output).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no table.")
@click.option("--eval-data", metavar="DATA", help="Held-out inputs (.npz/.npy/folder): report fidelity (and accuracy with "
              "--labels) against the original; with a limit below, a budget.")
@click.option("--labels", metavar="KEY", help="Budget: label array in the --eval-data .npz (for --max-accuracy-drop).")
@click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Budget: fail if accuracy drops by more (e.g. 0.5).")
@click.option("--min-agreement", type=float, metavar="FRACTION", help="Budget: fail if top-1 agreement with the original is lower.")
@click.option("--write-failed", is_flag=True, help="Budget: write the model and report even when the budget is broken.")
@_objective_options
@click.option("--recover", "recover_epochs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Then recover N epochs (see the recover command; needs the recover extra); budgets judge the "
                   "recovered model.")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Time the original and compressed models (interleaved, a few seconds) and report the measured "
                   "speed-up.")
@_shapes_option
@_image_options
def compress(model, more_samples, calib, output, samples, shards, executor, workers, speedup, ranks, exclude, method, asymmetric, schedule, samples_per_image, max_images,
             max_memory, batch_size, seed, report_path, threads, quiet, eval_data, labels, max_accuracy_drop, min_agreement,
             write_failed, objective, rank_multiple, latency_table, scheme, allocation, factorise_head,
             damage_metric, measure, input_shapes, recover_epochs=None, **image):
    """Factorise the Conv layers of MODEL and write a faster model plus a report.

    \b
    Examples:
      onnx-lowrank compress net.onnx --calib calib.npz --speedup 3
      onnx-lowrank compress net.onnx --calib calib.npz --speedup auto \\
          --eval-data heldout.npz --labels label --max-accuracy-drop 0.5
      onnx-lowrank compress net.onnx --calib images/ --resize 256 --mean 0.485,0.456,0.406 \\
          --std 0.229,0.224,0.225 --speedup 2 --report report.json
      onnx-lowrank compress net.onnx --calib calib.npz --ranks conv1=16,conv2=32 --exclude 'head*'

    Layers at or above break-even rank, grouped and depthwise Convs are left as they are and
    listed in the report with the reason. With a budget (--eval-data and --max-accuracy-drop or
    --min-agreement), a compression that breaks it exits with code 3 and writes nothing.
    """
    from .api import compress as run
    from .config import CompressConfig
    from .errors import BudgetExceeded
    from .graph.loading import parse_input_shapes
    from .report import format_report

    progress.set_enabled(not quiet)
    if recover_epochs:
        from .recover import require_torch

        require_torch()
    sample_paths = _samples_files(samples, more_samples)
    if not calib:
        raise LowRankError("--calib is required: a .npz/.npy of inputs or a folder of images "
                           "('synthetic' for latency experiments only)")
    if sample_paths and shards:
        raise LowRankError("--samples and --shards exclude each other: the samples are already calibrated")
    kind = executor_kind(executor)
    if kind.engine and not shards:
        raise LowRankError(f"compress --executor {executor} runs calibration shards: give --shards N")
    kind.check_available()
    ranks_d = _parse_ranks(ranks)
    auto = speedup == "auto"
    if speedup is None and not ranks_d:
        speedup = "2"
    if speedup is not None and not auto:
        try:
            speedup = float(speedup)
        except ValueError:
            raise LowRankError(f"--speedup takes a number greater than 1 or 'auto', not {speedup!r}") from None
    output = output or model.with_name(model.stem + ".lowrank.onnx")
    shapes = parse_input_shapes(input_shapes)
    data = _synthetic(model, shapes, seed) if calib == "synthetic" else calib
    cfg = CompressConfig(speedup=speedup, ranks=ranks_d, exclude=list(exclude), method=method,
                         asymmetric=asymmetric, schedule=_parse_schedule(schedule),
                         samples_per_image=_parse_samples(samples_per_image), max_images=max_images, seed=seed,
                         max_memory=max_memory, batch_size=batch_size, input_shapes=shapes, threads=threads,
                         preprocess=_preprocess(**image), objective=objective, rank_multiple=rank_multiple,
                         latency_table=str(latency_table) if latency_table else None, scheme=scheme,
                         allocation=allocation, damage_metric=damage_metric, factorise_head=factorise_head)
    show = None if quiet else (lambda result: click.echo(format_report(result.report) + _recovery_lines(result.report)))
    wrote = f"wrote {output}" + (f" and {report_path}" if report_path else "")
    try:
        res = run(model, data, output, cfg, eval_data=eval_data, labels=labels, max_accuracy_drop=max_accuracy_drop,
                  min_agreement=min_agreement, write_failed=write_failed, report=report_path, measure=measure,
                  on_result=show, samples=sample_paths, shards=shards, executor=executor, workers=workers,
                  recover=recover_epochs)
    except BudgetExceeded as err:
        if err.written and not quiet:
            click.echo(wrote)
        raise
    if not quiet:
        data_file = res.report.get("external_data")
        click.echo(wrote + (f" (weights in {Path(output).parent / data_file})" if isinstance(data_file, str) else ""))


def _recovery_lines(report: dict) -> str:
    if "recovery" not in report:
        return ""
    from .recover import format_recovery

    return "\n\nrecovery:\n" + format_recovery(report["recovery"])


def _synthetic(model: Path, shapes: dict, seed: int, count: int = 8):
    from .measure import synthetic_feeds

    if not model.exists():  # read here, before the API would say so
        raise LowRankError(f"model file not found: {model} (check the path)")

    progress.log("warning: --calib synthetic uses random inputs: fine for latency, meaningless for accuracy")
    return [synthetic_feeds(str(model), batch=1, seed=seed + i, shape_overrides=shapes or None) for i in range(count)]


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@_shapes_option
def layers(model, input_shapes):
    """List the Conv, MatMul and Gemm layers of MODEL: names (for --ranks / --exclude), shapes, activation, and why
    some are skipped."""
    from .compressor import find_layers
    from .graph.loading import infer_value_types, load_model, parse_input_shapes, with_input_shapes
    from .graph.normalise import normalise

    from .report import format_layers

    norm = normalise(load_model(model))
    vt = infer_value_types(with_input_shapes(norm, parse_input_shapes(input_shapes)))
    click.echo(format_layers(find_layers(norm, vt)))


def _feeds_for(model: Path, data, batch: int, seed: int, shapes: dict, limit: int | None = None):
    """Real inputs from --data (batched), or synthetic ones."""
    from .budget import evaluation_inputs
    from .graph.loading import load_model
    from .calibration.batching import input_specs

    if data is None:
        from .measure import synthetic_feeds

        return [synthetic_feeds(str(model), batch=batch, seed=seed, shape_overrides=shapes or None)]
    feeds, _ = evaluation_inputs(input_specs(load_model(model)), str(data), None, batch, limit)
    return list(feeds)


@main.command(context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size of the timed runs.")
@click.option("--runs", type=int, default=None,
              help="Timed rounds; each round runs every model once [default: until each speed-up's median is "
                   "known within 2 % (95 % confidence), at least 10 rounds, then at most --max-seconds].")
@click.option("--max-seconds", type=float, default=60.0, show_default=True,
              help="Time cap of the rounds (the first 10 always run) when --runs is not given.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per model first.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="Real inputs (.npz/.npy/image folder) instead of random ones.")
@click.option("--profile", is_flag=True, help="Add a per-op-type time breakdown from onnxruntime's profiler.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_shapes_option
def bench(models, threads, batch, runs, max_seconds, warmup, data, profile, as_json, quiet, input_shapes):
    """CPU latency of one or more models with onnxruntime, runs interleaved so noise hits all alike.

    Reports median / min / max per model and each model's speed-up against the first: the median of
    per-round ratios, with their interquartile range and the median's 95 % confidence interval.

    \b
      onnx-lowrank bench model.onnx model.lowrank.onnx --threads 1 --runs 100
    """
    from .graph.loading import parse_input_shapes
    from .measure import bench as run
    from .report import format_bench

    progress.set_enabled(not quiet and not as_json)
    for m in models:
        if not m.exists():
            raise LowRankError(f"model file not found: {m} (check the path)")
    feeds = _feeds_for(models[0], data, batch, 0, parse_input_shapes(input_shapes), limit=batch * 16)
    res = run([str(m) for m in models], feeds, threads=threads, runs=runs, warmup=warmup, profile=profile,
              max_seconds=max_seconds,
              progress=not quiet and not as_json)
    click.echo(json.dumps(res, indent=2, default=_json_default) if as_json else format_bench(res))


@main.command("eval", context_settings=CONTEXT)
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path), help="Inputs (.npz/.npy/image folder).")
@click.option("--labels", metavar="KEY", help="Name of an integer label array in the .npz: adds both accuracies and the drop.")
@click.option("--output", "output_name", metavar="NAME", help="Model output to compare [default: the first].")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--max-samples", type=int, default=None, help="Use at most this many samples.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_(reference, candidate, data, labels, output_name, batch, max_samples, as_json, quiet):
    """Fidelity of CANDIDATE against REFERENCE on the same inputs: top-1 agreement, top-5 overlap, NMSE, KL,
    and with --labels the accuracy of both.

    \b
      onnx-lowrank eval model.onnx model.lowrank.onnx --data heldout.npz --labels label
    """
    from .fidelity import evaluate
    from .report import format_eval

    progress.set_enabled(not quiet and not as_json)
    for m in (reference, candidate):
        if not m.exists():
            raise LowRankError(f"model file not found: {m} (check the path)")
    from .budget import evaluation_inputs
    from .graph.loading import load_model
    from .calibration.batching import input_specs

    feeds, label_array = evaluation_inputs(input_specs(load_model(reference)), str(data), labels, batch, max_samples)
    res = evaluate(str(reference), str(candidate), feeds, labels=label_array, output=output_name,
                   progress=not quiet and not as_json)
    click.echo(json.dumps(res, indent=2, default=_json_default) if as_json else format_eval(res))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", required=True, metavar="DATA", help="Calibration inputs (as for compress).")
@click.option("--eval-data", required=True, metavar="DATA", help="Held-out inputs (.npz) to measure fidelity on.")
@click.option("--labels", metavar="KEY", help="Label array in the --eval-data .npz: adds accuracy.")
@click.option("--speedups", default="1.5,2,3,4,6", show_default=True, help="Comma-separated target speed-ups.")
@click.option("--method", type=click.Choice(sorted(METHODS, reverse=True)), default="nonlinear", show_default=True)
@click.option("--asymmetric/--no-asymmetric", default=True, show_default=True)
@click.option("--samples-per-image", default="auto", show_default=True, metavar="N|auto",
              help="As for compress.")
@click.option("--max-images", type=int, default=None)
@_max_memory_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--runs", type=int, default=None,
              help="Interleaved latency rounds per speed-up [default: until the median speed-up is stable, as bench].")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads for the latency runs.")
@click.option("--out", "out_prefix", default="sweep", show_default=True, metavar="PREFIX",
              help="Writes PREFIX.csv and PREFIX.png.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_objective_options
@_executor_options
@_shapes_option
def sweep(model, calib, eval_data, labels, speedups, method, asymmetric, samples_per_image, max_images, max_memory, seed, runs,
          threads, out_prefix, quiet, objective, rank_multiple, latency_table, scheme, allocation, factorise_head,
          damage_metric, executor, workers, input_shapes):
    """Compress MODEL at several speed-ups and measure each: theoretical and measured speed-up against
    fidelity (top-1 agreement, NMSE) and accuracy. Writes a CSV and a PNG plot.

    \b
      onnx-lowrank sweep models/mnist_vgg/mnist_vgg.onnx --calib models/mnist_vgg/calib.npz \\
          --eval-data models/mnist_vgg/heldout.npz --labels label --speedups 1.5,2,3,4,6 --out mnist_sweep
    """
    from .files import check_writable, write_together
    from .graph.loading import parse_input_shapes
    from .config import CompressConfig
    from .report import format_sweep
    from .sweep import plot, sweep as run, write_csv

    progress.set_enabled(not quiet)
    try:
        values = [float(v) for v in speedups.split(",") if v.strip()]
    except ValueError:
        raise LowRankError(f"--speedups takes numbers separated by commas, not {speedups!r}") from None
    if not values or any(v <= 1 for v in values):
        raise LowRankError("--speedups must list numbers greater than 1, e.g. 1.5,2,3")
    if not model.exists():
        raise LowRankError(f"model file not found: {model} (check the path)")
    csv_path, png_path = f"{out_prefix}.csv", f"{out_prefix}.png"
    check_writable(csv_path, "--out")
    check_writable(png_path, "--out")
    cfg = CompressConfig(method=method, asymmetric=asymmetric, samples_per_image=_parse_samples(samples_per_image),
                         max_images=max_images, max_memory=max_memory, seed=seed, input_shapes=parse_input_shapes(input_shapes),
                         threads=threads, objective=objective, rank_multiple=rank_multiple,
                         latency_table=str(latency_table) if latency_table else None, scheme=scheme,
                         allocation=allocation, damage_metric=damage_metric, factorise_head=factorise_head)
    executor_kind(executor).check_available()
    rows = run(model, calib, eval_data, values, cfg, labels=labels, runs=runs, threads=threads, executor=executor,
               workers=workers)
    title = f"{model.name}: {method}{' + asymmetric' if asymmetric else ''}, {objective} objective"
    write_together([(csv_path, lambda tmp: write_csv(rows, tmp)), (png_path, lambda tmp: plot(rows, tmp, title=title))])
    cols = ["speedup_target", "speedup_theoretical", "speedup_predicted", "speedup_measured", "top1_agreement", "nmse",
            "accuracy_candidate", "status"]
    click.echo(format_sweep(rows, cols))
    click.echo(f"wrote {out_prefix}.csv and {out_prefix}.png")


from . import cli_calibrate  # noqa: E402,F401  (registers the `calibrate` command)
from . import cli_recover  # noqa: E402,F401  (registers the `recover` command)

if __name__ == "__main__":
    # Run as a script, this file is a second copy of the module: the package's `main` has every command.
    from onnx_lowrank.cli import main as package_main

    package_main()
