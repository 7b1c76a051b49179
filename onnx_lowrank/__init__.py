"""onnx-lowrank: faster convolutional ONNX models by low-rank factorisation of their Conv layers.

Python API::

    from onnx_lowrank import compress
    result = compress("model.onnx", "calib.npz", "model.lowrank.onnx", speedup=3)
    print(result.report["speedup_theoretical"])

    # CI: the largest speed-up that loses at most half a point; BudgetExceeded (nothing written) if none
    result = compress("model.onnx", "calib.npz", "model.lowrank.onnx", speedup="auto",
                      eval_data="heldout.npz", labels="label", max_accuracy_drop=0.5)

    # Win back accuracy by a short distillation towards the original (pip install "onnx-lowrank[recover]")
    result = compress("model.onnx", "calib.npz", "model.lowrank.onnx", speedup=3, recover=5)
    recover("model.onnx", "model.lowrank.onnx", "calib.npz", "model.recovered.onnx", epochs=5)

``recover`` here is the function; its package (no torch until it runs) is ``onnx_lowrank.recover.run``.
"""

from .api import compress
from .errors import BudgetExceeded, LowRankError
from .compressor import CompressionResult, Compressor
from .config import CompressConfig
from .recover import RecoverConfig, recover

__all__ = ["compress", "recover", "RecoverConfig", "Compressor", "CompressConfig", "CompressionResult", "LowRankError", "BudgetExceeded"]
__version__ = "0.1.0"
