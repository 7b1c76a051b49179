"""The model's inputs as calibration sees them, and how many images go into one onnxruntime call."""

from __future__ import annotations

import numpy as np
import onnx

from .. import progress
from ..errors import LowRankError
from ..graph.loading import real_inputs
from .inputs import FeedSource, InputSpec


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(dtype), shape))
    return specs


def fixed_batch(inputs: list[InputSpec]) -> bool:
    return any(i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 for i in inputs)


def batching(inputs: list[InputSpec], source: FeedSource, batch_size: int,
             max_images: int | None) -> tuple[int, int | None]:
    """Batch size and sample limit: a model exported with a fixed batch N is fed whole batches of N only."""
    fixed = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    if len(fixed) != 1:
        return batch_size, max_images
    n_fixed = fixed.pop()
    total = source.total(max_images)
    if total is None or total % n_fixed == 0:
        return n_fixed, max_images
    usable = total // n_fixed * n_fixed
    if usable == 0:
        raise LowRankError(f"the model's batch size is fixed at {n_fixed} but the calibration data has only {total} "
                           f"samples: give at least {n_fixed}")
    progress.log(f"note: the model's batch size is fixed at {n_fixed}; using {usable} of {total} calibration samples")
    return n_fixed, usable
