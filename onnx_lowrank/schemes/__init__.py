"""Decomposition schemes (see base.py for the interface); ``SCHEMES`` maps ``--scheme`` names to them."""

from .base import ChannelScheme, Scheme
from .spatial3d import ThreeDScheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (ChannelScheme(), ThreeDScheme())}

__all__ = ["SCHEMES", "ChannelScheme", "Scheme", "ThreeDScheme"]
