"""onnx-lowrank: faster convolutional ONNX models by low-rank factorisation of their Conv layers.

Python API::

    from onnx_lowrank import compress
    result = compress("model.onnx", "calib.npz", "model.lowrank.onnx", speedup=3)
    print(result.report["speedup_theoretical"])

    # CI: the largest speed-up that loses at most half a point; BudgetExceeded (nothing written) if none
    result = compress("model.onnx", "calib.npz", "model.lowrank.onnx", speedup="auto",
                      eval_data="heldout.npz", labels="label", max_accuracy_drop=0.5)
"""

from .api import compress
from .errors import BudgetExceeded, LowRankError
from .compressor import CompressionResult, Compressor
from .config import CompressConfig

__all__ = ["compress", "Compressor", "CompressConfig", "CompressionResult", "LowRankError", "BudgetExceeded"]
__version__ = "0.1.0"
