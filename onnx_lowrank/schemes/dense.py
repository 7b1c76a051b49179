"""MatMul / Gemm layers (graph/dense.py): ``y = x W + bias`` becomes ``(x W Q + Q^T bias) P^T + b``.

The channel step of the pair with a 1 x 1 "kernel": the solver fits ``y ~ P Q^T yhat + b`` on
sampled rows (token positions), linear or nonlinear through the activation after the layer, and
asymmetric on the partly compressed model's responses, exactly as for a Conv. It is written as two
matrix products: MatMul (+ Add) for inputs of any rank, Gemm for a Gemm's 2-D input.
"""

from __future__ import annotations

import numpy as np

from ..graph.dense import DenseLayer, DenseStage
from ..solver.balance import Balanced
from ..solver.ranks import ConvShape
from ..solver.reconstruction import Factorisation
from .base import Scheme


class DenseScheme(Scheme):
    name = "dense"
    timing_tag = ""  # MatMul / Gemm timing keys are apart already

    def shape(self, layer: DenseLayer) -> ConvShape:
        return ConvShape(layer.in_channels, layer.out_channels, 1, 1, layer.positions)

    def split(self, layer: DenseLayer, rank: int) -> tuple[list, None]:
        return [], None  # nothing before the channel step; the weight is read off the layer

    def stages(self, layer: DenseLayer, rank: int, f: Factorisation, balanced: Balanced | None = None,
               split=None) -> list[DenseStage]:
        if balanced is not None:
            f = balanced.factorisation
        w = layer.weight[:, :, 0, 0].astype(np.float64)  # (d, k)
        if balanced is not None:
            b1, b2 = balanced.first_bias(layer.bias), balanced.second_bias()
        else:
            b1 = f.Q.T @ layer.bias.astype(np.float64) if layer.bias is not None else None
            b2 = f.b
        gemm = layer.op == "Gemm"
        return [DenseStage((f.Q.T @ w).T, b1, gemm), DenseStage(f.P.T, b2, gemm, replaces=layer.add)]
