"""Everything that talks to onnxruntime: session profiles and creation, runs, interleaved timing.

Calibration, measurement (``bench``, ``--measure``), latency tables and the benchmarks all go
through here, so a session is set up the same way wherever it serves the same purpose, and every
speed-up is measured by the same loop.
"""

from .sessions import CALIBRATION, ORT_ERRORS, PROFILES, TIMING, Profile, one_line, run, session, time_models
from .timing import Rounds, Spread, interleave, median_interval

__all__ = ["CALIBRATION", "TIMING", "PROFILES", "Profile", "ORT_ERRORS", "session", "run", "one_line", "time_models",
           "Rounds", "Spread", "interleave", "median_interval"]
