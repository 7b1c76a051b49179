"""Elementwise activations as a registry of small classes (``base.REGISTRY``), and the z step.

One module per family: ``piecewise`` (Identity, ReLU, Clip, LeakyReLU, PReLU, HardSigmoid: exact
z step per linear piece), ``hardswish`` (piecewise quadratic, exact), ``smooth`` (SiLU, GELU,
Sigmoid, Tanh; z step by ``table``). ``zstep`` runs any kind's solver block by block. Plain
NumPy/SciPy; no ONNX.
"""

from . import hardswish, piecewise, smooth  # noqa: F401  (registers the kinds)
from .base import REGISTRY, RUNTIME, Activation, ActivationKind, OpNode, register
from .zstep import ZSums, _z_solve, z_objective, z_step, z_step_with_cost

KINDS = tuple(REGISTRY)
SMOOTH = tuple(k for k, cls in REGISTRY.items() if issubclass(cls, smooth.SmoothKind))
IDENTITY = Activation("identity")
RELU = Activation("relu")

__all__ = ["REGISTRY", "RUNTIME", "Activation", "ActivationKind", "OpNode", "register", "ZSums", "z_objective",
           "z_step", "z_step_with_cost", "KINDS", "SMOOTH", "IDENTITY", "RELU", "_z_solve"]
