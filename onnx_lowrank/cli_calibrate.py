"""``onnx-lowrank calibrate``: sampled layer responses to a file, whole or one shard at a time."""

from __future__ import annotations

from pathlib import Path

import click

from . import progress
from .cli import CONTEXT, main
from .cli_options import (executor_options, image_options, max_memory_option, parse_ranks, parse_samples, preprocess,
                          shapes_option)
from .errors import LowRankError
from .executors import executor_kind


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", required=True, metavar="DATA", help="Calibration inputs (as for compress).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Samples file to write (.npz), for `compress --samples`.")
@click.option("--shard", metavar="I/N", help="Calibrate only the I-th of N image ranges (1-based), e.g. 2/3.")
@click.option("--shards", type=click.IntRange(min=1), default=None, metavar="N",
              help="Calibrate all N ranges on --executor and write them merged.")
@executor_options
@click.option("--samples-per-image", default="auto", show_default=True, metavar="N|auto", help="As for compress.")
@click.option("--max-images", type=int, default=None, help="As for compress.")
@max_memory_option
@click.option("--batch-size", type=int, default=16, show_default=True, help="As for compress (shards cut at batches).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="As for compress.")
@click.option("--ranks", metavar="NAME=R,...|FILE.json", help="As for compress (decides which layers are sampled).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="As for compress.")
@click.option("--scheme", type=click.Choice(["channel", "3d", "auto"]), default="channel", show_default=True,
              help="As for compress.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@shapes_option
@image_options
def calibrate(model, calib, output, shard, shards, executor, workers, samples_per_image, max_images, max_memory,
              batch_size, seed,
              ranks, exclude, scheme, threads, quiet, input_shapes, **image):
    """Sample the layer responses of MODEL on calibration data into a file for `compress --samples`.

    Every option that decides what is sampled must be the same here and in `compress`; the file
    carries a fingerprint and `compress` refuses a mismatch. Shards merge to exactly the samples of
    one process (same positions, same held-back images), hence the same model byte for byte.

    \b
      onnx-lowrank calibrate net.onnx --calib calib.npz --shard 1/3 -o part1.npz   # on machine 1
      onnx-lowrank calibrate net.onnx --calib calib.npz --shard 2/3 -o part2.npz   # on machine 2 ...
      onnx-lowrank compress net.onnx --calib calib.npz --samples part*.npz --speedup 2
      onnx-lowrank calibrate net.onnx --calib calib.npz --shards 8 --executor ray -o samples.npz
    """
    from .calibration.samples import parse_shard
    from .files import check_writable
    from .graph.loading import parse_input_shapes
    from .compressor import Compressor
    from .config import CompressConfig
    from .shards import calibrate as run_shards

    progress.set_enabled(not quiet)
    if not model.exists():
        raise LowRankError(f"model file not found: {model} (check the path)")
    if shard and shards:
        raise LowRankError("--shard I/N calibrates one part, --shards N all of them: give one of the two")
    if output.suffix != ".npz":
        raise LowRankError(f"--output {output}: samples are written as .npz, give a name ending in .npz")
    if output.resolve() == model.resolve():
        raise LowRankError("--output is the input model: choose another path")
    check_writable(output, "--output")
    executor_kind(executor).check_available()
    cfg = CompressConfig(speedup=None, ranks=parse_ranks(ranks), exclude=list(exclude), scheme=scheme,
                         objective="flops", samples_per_image=parse_samples(samples_per_image),
                         max_images=max_images, max_memory=max_memory, seed=seed, batch_size=batch_size,
                         input_shapes=parse_input_shapes(input_shapes), threads=threads,
                         preprocess=preprocess(**image))
    if shards:
        samples = run_shards(model, calib, cfg, shards, executor, workers)
    else:
        part = parse_shard(shard) if shard else None
        compressor = Compressor(model, calib, cfg, shard=part)
        samples = compressor.samples
        samples.fingerprint = samples.fingerprint or compressor.samples_fingerprint()
    samples.save(output)
    if not quiet:
        what = f"shard {samples.shard[0]}/{samples.shard[1]}, " if samples.shard else ""
        click.echo(f"wrote {output} ({what}images {samples.first}..{samples.first + samples.images - 1})")
