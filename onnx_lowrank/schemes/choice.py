"""What each ``--scheme`` value does: which scheme a layer gets, and any alternative fitted beside it.

``SCHEME_CHOICES`` (in ``__init__``) maps the option's values to these; a new scheme is one more
:class:`Fixed` entry there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph.dense import is_dense
from ..graph.layers import ConvLayer
from ..graph.rewrite import ConvStage
from ..solver.ranks import candidate_ranks
from .base import ChannelScheme, Scheme
from .dense import DenseScheme

CHANNEL = ChannelScheme()
DENSE = DenseScheme()


@dataclass(frozen=True)
class Alternative:
    """A second factorisation of a layer, fitted beside the chosen one; the better fit is kept."""

    scheme: Scheme
    rank: int
    split: tuple[list[ConvStage], ConvStage]  # the scheme's (pre, core) at ``rank``
    tensor: str  # the extra tensor its core writes, sampled with the layer


class Fixed:
    """One scheme for every layer it can take; the channel pair for the others, MatMul / Gemm their own."""

    #: The only --objective this choice works with (None: any), and why.
    objective: str | None = None
    why_objective = ""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme

    def for_layer(self, layer: ConvLayer) -> Scheme:
        if is_dense(layer):
            return DENSE
        if not layer.skip_reason and self.scheme.skip_reason(layer) is None:
            return self.scheme
        return CHANNEL

    def alternative(self, p, shortcuts: set[str], multiple: int) -> Alternative | None:
        """An alternative to fit beside plan ``p`` (None: none)."""
        return None


class BestOf(Fixed):
    """Ranks are chosen for ``scheme``; each such layer is also fitted as ``other`` at the highest rank that
    costs no more FLOPs, and keeps the one with the smaller error on the held-back images."""

    objective = "flops"
    why_objective = "it compares the schemes at equal FLOPs"

    def __init__(self, scheme: Scheme, other: Scheme):
        super().__init__(scheme)
        self.other = other

    def alternative(self, p, shortcuts: set[str], multiple: int) -> Alternative | None:
        # A layer that is another's shortcut would need its other rows at that layer's positions too: kept simple.
        if p.scheme is self.other or p.scheme is DENSE or p.layer.output in shortcuts:
            return None
        shape, budget = self.other.shape(p.layer), p.flops_after
        fits = [r for r in candidate_ranks(shape.break_even_rank(), multiple) if shape.factorised_flops(r) <= budget]
        if not fits:
            return None
        return Alternative(self.other, fits[-1], self.other.split(p.layer, fits[-1]),
                           f"{p.layer.output}__lowrank_{self.other.name}")
