"""Decomposition schemes (see base.py for the interface); ``SCHEMES`` maps ``--scheme`` names to them."""

from .base import ChannelScheme, Scheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (ChannelScheme(),)}

__all__ = ["SCHEMES", "ChannelScheme", "Scheme"]
