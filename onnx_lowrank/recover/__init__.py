"""Recovery: a short distillation of the factorised model towards the original, on the calibration data.

The original ONNX model is the teacher (onnxruntime), the factorised one the student (torch, via
onnx2torch); the trained values are written back into the factorised graph. Needs the optional
``recover`` extra; importing this package imports no torch.
"""

from .run import INSTALL_HINT, RecoverConfig, RecoveryResult, format_recovery, recover, recover_models, require_torch

__all__ = ["recover", "format_recovery", "recover_models", "RecoverConfig", "RecoveryResult", "require_torch", "INSTALL_HINT"]
