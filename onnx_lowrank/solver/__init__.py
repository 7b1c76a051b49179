"""Pure NumPy/SciPy maths of the factorisation: no ONNX here, arrays in and arrays out.

Samples are rows: ``Y`` has shape (n_samples, channels).
"""

from .activations import Activation, z_step
from .ranks import ConvShape, RankSelectionError, select_ranks, speedup_to_budget
from .nonlinear import SolveInfo, nonlinear_reconstruction
from .reconstruction import Factorisation, linear_reconstruction, reduced_rank_regression, response_spectrum
from .spatial import spatial_svd

__all__ = ["Activation", "z_step", "ConvShape", "RankSelectionError", "select_ranks", "speedup_to_budget",
           "Factorisation", "SolveInfo", "linear_reconstruction", "nonlinear_reconstruction",
           "reduced_rank_regression", "response_spectrum", "spatial_svd"]
