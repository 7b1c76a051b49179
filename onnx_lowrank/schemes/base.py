"""What a decomposition scheme is: the one place that knows how a layer is split.

Every scheme here replaces one Conv by a chain that ends in the channel step of method.md
sections 1-4: ``pre`` stages (possibly none), then the scheme's ``core`` Conv, whose d outputs
``yhat`` the channel step maps to ``y ~ P Q^T yhat + b`` (written as the core Conv projected by
``Q`` followed by a 1 x 1 Conv ``P``). A scheme says

* which layers it matches (:meth:`Scheme.skip_reason`),
* its cost for a given rank (:meth:`Scheme.shape`, a :class:`~onnx_lowrank.solver.ranks.ConvShape`),
* how it is solved from sampled rows (:meth:`Scheme.solve`; the shared solver by default),
* how it is applied to cached feature maps for asymmetric propagation (:meth:`Scheme.propagate`),
* and which nodes it writes (:meth:`Scheme.stages`).

The calibration samples ``yhat`` at the layer's output tensor of a *sampling model* in which the
layer is replaced by ``pre + [core]`` (nothing replaced when ``pre`` is empty): the core keeps the
output name, so the same positions are sampled as in the original model.
"""

from __future__ import annotations

import numpy as np

from ..graph.layers import ConvLayer
from ..graph.rewrite import ConvStage, first_stage_attrs, pointwise_attrs
from ..solver.activations import Activation
from ..solver.balance import Balanced
from ..solver.layer import LayerSolution, solve_layer
from ..solver.ranks import ConvShape
from ..solver.reconstruction import Factorisation


class Scheme:
    """Base class: the channel pair's behaviour, which the other schemes reuse where they can."""

    #: Name used by ``--scheme`` and in the report.
    name = ""
    #: Shown before a factorised layer's note in the printed report ("" for the plain pair).
    label = ""

    @property
    def timing_tag(self) -> str:
        """Appended to a layer's timing key: its chain is timed apart from other schemes'."""
        return f"_{self.name}"

    def skip_reason(self, layer: ConvLayer) -> str | None:
        """Why this scheme cannot take the layer (None: it can). Called on layers the graph code accepts."""
        return None

    def shape(self, layer: ConvLayer) -> ConvShape:
        """The layer's cost model: original FLOPs, FLOPs at a rank, break-even rank."""
        raise NotImplementedError

    def split(self, layer: ConvLayer, rank: int) -> tuple[list[ConvStage], ConvStage]:
        """``(pre, core)``: the stages before the channel step and the Conv the channel step projects."""
        raise NotImplementedError

    def solve(self, y, yh, rank: int, layer: ConvLayer, fit, held, **kwargs) -> LayerSolution:
        """The channel step from sampled rows (see :func:`~onnx_lowrank.solver.layer.solve_layer`)."""
        act = Activation(layer.activation, dict(layer.activation_params))
        return solve_layer(y, yh, rank, act, fit, held, bound=layer.response_rank, **kwargs)

    def propagate(self, f: Factorisation, maps: np.ndarray) -> np.ndarray:
        """What the written chain computes from the core's output maps (n, d, positions)."""
        return f.apply_channels(maps)

    def stages(self, layer: ConvLayer, rank: int, f: Factorisation, balanced: Balanced | None = None,
               split: tuple[list[ConvStage], ConvStage] | None = None) -> list[ConvStage]:
        """The Conv nodes that replace the layer: ``pre``, the core projected by ``Q``, then ``P`` (1 x 1).

        ``split``: :meth:`split` at this rank if already computed (it may cost an SVD)."""
        pre, core = split or self.split(layer, rank)
        if balanced is not None:
            f = balanced.factorisation
        w1 = np.einsum("dr,dckl->rckl", f.Q, core.weight.astype(np.float64))
        if balanced is not None:
            b1, b2 = balanced.first_bias(core.bias), balanced.second_bias()
        else:
            b1 = f.Q.T @ core.bias.astype(np.float64) if core.bias is not None else None
            b2 = f.b
        return [*pre, ConvStage(w1, b1, core.attrs), ConvStage(f.P[:, :, None, None], b2, pointwise_attrs())]

    def stand_in(self, layer: ConvLayer, rank: int) -> list[ConvStage]:
        """Stages of the right shapes with constant weights (latency does not depend on the values)."""
        d = layer.out_channels
        f = Factorisation(np.full((d, rank), 0.1), np.full((d, rank), 0.1), np.zeros(d))
        return self.stages(layer, rank, f)


class ChannelScheme(Scheme):
    """k x k Conv c -> d' then 1 x 1 Conv d' -> d (Zhang et al., method.md section 1)."""

    name = "channel"
    timing_tag = ""  # the first scheme: its timings were stored before there were others

    def shape(self, layer: ConvLayer) -> ConvShape:
        return ConvShape(layer.in_channels, layer.out_channels, layer.kernel[0], layer.kernel[1], layer.positions)

    def split(self, layer: ConvLayer, rank: int) -> tuple[list[ConvStage], ConvStage]:
        return [], ConvStage(layer.weight, layer.bias, first_stage_attrs(layer.attrs, layer.kernel))

    def stand_in(self, layer: ConvLayer, rank: int) -> list[ConvStage]:
        r, d, (kh, kw) = rank, layer.out_channels, layer.kernel
        w1 = np.full((r, layer.in_channels, kh, kw), 0.01, np.float32)
        return [ConvStage(w1, np.zeros(r, np.float32) if layer.bias is not None else None,
                          first_stage_attrs(layer.attrs, layer.kernel)),
                ConvStage(np.full((d, r, 1, 1), 0.01, np.float32), np.zeros(d, np.float32), pointwise_attrs())]
