"""The per-layer plan: what is known about each layer as a compression goes along.

A :class:`LayerPlan` is immutable; each step (rank choice, solving) returns new plans with
:func:`dataclasses.replace`, so no step can change what an earlier one decided behind its back.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from .errors import LowRankError
from .graph.layers import ConvLayer
from .schemes import SCHEME_CHOICES, Alternative, Scheme
from .solver.balance import Balanced
from .solver.ranks import ConvShape
from .solver.reconstruction import Factorisation


@dataclass(frozen=True)
class LayerPlan:
    layer: ConvLayer
    layer_id: int
    scheme: Scheme
    flops_before: int = 0
    candidate: bool = False
    # rank choice
    rank: int | None = None
    status: str = "skipped"
    reason: str = ""
    spectrum: np.ndarray | None = None
    energy_kept: float | None = None
    rows: int | None = None
    latency_before: float | None = None
    latency_after: float | None = None
    damage: dict[int, float] | None = None  # --allocation sensitivity: measured accuracy cost per candidate rank
    saving: dict[int, float] | None = None  # ... and the cost (FLOPs or ms) each of those ranks saves
    # solving
    split: tuple | None = None  # the scheme's (pre, core) at the chosen rank, once computed
    alternative: Alternative | None = None  # e.g. --scheme auto: a second fit; the better one is kept
    method: str | None = None
    rel_error: float | None = None
    rel_error_linear: float | None = None
    factorisation: Factorisation | None = None
    balanced: Balanced | None = None
    asymmetric: bool | None = None
    note: str = ""

    @property
    def shape(self) -> ConvShape:
        return self.scheme.shape(self.layer)

    @property
    def flops_after(self) -> int:
        return self.shape.factorised_flops(self.rank) if self.rank is not None else self.flops_before

    def stages(self) -> list:
        """The nodes that replace the layer in the written model."""
        return self.scheme.stages(self.layer, self.rank, self.factorisation, self.balanced, self.split)


#: Why an output head is left alone (graph/heads.py says why).
HEAD_REASON = "model output head: kept whole (its error goes straight to the outputs; --factorise-head to allow)"


def make_plan(layers: list[ConvLayer], flops: dict[str, int], cfg) -> list[LayerPlan]:
    """Which layers are candidates (and why the others are not), each with its scheme."""
    names = {lay.name for lay in layers}
    for name in cfg.ranks:
        if name not in names:
            raise LowRankError(f"--ranks names {name!r}, which is not a Conv layer of the model "
                               f"(run `onnx-lowrank layers MODEL` to see the names)")
    choice = SCHEME_CHOICES[cfg.scheme]
    plan = []
    for i, lay in enumerate(layers):
        p = LayerPlan(lay, i, choice.for_layer(lay), flops.get(lay.name, 0))
        reason = ""
        if lay.skip_reason:
            reason = lay.skip_reason
        elif any(fnmatch.fnmatchcase(lay.name, pat) for pat in cfg.exclude):
            reason = "excluded by --exclude"
        elif lay.name in cfg.ranks and cfg.ranks[lay.name] > lay.out_channels:
            raise LowRankError(f"rank {cfg.ranks[lay.name]} for {lay.name!r} exceeds its {lay.out_channels} filters")
        elif lay.head and lay.name not in cfg.ranks and not cfg.factorise_head:
            reason = HEAD_REASON
        elif lay.name not in cfg.ranks and p.shape.break_even_rank() < 1:
            reason = "no rank saves FLOPs (break-even rank is 0)"
        plan.append(LayerPlan(lay, i, p.scheme, p.flops_before, candidate=not reason, reason=reason))
    return plan


def no_candidate_message(plan: list[LayerPlan]) -> str:
    if not plan:
        return "the model has no Conv layer (nor MatMul / Gemm by a constant matrix) to compress"
    reasons = sorted({p.reason for p in plan})
    return f"none of the model's {len(plan)} Conv / MatMul / Gemm layers can be compressed ({'; '.join(reasons)})"
