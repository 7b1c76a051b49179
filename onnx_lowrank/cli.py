"""The ``onnx-lowrank`` command line: a thin layer over :mod:`onnx_lowrank.pipeline` and :mod:`.measure`."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from . import progress
from .errors import LowRankError
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


def _shapes_option(f):
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                        help="Concrete shape for an input with symbolic dims, e.g. input:1x3x224x224 (repeatable).")(f)


def _image_options(f):
    opts = [
        click.option("--image-size", metavar="HxW", help="Image folders: model input size when the model's is symbolic."),
        click.option("--resize", type=int, metavar="PX", help="Image folders: resize the shorter side to PX, then centre-crop."),
        click.option("--scale", type=float, default=1 / 255, show_default="1/255", help="Image folders: pixel multiplier."),
        click.option("--mean", default="0", show_default=True, metavar="M[,M,M]", help="Image folders: subtracted after scaling."),
        click.option("--std", default="1", show_default=True, metavar="S[,S,S]", help="Image folders: divisor after the mean."),
        click.option("--bgr", is_flag=True, help="Image folders: feed channels in BGR order (default RGB)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False), default="NCHW",
                     show_default=True, help="Image folders: tensor layout of the model input."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _preprocess(image_size, resize, scale, mean, std, bgr, layout):
    from .calibration.inputs import ImagePreprocess

    def floats(s, what):
        try:
            return tuple(float(v) for v in s.split(","))
        except ValueError:
            raise LowRankError(f"--{what} takes numbers separated by commas, not {s!r}") from None

    size = None
    if image_size:
        try:
            h, w = (int(v) for v in image_size.lower().split("x"))
            size = (h, w)
        except ValueError:
            raise LowRankError(f"--image-size takes HxW, e.g. 224x224, not {image_size!r}") from None
    return ImagePreprocess(size=size, resize=resize, scale=scale, mean=floats(mean, "mean"), std=floats(std, "std"),
                           channel_order="BGR" if bgr else "RGB", layout=layout.upper())


def _parse_schedule(spec: str) -> tuple:
    try:
        steps = tuple((int(k), float(lam)) for k, lam in (part.split(":") for part in spec.split(",") if part.strip()))
    except ValueError:
        raise LowRankError(f"--schedule takes ITERS:LAMBDA pairs separated by commas, e.g. 25:0.01,25:1, not {spec!r}") \
            from None
    if any(k < 0 or lam <= 0 for k, lam in steps):
        raise LowRankError("--schedule needs iterations >= 0 and lambda > 0")
    return steps


def _parse_samples(spec: str) -> int | str:
    if spec.strip().lower() == "auto":
        return "auto"
    try:
        return int(spec)
    except ValueError:
        raise LowRankError(f"--samples-per-image takes a positive integer or 'auto', not {spec!r}") from None


def _objective_options(f):
    opts = [
        click.option("--objective", type=click.Choice(["latency", "flops"]), default="latency", show_default=True,
                     help="latency: --speedup is measured latency on this CPU (layers are timed on onnxruntime, "
                          "cached); flops: --speedup is the FLOP reduction."),
        click.option("--rank-multiple", type=click.IntRange(min=1), default=16, show_default=True, metavar="N",
                     help="Ranks are multiples of N (onnxruntime's NCHWc block; 1 = any rank)."),
        click.option("--latency-table", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                     help="Latency objective: use this table of timings if it exists (same ranks, byte-identical "
                          "output), else write the timings used to it."),
        click.option("--scheme", type=click.Choice(["channel", "3d", "auto"]), default="channel", show_default=True,
                     help="channel: k x k then 1 x 1; 3d: k x 1, 1 x k, 1 x 1 (TPAMI; 1-wide kernels keep the pair); "
                          "auto (--objective flops): 3d ranks, then per layer whichever fits better at equal FLOPs."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parse_ranks(spec: str | None) -> dict[str, int]:
    if not spec:
        return {}
    p = Path(spec)
    if p.suffix == ".json" or p.is_file():
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise LowRankError(f"cannot read --ranks file {p}: {exc}") from None
        if not isinstance(data, dict):
            raise LowRankError(f"--ranks file {p} must hold a JSON object {{\"layer name\": rank}}")
        items = data.items()
    else:
        items = []
        for part in spec.split(","):
            if "=" not in part:
                raise LowRankError(f"bad --ranks entry {part!r}: write NAME=RANK,NAME=RANK or a JSON file")
            name, r = part.rsplit("=", 1)
            items.append((name.strip(), r.strip()))
    ranks = {}
    for name, r in items:
        if isinstance(r, str) and r.strip().lstrip("+").isdigit():
            r = int(r)
        if not isinstance(r, int) or isinstance(r, bool):
            raise LowRankError(f"rank for {name!r} must be a positive integer, not {r!r}")
        ranks[name] = r
    return ranks


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", "calib", metavar="DATA",
              help="Calibration inputs: .npz (keys = input names, first axis = sample), .npy (single input), "
                   "a folder of images, or 'synthetic' (random inputs: latency experiments only).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model [default: MODEL with .lowrank.onnx beside it].")
@click.option("--speedup", default=None, metavar="S|auto",
              help="Target whole-model speed-up: measured latency (--objective latency) or FLOPs, e.g. 3 = three "
                   "times faster; 'auto' (with a budget) finds the largest within the budget [default: 2, or none "
                   "with --ranks].")
@click.option("--ranks", metavar="NAME=R,...|FILE.json", help="Set ranks by hand (layer names as in `onnx-lowrank layers`).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave matching layers alone (glob on the name; repeatable).")
@click.option("--method", type=click.Choice(["nonlinear", "linear"]), default="nonlinear", show_default=True,
              help="nonlinear: minimise the error after the activation (the paper); linear: PCA of the responses.")
@click.option("--asymmetric/--no-asymmetric", default=True, show_default=True,
              help="Fit each layer on inputs from the already-compressed layers before it, so errors do not pile up.")
@click.option("--schedule", default="25:0.01,25:1", show_default=True, metavar="ITERS:LAMBDA,...",
              help="Nonlinear solver: iterations at each penalty lambda, in order (the paper's schedule by default).")
@click.option("--samples-per-image", default="auto", show_default=True, metavar="N|auto",
              help="Random output positions sampled per image and layer; 'auto' takes, per layer, enough for "
                   "at least 16 fitted rows per output channel (never fewer than 10, never more than the layer has).")
@click.option("--max-images", type=int, default=None, help="Use at most this many calibration images.")
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
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Time the original and compressed models (interleaved, a few seconds) and report the measured "
                   "speed-up.")
@_shapes_option
@_image_options
def compress(model, calib, output, speedup, ranks, exclude, method, asymmetric, schedule, samples_per_image, max_images,
             batch_size, seed, report_path, threads, quiet, eval_data, labels, max_accuracy_drop, min_agreement,
             write_failed, objective, rank_multiple, latency_table, scheme, measure, input_shapes, **image):
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
    from .errors import BudgetExceeded
    from .files import check_writable
    from .graph.loading import parse_input_shapes
    from .pipeline import CompressConfig
    from .report import format_report

    progress.set_enabled(not quiet)
    if not calib:
        raise LowRankError("--calib is required: a .npz/.npy of inputs or a folder of images "
                           "('synthetic' for latency experiments only)")
    if not model.exists():
        raise LowRankError(f"model file not found: {model} (check the path)")
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
    if output.resolve() == model.resolve():
        raise LowRankError("--output is the input model: choose another path (the input is never modified)")
    if report_path and report_path.resolve() in (model.resolve(), output.resolve()):
        raise LowRankError("--report would overwrite a model file: give it its own path, e.g. report.json")
    check_writable(output, "--output")
    if report_path:
        check_writable(report_path, "--report")
    shapes = parse_input_shapes(input_shapes)
    data = _synthetic(model, shapes, seed) if calib == "synthetic" else calib
    cfg = CompressConfig(speedup=speedup, ranks=ranks_d, exclude=list(exclude), method=method,
                         asymmetric=asymmetric, schedule=_parse_schedule(schedule),
                         samples_per_image=_parse_samples(samples_per_image), max_images=max_images, seed=seed,
                         batch_size=batch_size, input_shapes=shapes, threads=threads,
                         preprocess=_preprocess(**image), objective=objective, rank_multiple=rank_multiple,
                         latency_table=str(latency_table) if latency_table else None, scheme=scheme)
    show = None if quiet else (lambda result: click.echo(format_report(result.report)))
    wrote = f"wrote {output}" + (f" and {report_path}" if report_path else "")
    try:
        res = run(model, data, output, cfg, eval_data=eval_data, labels=labels, max_accuracy_drop=max_accuracy_drop,
                  min_agreement=min_agreement, write_failed=write_failed, report=report_path, measure=measure,
                  on_result=show)
    except BudgetExceeded as err:
        if err.written and not quiet:
            click.echo(wrote)
        raise
    if not quiet:
        data_file = res.report.get("external_data")
        click.echo(wrote + (f" (weights in {Path(output).parent / data_file})" if isinstance(data_file, str) else ""))


def _synthetic(model: Path, shapes: dict, seed: int, count: int = 8):
    from .measure import synthetic_feeds

    progress.log("warning: --calib synthetic uses random inputs: fine for latency, meaningless for accuracy")
    return [synthetic_feeds(str(model), batch=1, seed=seed + i, shape_overrides=shapes or None) for i in range(count)]


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@_shapes_option
def layers(model, input_shapes):
    """List the Conv, MatMul and Gemm layers of MODEL: names (for --ranks / --exclude), shapes, activation, and why
    some are skipped."""
    from .graph.dense import find_dense_layers
    from .graph.layers import find_conv_layers
    from .graph.loading import infer_value_types, load_model, normalise, parse_input_shapes, with_input_shapes

    norm = normalise(load_model(model))
    vt = infer_value_types(with_input_shapes(norm, parse_input_shapes(input_shapes)))
    rows = [("name", "c -> d", "kernel", "group", "output", "activation", "status")]
    for lay in find_conv_layers(norm, vt) + find_dense_layers(norm, vt):
        out = "x".join(map(str, lay.out_shape[2:])) if lay.out_shape else "?"
        rows.append((lay.name, f"{lay.in_channels} -> {lay.out_channels}", "x".join(map(str, lay.kernel)), str(lay.group),
                     out, lay.target_description, lay.skip_reason or "candidate"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _feeds_for(model: Path, data, batch: int, seed: int, shapes: dict, limit: int | None = None):
    """Real inputs from --data (batched), or synthetic ones."""
    from .budget import evaluation_inputs
    from .graph.loading import load_model
    from .pipeline import input_specs

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
    from .measure import bench as run, format_bench

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
    from .measure import evaluate, format_eval

    progress.set_enabled(not quiet and not as_json)
    for m in (reference, candidate):
        if not m.exists():
            raise LowRankError(f"model file not found: {m} (check the path)")
    from .budget import evaluation_inputs
    from .graph.loading import load_model
    from .pipeline import input_specs

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
@click.option("--method", type=click.Choice(["nonlinear", "linear"]), default="nonlinear", show_default=True)
@click.option("--asymmetric/--no-asymmetric", default=True, show_default=True)
@click.option("--samples-per-image", default="auto", show_default=True, metavar="N|auto",
              help="As for compress.")
@click.option("--max-images", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--runs", type=int, default=None,
              help="Interleaved latency rounds per speed-up [default: until the median speed-up is stable, as bench].")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads for the latency runs.")
@click.option("--out", "out_prefix", default="sweep", show_default=True, metavar="PREFIX",
              help="Writes PREFIX.csv and PREFIX.png.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_objective_options
@_shapes_option
def sweep(model, calib, eval_data, labels, speedups, method, asymmetric, samples_per_image, max_images, seed, runs,
          threads, out_prefix, quiet, objective, rank_multiple, latency_table, scheme, input_shapes):
    """Compress MODEL at several speed-ups and measure each: theoretical and measured speed-up against
    fidelity (top-1 agreement, NMSE) and accuracy. Writes a CSV and a PNG plot.

    \b
      onnx-lowrank sweep models/mnist_vgg/mnist_vgg.onnx --calib models/mnist_vgg/calib.npz \\
          --eval-data models/mnist_vgg/heldout.npz --labels label --speedups 1.5,2,3,4,6 --out mnist_sweep
    """
    from .files import check_writable, write_together
    from .graph.loading import parse_input_shapes
    from .pipeline import CompressConfig
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
                         max_images=max_images, seed=seed, input_shapes=parse_input_shapes(input_shapes),
                         threads=threads, objective=objective, rank_multiple=rank_multiple,
                         latency_table=str(latency_table) if latency_table else None, scheme=scheme)
    rows = run(model, calib, eval_data, values, cfg, labels=labels, runs=runs, threads=threads)
    title = f"{model.name}: {method}{' + asymmetric' if asymmetric else ''}, {objective} objective"
    write_together([(csv_path, lambda tmp: write_csv(rows, tmp)), (png_path, lambda tmp: plot(rows, tmp, title=title))])
    cols = ["speedup_target", "speedup_theoretical", "speedup_predicted", "speedup_measured", "top1_agreement", "nmse",
            "accuracy_candidate", "status"]
    click.echo("  ".join(f"{c:>19}" for c in cols))
    for r in rows:
        click.echo("  ".join(f"{r[c]:>19.4g}" if isinstance(r.get(c), float) else f"{str(r.get(c, '-')):>19}"
                             for c in cols))
    click.echo(f"wrote {out_prefix}.csv and {out_prefix}.png")


if __name__ == "__main__":
    main()
