"""The FLOP cost of one layer, whole and factorised at a rank (method.md section 1). Pure Python."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvShape:
    """Shape of one group-1 Conv layer, as far as its cost is concerned."""

    c: int  # input channels (group == 1)
    d: int  # output channels
    kh: int
    kw: int
    positions: int  # output H' * W'

    def __post_init__(self) -> None:
        for name in ("c", "d", "kh", "kw"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"ConvShape.{name} must be a positive integer, got {v!r}")
        if int(self.positions) != self.positions or self.positions < 0:
            raise ValueError(
                f"ConvShape.positions must be a non-negative integer, got {self.positions!r}"
            )

    @property
    def patch(self) -> int:
        """Length of the im2col patch, ``c kh kw``."""
        return int(self.c) * int(self.kh) * int(self.kw)

    def original_flops(self) -> int:
        return 2 * int(self.d) * self.patch * int(self.positions)

    def factorised_flops(self, rank: int) -> int:
        """Cost of ``kh x kw`` conv ``c -> rank`` + ``1 x 1`` conv ``rank -> d`` (no check vs break-even)."""
        rank = int(rank)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return 2 * (rank * self.patch + int(self.d) * rank) * int(self.positions)

    def break_even_rank(self) -> int:
        """Largest rank ``r >= 0`` with ``factorised_flops(r) < original_flops()``; 0 if none.

        ``r (c kh kw + d) < d c kh kw``  <=>  ``r <= (d c kh kw - 1) // (c kh kw + d)``.
        A layer with no output positions costs nothing either way and never saves: 0.
        """
        if self.positions == 0:
            return 0
        p, d = self.patch, int(self.d)
        return (d * p - 1) // (p + d)

    def saves(self, rank: int | None) -> bool:
        """True when factorising at ``rank`` strictly saves FLOPs (``1 <= rank <= break-even``)."""
        return rank is not None and 1 <= int(rank) <= self.break_even_rank()

    def flops_at(self, rank: int | None) -> int:
        """Cost at ``rank``: ``None`` or a rank that does not strictly save means the layer is
        left unchanged (original cost); otherwise the factorised cost."""
        if rank is None:
            return self.original_flops()
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1 (or None for unchanged), got {rank}")
        if self.saves(rank):
            return self.factorised_flops(rank)
        return self.original_flops()
