"""The op registry: every op is defined once, here or in ``ir/ops/<family>.py``.

An ``OpDef`` holds an op's operand names, attribute schema, type rule, numpy
reference (the interpreter's semantics), fusion kind, its ONNX spelling (which
the frontend uses to lift and lower generically) and, later, its TVM lowering.
Adding an op means adding one ``OpDef``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..runtime.errors import Error
from .types import DTYPES, TensorType

Attrs = dict[str, Any]
InferFn = Callable[[list[TensorType | None], Attrs], list[TensorType]]


class FusionKind(str, enum.Enum):
    """TVM's op pattern kinds, which the block partitioner reads."""

    ELEMENTWISE = "elementwise"
    BROADCAST = "broadcast"
    INJECTIVE = "injective"
    REDUCTION = "reduction"
    OUT_EWISE_FUSABLE = "out-elementwise-fusable"
    OPAQUE = "opaque"


class OpTypeError(Error, TypeError):
    """An op's type rule refused its operands or attributes."""


REQUIRED = object()
ATTR_KINDS = ("int", "float", "str", "ints", "floats", "strs", "dtype")


@dataclass(frozen=True)
class Attr:
    """One attribute of an op's schema: kind (int, float, str, ints, floats, strs, dtype) and default."""

    kind: str
    default: Any = REQUIRED

    def __post_init__(self) -> None:
        assert self.kind in ATTR_KINDS, self.kind

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def check_attr(kind: str, value: Any) -> Any:
    """The value coerced to the attribute kind's Python type, or OpTypeError saying what came."""
    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def is_num(x: Any) -> bool:
        return is_int(x) or isinstance(x, (float, np.floating))

    if kind == "int" and (is_int(value) or isinstance(value, bool)):
        return int(value)
    if kind == "float" and is_num(value):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "dtype" and isinstance(value, str) and value in DTYPES:
        return value
    if kind in ("ints", "floats", "strs") and isinstance(value, (list, tuple)):
        elem = {"ints": "int", "floats": "float", "strs": "str"}[kind]
        return [check_attr(elem, v) for v in value]
    raise OpTypeError(f"expected {kind}, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class OnnxSpec:
    """How an op is spelled in ONNX, for generic lifting and lowering.

    ``attr_inputs`` maps an ONNX input index to the kiln attribute that holds its
    (constant) value, e.g. Reshape's input 1 -> attribute ``shape``; ``attr_dtypes``
    gives the ONNX tensor dtype used when lowering such an attribute back to an input.
    """

    op_type: str
    domain: str = ""
    attr_inputs: dict[int, str] = field(default_factory=dict)
    attr_dtypes: dict[str, str] = field(default_factory=dict)
    attr_names: dict[str, str] = field(default_factory=dict)  # kiln name -> ONNX name
    since: int | None = None  # newest ONNX version of op_type implemented (default: its version at opset 23)
    oldest: int | None = None  # oldest ONNX version with kiln's semantics (lowering below it decomposes)
    lowerable: Callable[[Any, int], str | None] | None = None  # (node, opset) -> why it cannot be written there


@dataclass(frozen=True)
class OpDef:
    """Everything kiln knows about one op."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: InferFn
    reference: Callable[..., Any]
    fusion: FusionKind
    onnx: OnnxSpec | None = None
    doc: str = ""
    decompose: Callable[..., Any] | None = None
    lower_tvm: Callable[..., Any] | None = None
    view: bool = False
    fold: bool = True
    layer: bool = False
    group: str | None = None
    domain: tuple[float, float] | None = None
    bound: str | Callable[..., float] | None = None

    @property
    def anchor(self) -> bool:
        """Whether a node of this op anchors its fused block (at most one anchor per block)."""
        return self.fusion in (FusionKind.OUT_EWISE_FUSABLE, FusionKind.REDUCTION)

    @property
    def variadic_inputs(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].endswith("*")

    @property
    def variadic_outputs(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].endswith("*")

    @property
    def min_inputs(self) -> int:
        return sum(1 for n in self.inputs if not n.endswith(("?", "*")))

    def optional_input(self, i: int) -> bool:
        if i >= len(self.inputs):
            return self.variadic_inputs
        return self.inputs[i].endswith("?")

    def check_arity(self, n_in: int, n_out: int) -> str | None:
        """None when the counts fit the op, else what is wrong."""
        max_in = None if self.variadic_inputs else len(self.inputs)
        if n_in < self.min_inputs or (max_in is not None and n_in > max_in):
            want = f"{self.min_inputs}..{'' if max_in is None else max_in}"
            return f"{self.name} takes {want} inputs, got {n_in}"
        if not self.variadic_outputs and n_out != len(self.outputs):
            return f"{self.name} has {len(self.outputs)} outputs, got {n_out}"
        if self.variadic_outputs and n_out < 1:
            return f"{self.name} needs at least one output"
        return None

    def complete_attrs(self, attrs: Attrs) -> Attrs:
        """Attributes checked against the schema, with defaults filled in; OpTypeError on a misfit."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpTypeError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; "
                              f"schema has {sorted(self.attrs)}")
        out: Attrs = {}
        for name, spec in self.attrs.items():
            if name in attrs and attrs[name] is not None:
                try:
                    out[name] = check_attr(spec.kind, attrs[name])
                except OpTypeError as e:
                    raise OpTypeError(f"{self.name}: attribute {name!r}: {e}") from None
            elif spec.required:
                raise OpTypeError(f"{self.name}: missing required attribute {name!r}")
            elif spec.default is not None:
                out[name] = list(spec.default) if isinstance(spec.default, (list, tuple)) else spec.default
        return out


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY:
        raise ValueError(f"op {opdef.name!r} is registered twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def op(name: str, *, inputs: Sequence[str], outputs: Sequence[str] = ("y",),
       attrs: dict[str, Attr] | None = None, infer: InferFn, fusion: FusionKind,
       onnx: OnnxSpec | str | None = None,
       decompose: Callable[..., Any] | None = None, view: bool = False, fold: bool = True,
       layer: bool = False, group: str | None = None, domain: tuple[float, float] | None = None,
       bound: str | Callable[..., float] | None = None,
       ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers the decorated numpy function as the op's reference semantics.

    ``decompose(graph, node) -> list[Value]`` rewrites the node into simpler ops
    (inserted before it); ops without an ONNX spelling are lowered that way.

    The rest is what passes and the fuzzer read instead of keeping lists of their own:

    * ``view``: shape-only op that runs as a zero-copy view (never inside a fused block);
    * ``fold``: constant operands may be folded at lift/canonicalize (False keeps e.g. a
      ``dequantize`` of int8 weights as it is);
    * ``layer``: a weighted layer that quantization treats as one (matmul, conv, ...);
    * ``group``: ops that take the same operands and may replace each other (the fuzzer's
      replace-op mutator), e.g. ``"unary-float"``, ``"binary-arith"``, ``"compare"``;
    * ``domain``: (lo, hi), where the op is defined and well conditioned on its first operand
      (``log``: (0.5, inf), ``acos``: (-0.99, 0.99)); the fuzzer maps operands into it;
    * ``bound``: how big the output gets from the operands' bounds: ``"one"`` (|y| <= 1),
      ``"keep"`` (<= the first operand's), ``"max"`` (<= the largest operand's), ``"grow"``
      (<= bound + 1), ``"sum"``, ``"prod"``, ``"double"``, or ``fn(node, operand_bounds, n_in) -> float``.
    """
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = OnnxSpec(onnx) if isinstance(onnx, str) else onnx
        register(OpDef(name, tuple(inputs), tuple(outputs), dict(attrs or {}), infer, fn, fusion,
                       spec, (fn.__doc__ or "").strip(), decompose, view=view, fold=fold, layer=layer,
                       group=group, domain=domain, bound=bound))
        return fn
    return deco


def set_lowering(name: str, fn: Callable[..., Any]) -> None:
    """Attach the TVM lowering to op ``name``'s entry (codegen registers these; ir stays TVM-free)."""
    _ensure_loaded()
    opdef = get_op(name)
    if opdef.lower_tvm is not None and opdef.lower_tvm is not fn:
        raise ValueError(f"op {name!r} already has a TVM lowering ({opdef.lower_tvm.__qualname__})")
    _REGISTRY[name] = replace(opdef, lower_tvm=fn)


def _ensure_loaded() -> None:
    from . import ops  # noqa: F401  (registers every op family)


def get_op(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None


def is_view(name: str) -> bool:
    """Whether op ``name`` is a zero-copy view (never a kernel, never in a fused block)."""
    opdef = _REGISTRY.get(name) or (get_op(name) if name else None)
    return bool(opdef and opdef.view)


def is_anchor(name: str) -> bool:
    """Whether op ``name`` anchors its fused block; unknown ops do not."""
    _ensure_loaded()
    opdef = _REGISTRY.get(name)
    return bool(opdef and opdef.anchor)


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


def infer_types(name: str, in_types: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    """Output types of op ``name`` for these operand types; OpTypeError names the op and the misfit."""
    opdef = get_op(name)
    err = opdef.check_arity(len(in_types), 1 if not opdef.variadic_outputs else 1)
    if err and "inputs" in err:
        raise OpTypeError(err)
    for i, t in enumerate(in_types):
        if t is None and not opdef.optional_input(i):
            raise OpTypeError(f"{name}: input {i} is required")
    try:
        attrs = opdef.complete_attrs(attrs)  # type rules see the defaults, as nodes' attrs have them
        return list(opdef.infer(in_types, attrs))
    except OpTypeError as e:
        if str(e).startswith(f"{name}:"):
            raise
        raise OpTypeError(f"{name}: {e}") from e
    except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError) as e:
        raise OpTypeError(f"{name}: {e}") from e
