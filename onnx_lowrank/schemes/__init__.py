"""Decomposition schemes (see base.py for the interface).

``SCHEMES`` maps scheme names (as in the report) to schemes; ``SCHEME_CHOICES`` maps the values of
``--scheme`` to what they do (choice.py).
"""

from .base import ChannelScheme, Scheme
from .choice import CHANNEL, DENSE, Alternative, BestOf, Fixed
from .spatial3d import ThreeDScheme

THREE_D = ThreeDScheme()
SCHEMES: dict[str, Scheme] = {s.name: s for s in (CHANNEL, THREE_D)}
SCHEME_CHOICES: dict[str, Fixed] = {"channel": Fixed(CHANNEL), "3d": Fixed(THREE_D), "auto": BestOf(THREE_D, CHANNEL)}

__all__ = ["SCHEMES", "SCHEME_CHOICES", "Alternative", "ChannelScheme", "Scheme", "ThreeDScheme", "CHANNEL", "DENSE"]
