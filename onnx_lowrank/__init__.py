"""onnx-lowrank: faster convolutional ONNX models by low-rank factorisation of their Conv layers.

Python API::

    from onnx_lowrank import compress
    result = compress("model.onnx", "calib.npz", "model.lowrank.onnx", speedup=3)
    print(result.report["speedup_theoretical"])
"""

from .errors import BudgetExceeded, LowRankError
from .pipeline import CompressConfig, CompressionResult, Compressor, compress

__all__ = ["compress", "Compressor", "CompressConfig", "CompressionResult", "LowRankError", "BudgetExceeded"]
__version__ = "0.1.0"
