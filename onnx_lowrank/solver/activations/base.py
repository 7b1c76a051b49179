"""The activation registry: one small class per kind, and the ``Activation`` value callers hold.

A kind class says everything the rest of the tool needs to know about one nonlinearity: its
parameters, its value (and derivatives where smooth), its z step (method.md section 3), and how a
graph spells it -- the ONNX op types that are this activation (``op_types``, with ``from_op``
reading the parameters off an ``OpNode``) and the parameter sets a written-out elementwise region
is compared against (``written_out``). The graph code uses that data; this package never imports
onnx. Adding an activation is one subclass decorated with ``@register(name, ...its data)``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

REGISTRY: dict[str, type["ActivationKind"]] = {}


def register(name: str, **data: Any) -> Callable[[type["ActivationKind"]], type["ActivationKind"]]:
    """Class decorator: make the class known under ``name``, with its declarative data (``op_types``,
    ``written_out``, ``defaults``; a smooth kind's ``table_a``, ``special``) set as class attributes,
    so that a class body holds behaviour only. Names the class does not declare are refused (typos)."""

    def add(cls: type["ActivationKind"]) -> type["ActivationKind"]:
        if name in REGISTRY:
            raise ValueError(f"activation kind {name!r} registered twice")
        declared = {k for c in cls.__mro__ for k in inspect.get_annotations(c)}
        unknown = sorted(set(data) - declared)
        if unknown:
            raise TypeError(f"{cls.__name__} declares no {unknown}")
        cls.name = name
        for k, v in data.items():
            setattr(cls, k, v)
        REGISTRY[name] = cls
        return cls

    return add


RUNTIME = object()  # an OpNode input computed at run time (not a constant)


@dataclass(frozen=True)
class OpNode:
    """One graph node as the registry sees it: its op type, its attributes (strings decoded), and per
    input a constant array, ``None`` (input left empty) or ``RUNTIME``."""

    op_type: str
    attrs: dict
    inputs: tuple

    def given(self, i: int) -> bool:
        return len(self.inputs) > i and self.inputs[i] is not None

    def const(self, i: int) -> np.ndarray | None:
        v = self.inputs[i] if self.given(i) else None
        return v if isinstance(v, np.ndarray) else None


class ActivationKind:
    """One nonlinearity, bound to its (normalised) parameters.

    Subclasses implement ``value``, and get ``name`` and their data from ``register``; the z step
    comes from ``linear_pieces`` by default (exact per piece) or from ``block_solver``.
    """

    name: ClassVar[str]
    op_types: ClassVar[tuple[str, ...]] = ()  # ONNX ops (default domain) that are this activation
    written_out: ClassVar[tuple[dict, ...]] = ()  # parameter sets a multi-node region may match
    #: float parameters and their defaults, read from the op's attributes of the same name
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, params: dict):
        self.params = params

    # parameters and recognition ------------------------------------------------------------
    @classmethod
    def normalise(cls, params: dict) -> dict:
        """Checked, canonical parameters (defaults filled in); raises ValueError."""
        if params and not cls.defaults:
            raise ValueError(f"{cls.name} takes no parameters, got {sorted(params)}")
        return {k: float(params.get(k, v)) for k, v in cls.defaults.items()}

    @classmethod
    def from_op(cls, node: OpNode, channels: int) -> dict | None:
        """The parameters of ``node`` (one of ``op_types``), or None when it cannot be used (e.g.
        a bound computed at run time); ``channels``: the producing layer's output channels."""
        return {k: float(node.attrs.get(k, v)) for k, v in cls.defaults.items()}

    def is_identity(self) -> bool:
        return False

    def key(self) -> tuple:
        """Hashable identity of kind and parameters (for caches)."""
        return (self.name, tuple(sorted((k, _hashable(v)) for k, v in self.params.items())))

    # values ----------------------------------------------------------------------------------
    def value(self, y: np.ndarray) -> np.ndarray:
        """``r(y)`` elementwise, float64, exact."""
        raise NotImplementedError

    def value_block(self, z: np.ndarray, P: "Pool") -> np.ndarray:
        """``r(z)`` on a cache-sized block, possibly into a scratch array of ``P``."""
        return self.value(z)

    # z step ----------------------------------------------------------------------------------
    def linear_pieces(self) -> list | None:
        """``[(slope, intercept, lo, hi), ...]``: ``r(z) = slope z + intercept`` on ``[lo, hi]``,
        covering the real line; None for kinds that are not piecewise linear."""
        return None

    def block_solver(self, lam: float) -> Callable:
        """``(a, u, z0, z_out, P, offset) -> cost`` for one row block (``offset``: of its first
        element in the flattened data): writes the argmin of ``(a - r(z))^2 + lam (z - u)^2`` into
        ``z_out`` and returns the objective there. It may have a ``finish(a, u, z, cost)`` method
        (flat arrays) that revisits elements after the last block and returns the change of the
        sums of the objective and of ``(z - u)^2``, and a ``loss_u`` attribute: the summed
        ``(a - r(u))^2`` of the blocks it solved (else the caller computes it)."""
        from .piecewise import piecewise_linear

        pieces = self.linear_pieces()
        return lambda a, u, z0, z, P, offset=0: piecewise_linear(a, u, lam, pieces, z, P)


def _as_slope(value: Any) -> float | np.ndarray:
    """PReLU slopes come as a scalar or a per-channel vector (ONNX often stores (d, 1, 1))."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 1:
        return float(arr.reshape(()))
    return np.ascontiguousarray(arr.reshape(-1))


def _hashable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("array", value.shape, tuple(value.ravel().tolist()))
    return value


def _named(kind: str, *positional: str, **fixed: Any) -> classmethod:
    """A constructor per kind in one line: arguments are the kind's parameter names (positionally
    in the order given); parameters left out take the kind's own defaults (its ``normalise``)."""

    def make(cls, *args: Any, **kwargs: Any) -> "Activation":
        if len(args) > len(positional):
            raise TypeError(f"Activation.{kind}() takes at most {len(positional)} positional arguments")
        return cls(kind, {**fixed, **dict(zip(positional, args)), **kwargs})

    return classmethod(make)


@dataclass(frozen=True, eq=False)
class Activation:
    """The nonlinearity that follows a layer; ``apply`` works elementwise on (n, d) rows.

    ``kind`` names a registered class (``REGISTRY``); ``params`` are that class's (clip ``{'min',
    'max'}``, leaky_relu ``{'alpha'}``, prelu ``{'slope'}`` scalar or (d,), hardsigmoid ``{'alpha',
    'beta'}``, gelu ``{'approximate'}``). Equality and hashing look at the parameter values,
    arrays included.
    """

    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = REGISTRY.get(self.kind)
        if cls is None:
            raise ValueError(f"unknown activation kind {self.kind!r}; expected one of {tuple(REGISTRY)}")
        p = cls.normalise(dict(self.params))
        object.__setattr__(self, "params", p)
        object.__setattr__(self, "impl", cls(p))

    def _key(self) -> tuple:
        return self.impl.key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Activation):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Activation({self.kind!r}, {self.params!r})"

    # constructors: Activation.relu(), Activation.clip(0, 6), Activation.gelu("tanh"), ...
    identity = _named("identity")
    relu = _named("relu")
    clip = _named("clip", "min", "max")
    relu6 = _named("clip", min=0.0, max=6.0)
    leaky_relu = _named("leaky_relu", "alpha")
    prelu = _named("prelu", "slope")
    hardswish = _named("hardswish")
    hardsigmoid = _named("hardsigmoid", "alpha", "beta")
    silu = _named("silu")
    gelu = _named("gelu", "approximate")
    sigmoid = _named("sigmoid")
    tanh = _named("tanh")

    @property
    def is_identity(self) -> bool:
        """True when ``apply`` is the identity map (then the linear solution is already optimal)."""
        return self.impl.is_identity()

    def apply(self, y: np.ndarray) -> np.ndarray:
        """``r(y)`` elementwise, in float64."""
        return self.impl.value(np.asarray(y, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# scratch memory and small array helpers shared by the z-step solvers


class Pool:
    """Scratch arrays reused across blocks and iterations.  Fresh NumPy temporaries of a few
    hundred kB come from mmap (or a heap that glibc keeps trimming), so every one of them
    costs page faults: two to three times the arithmetic on cache-resident blocks."""

    def __init__(self, n: int):
        self.n = int(n)
        self.f: dict = {"f": [], "d": [], "D": []}  # buffers by dtype char (float32, float64, complex128)
        self.used = {"f": 0, "d": 0, "D": 0}
        self.b: list[np.ndarray] = []
        self.j = 0

    def reset(self) -> None:
        self.used["f"] = self.used["d"] = self.used["D"] = 0
        self.j = 0

    def mark(self) -> tuple[int, int, int, int]:
        """The arrays handed out so far; ``release(mark)`` takes back the ones handed out after it
        (a loop's temporaries: reusing them keeps the working set in L2, which twenty fresh
        buffers per iteration of 64 kB each would not be)."""
        return self.used["f"], self.used["d"], self.used["D"], self.j

    def release(self, mark: tuple[int, int, int, int]) -> None:
        self.used["f"], self.used["d"], self.used["D"], self.j = mark

    def __call__(self, like: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """A scratch array of ``like``'s shape and ``dtype`` ('f' float32, 'd' float64, 'D'
        complex128; default
        ``like``'s if floating). Cheapest for 1-D ``like`` of the pool's full size (the per-call
        Python cost matters: the solvers make hundreds of calls per block)."""
        ch = dtype or like.dtype.char
        if ch not in self.f:
            ch = "d"
        bufs, i = self.f[ch], self.used[ch]
        if i == len(bufs):
            bufs.append(np.empty(self.n, dtype=ch))
        self.used[ch] = i + 1
        x = bufs[i]
        if like.size != self.n:
            x = x[: like.size]
        return x if like.ndim == 1 else x.reshape(like.shape)

    def mask(self, like: np.ndarray) -> np.ndarray:
        if self.j == len(self.b):
            self.b.append(np.empty(self.n, dtype=bool))
        x = self.b[self.j]
        self.j += 1
        if like.size != self.n:
            x = x[: like.size]
        return x if like.ndim == 1 else x.reshape(like.shape)


def new(P: Pool | None, like: np.ndarray) -> np.ndarray:
    return np.empty(like.shape, dtype=like.dtype) if P is None else P(like)


def f32(x: np.ndarray, P: Pool | None = None) -> np.ndarray:
    """``x`` as float32, in a scratch array."""
    out = P(x, "f") if P is not None else np.empty(x.shape, np.float32)
    np.copyto(out, x, casting="same_kind")
    return out


def objective_into(r, z, a, u, lam, P=None) -> np.ndarray:
    """The z-step objective ``(a - r)^2 + lam (z - u)^2``, written into ``r`` (the activation's
    values at ``z``)."""
    np.subtract(a, r, out=r)
    r *= r
    d = np.subtract(z, u, out=new(P, z))
    d *= d
    d *= lam
    r += d
    return r


def keep_better(z, c, z_new, c_new, tmp, P=None) -> None:
    """``z, c <- z_new, c_new`` where ``c_new < c`` (in place; ties keep the old one). An
    arithmetic blend: masked copies (``np.where``/``copyto(where=)``) branch per element and cost
    ten times as much on random masks."""
    better = np.less(c_new, c, out=None if P is None else P.mask(c))
    np.minimum(c, c_new, out=c)
    np.subtract(z_new, z, out=tmp)
    tmp *= better
    z += tmp


#: NumPy's clip ufunc itself: ``np.clip`` reaches it through two Python wrappers that cost about as much as the
#: arithmetic on a cache-sized block (HardSwish's z step clips about ten times a block); the same function, the same bits.
clip = np._core.umath.clip


def clip_into(x: np.ndarray, lo: float, hi: float, out: np.ndarray) -> np.ndarray:
    """``x`` clipped into ``[lo, hi]`` (either may be infinite). Always ``np.clip``: ``np.maximum`` /
    ``np.minimum`` with a scalar take a slow path in NumPy 2.4 (three to five times the time)."""
    if lo == -math.inf and hi == math.inf:
        np.copyto(out, x)
        return out
    return clip(x, lo, hi, out=out)
