"""Distillation losses: how far the student's outputs are from the teacher's.

Each loss gives, per output, a numerator and a denominator summed over a batch; the loss is the
mean over outputs of numerator / denominator. Training takes the ratio per batch, the held-back
check sums both over all images first, so one definition serves both and early stopping judges by
the loss that is trained.
"""

from __future__ import annotations

import torch

from ..errors import LowRankError


class Loss:
    name = ""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def parts(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(numerator, denominator) of one output over a batch."""
        raise NotImplementedError

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse an output this loss cannot compare (shape with the batch axis first)."""

    def __call__(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        terms = []
        for s, t in zip(student, teacher):
            num, den = self.parts(s, t)
            terms.append(num / den.clamp_min(1e-12))
        return torch.stack(terms).mean()


class NMSE(Loss):
    """sum((s - t)^2) / sum(t^2): each output counts alike whatever its scale; any output works."""

    name = "nmse"

    def parts(self, s, t):
        return ((s - t) ** 2).sum(), (t ** 2).sum()


class KL(Loss):
    """Hinton et al.'s distillation loss: T^2 KL(softmax(t / T) || softmax(s / T)) over the last axis,
    averaged over the rows (images, or positions of a sequence). Aims at the teacher's class decisions
    rather than at the logits' values; T^2 keeps the gradient's size alike across temperatures."""

    name = "kl"

    def parts(self, s, t):
        T = self.temperature
        log_p = torch.log_softmax(t / T, dim=-1)
        log_q = torch.log_softmax(s / T, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum()
        rows = torch.tensor(float(t.numel() // t.shape[-1]), dtype=kl.dtype)
        return T * T * kl, rows

    def check(self, name, shape):
        if len(shape) < 2 or shape[-1] < 2:
            raise LowRankError(f"--loss kl compares class scores along the last axis, and output {name!r} has "
                               f"shape {list(shape)}: use --loss nmse, or --outputs with a logits tensor")


REGISTRY: dict[str, type[Loss]] = {c.name: c for c in (NMSE, KL)}


def resolve(name: str, temperature: float) -> Loss:
    """The loss called ``name``, or a one-line error listing the choices."""
    if name not in REGISTRY:
        raise LowRankError(f"--loss takes {', '.join(REGISTRY)}, not {name!r}")
    if not temperature > 0:
        raise LowRankError(f"--temperature must be positive, not {temperature}")
    return REGISTRY[name](temperature)
