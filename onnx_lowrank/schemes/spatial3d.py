"""The 3-D decomposition (Zhang et al. TPAMI; method.md section 6), data-driven.

``kh x kw`` Conv ``c -> d`` becomes ``kh x 1`` (``c -> d''``), ``1 x kw`` (``d'' -> d'``), ``1 x 1``
(``d' -> d``). The spatial split is the truncated SVD of the weight (solver/spatial.py, stride, pads
and dilation split between the two); the channel step is the nonlinear asymmetric solver fitted on
the response of the ``1 x kw`` Conv (the *core*) in the partly compressed model, so it also repairs
what the spatial truncation lost. ``d'' = d' = rank``.
"""

from __future__ import annotations

from ..graph.layers import ConvLayer
import numpy as np

from ..graph.rewrite import ConvStage
from ..solver.spatial import ThreeDShape, spatial_svd, split_conv_attributes
from .base import Scheme


def explicit_pads(layer: ConvLayer) -> list[int] | None:
    """``[top, left, bottom, right]`` with ``auto_pad`` resolved; None if that needs an unknown input size."""
    auto = str(layer.attrs.get("auto_pad", "NOTSET") or "NOTSET")
    if auto == "NOTSET":
        return [int(v) for v in layer.attrs.get("pads", [0, 0, 0, 0])]
    if auto == "VALID":
        return [0, 0, 0, 0]
    if layer.in_shape is None:
        return None
    strides, dil = layer.attrs.get("strides", [1, 1]), layer.attrs.get("dilations", [1, 1])
    begin, end = [], []
    for a in range(2):
        n, s, k = int(layer.in_shape[2 + a]), int(strides[a]), int(layer.kernel[a])
        total = max(0, (-(-n // s) - 1) * s + int(dil[a]) * (k - 1) + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return begin + end


def _input_width(layer: ConvLayer, pads: list[int]) -> int:
    if layer.in_shape is not None:
        return int(layer.in_shape[3])
    # Smallest width giving the output width: exact up to the stride's remainder (enough for a cost).
    s, dil = int(layer.attrs.get("strides", [1, 1])[1]), int(layer.attrs.get("dilations", [1, 1])[1])
    return (int(layer.out_shape[3]) - 1) * s + dil * (layer.kernel[1] - 1) + 1 - pads[1] - pads[3]


class ThreeDScheme(Scheme):
    name = "3d"
    label = "3-D"

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if len(layer.kernel) != 2 or min(layer.kernel) < 2:
            return "kernel has a side of 1: nothing to split spatially"
        if explicit_pads(layer) is None:
            return "auto_pad with an unknown input size"
        return None

    def shape(self, layer: ConvLayer) -> ThreeDShape:
        pads = explicit_pads(layer)
        h_out = int(layer.out_shape[2]) if layer.out_shape else 0
        return ThreeDShape(layer.in_channels, layer.out_channels, layer.kernel[0], layer.kernel[1], layer.positions,
                           positions_v=h_out * _input_width(layer, pads))

    def split(self, layer: ConvLayer, rank: int) -> tuple[list[ConvStage], ConvStage]:
        kh, kw = layer.kernel
        vertical, horizontal = split_conv_attributes(layer.attrs.get("strides", [1, 1]), explicit_pads(layer),
                                                     layer.attrs.get("dilations", [1, 1]))
        V, H = spatial_svd(layer.weight, rank)
        return ([ConvStage(V, None, {"kernel_shape": [kh, 1], "group": 1, **vertical})],
                ConvStage(H, layer.bias, {"kernel_shape": [1, kw], "group": 1, **horizontal}))

    def stand_in(self, layer: ConvLayer, rank: int) -> list[ConvStage]:
        kh, kw = layer.kernel
        c, d = layer.in_channels, layer.out_channels
        r2 = min(rank, c * kh, d * kw)
        vertical, horizontal = split_conv_attributes(layer.attrs.get("strides", [1, 1]), explicit_pads(layer),
                                                     layer.attrs.get("dilations", [1, 1]))
        full = lambda *shape: np.full(shape, 0.01, np.float32)  # noqa: E731
        return [ConvStage(full(r2, c, kh, 1), None, {"kernel_shape": [kh, 1], "group": 1, **vertical}),
                ConvStage(full(rank, r2, 1, kw), full(rank) if layer.bias is not None else None,
                          {"kernel_shape": [1, kw], "group": 1, **horizontal}),
                ConvStage(full(d, rank, 1, 1), full(d), {"kernel_shape": [1, 1], "group": 1, "strides": [1, 1],
                                                         "pads": [0, 0, 0, 0], "dilations": [1, 1]})]
