"""ONNX -> kiln IR: ``lift(model)``.

How a model is lifted
---------------------
1. ``load_model`` parses the file or bytes (a parser error names the file) and
   loads external data next to a path.
2. The default-domain opset must be in ``MIN_OPSET..MAX_OPSET``; model-local
   functions are inlined; the node list is checked for dangling inputs,
   undefined graph outputs and double definitions, and put in topological order.
3. Graph inputs become kiln inputs (``dim_param`` -> a symbol such as ``N``; a
   dim with neither value nor param gets a fresh symbol ``d0``, ``d1``...;
   ``input_shapes`` overrides a declared shape). Initializers, including graph
   inputs that old exporters list beside their initializer, become constants.
4. Each node is converted, in order, by a special converter (``_SPECIAL``:
   Gemm, Constant, ConstantOfShape, Dropout, Identity, Conv/ConvTranspose/pool
   ``auto_pad``, BatchNormalization, LayerNormalization, Softmax before opset
   13, Split, Squeeze, Reduce*, Pad, Shape, Reshape/Expand with symbolic
   targets, Quantize/DequantizeLinear, and small decompositions: Mean, PRelu,
   Elu, HardSwish, CastLike, ReduceL1/LogSum/LogSumExp, GatherND as a gather
   over flattened leading dims) or else generically
   from the registry: the kiln op whose ``OnnxSpec.op_type`` is the node's,
   ONNX attributes mapped by name (``attr_names`` for renames, ONNX schema
   defaults filled in, so kiln sees ONNX semantics), and the inputs listed in
   ``attr_inputs`` turned into attributes. Such an input must be a constant
   after folding (or a shape expression kiln can resolve, see below);
   otherwise the node is refused as a dynamic shape.
5. Folding: a kiln op whose operands are all constants is evaluated at once
   by its numpy reference when its result is small (``LIFT_FOLD_LIMIT``
   elements; bigger ones are left to ``canonicalize``, which folds them only
   when that duplicates no weight). A standard ONNX op that kiln does not
   have (Range, Size, NonZero...) is folded with ``onnx.reference`` when all of
   its inputs are constant. ``Shape`` of a static value is a constant.
   ``ConstantOfShape`` results are read-only broadcast views, so a model whose
   weights are ``ConstantOfShape`` outputs costs no memory for them.
6. Symbolic shapes: ``Shape`` of a value with symbolic dims stays a kiln
   ``shape`` op; ``Gather``/``Slice``/``Concat``/``Unsqueeze``/``Squeeze``/
   ``Cast``/``Mul``/``Div`` of such shape vectors are tracked symbolically, so a
   ``Reshape`` to ``[N, -1]`` computed from ``x.shape`` becomes
   ``reshape{shape=[0, -1]}`` (or ``-1`` where one dim is unknown) and an
   ``Expand`` to the input's own symbolic dims uses ``1`` there. Anything
   else that needs a run-time shape is refused, naming the node.
   Before refusing, Reshape/Expand/Tile/ConstantOfShape take the operand from
   their output's shape when ONNX shape inference with data propagation
   (``onnx.shape_inference.infer_shapes(..., data_prop=True)``, run once, lazily,
   ignoring the model's own value_info and output shapes) derives it statically.
   A refused run-time operand names the graph inputs its value is computed from
   (``UnsupportedOpsError.specializable``); ``input_values`` binds such inputs
   to values (they become constants, listed in ``graph.meta["specialized"]``) and
   :func:`lift_specialized` does so from example inputs. Operands that do not
   decide a shape stay run-time operands: Clip's min/max, Trilu's k.
7. Every refusal (op kiln lacks, custom domain, training-mode use, dynamic
   shape, attribute value kiln cannot express) is collected; after the last
   node one ``UnsupportedOpsError`` lists all of them.
8. Dead code is removed, ``canonicalize`` runs (unless disabled) and the
   result is checked with ``ir.verify``.

Graph inputs that are also initializers are treated as constants: kiln
compiles inference graphs, and these are the weights of old exporters.
With ``params_as_inputs`` the floating-point weights become graph inputs
instead (see :func:`lift`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from kiln import ir
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.interpret import run_node
from kiln.ir.registry import OpDef, OpTypeError, all_ops, get_op, infer_types
from kiln.ir.types import FLOAT8_DTYPES, Dim, TensorType, dim_div, dim_mul
from kiln.runtime.errors import Error
from kiln.runtime.limits import DEFAULT_LIMITS, Limits, check_limit

from .canonicalize import NEVER_FOLD
from .dtypes import kiln_dtype
from .errors import (
    DanglingInputError,
    DynamicShapeError,
    FrontendError,
    InvalidModelError,
    OpsetError,
    Unsupported,
    UnsupportedOpsError,
)

_log = logging.getLogger("kiln.frontend")

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()  # the newest opset the installed onnx knows
BASE_OPSET = 23  # converters implement each op as of its version at this opset unless they say otherwise
LIFT_FOLD_LIMIT = 1 << 16
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})
# ONNX attributes that do not change the result of kiln's lifting (whatever their value).
_IGNORED_ATTRS = {
    ("Conv", "kernel_shape"), ("ConvTranspose", "kernel_shape"),  # checked against the weight
    ("MaxPool", "storage_order"),  # only affects the Indices output (read by its converter)
    ("BatchNormalization", "momentum"),  # training only
    ("LayerNormalization", "stash_type"), ("RMSNormalization", "stash_type"),  # kiln computes wider
    ("Cast", "saturate"),  # float8 only; lift_dtypes' Cast converter keeps it where it matters
    ("Dropout", "seed"), ("Dropout", "ratio"),
}
ModelSource = onnx.ModelProto | str | os.PathLike | bytes | bytearray | memoryview
# ONNX ops kiln folds (never computes) whose scalar operands decide their output's length
SHAPE_PRODUCERS = frozenset({"Range"})


# ====================================================================== loading

def load_model(source: ModelSource) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` from a ModelProto, a path or the serialized bytes.

    ``InvalidModelError`` says ``"<path> is not a valid ONNX model: <why>"`` for
    files that do not parse (not protobuf, truncated) or parse into no graph.
    External data next to a path is loaded.
    """
    if isinstance(source, onnx.ModelProto):
        return source
    base_dir: str | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), "the given bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = os.fspath(source)
        if not path.exists():
            raise FrontendError(f"{label}: no such file")
        if path.is_dir():
            raise InvalidModelError(f"{label} is a directory, not an ONNX model file")
        try:
            data, base_dir = path.read_bytes(), str(path.parent)
        except OSError as e:
            raise FrontendError(f"{label}: cannot read the file: {e.strerror or e}") from None
    else:
        raise TypeError(f"lift() takes an onnx.ModelProto, a path or bytes, not {type(source).__name__}")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InvalidModelError(f"{label} is not a valid ONNX model: {e} "
                                f"({len(data)} bytes; is the file truncated or not ONNX?)") from None
    problem = None
    if not data:
        problem = "the file is empty"
    elif not model.HasField("graph"):
        problem = "it parses as protobuf but has no graph (is it an ONNX model file?)"
    elif model.ir_version <= 0:
        problem = "it has no ir_version"
    elif not model.opset_import:
        problem = "it declares no opset_import (the file may be truncated)"
    if problem:
        raise InvalidModelError(f"{label} is not a valid ONNX model: {problem}")
    if base_dir is not None and _has_external_data(model):
        try:
            from onnx.external_data_helper import load_external_data_for_model
            load_external_data_for_model(model, base_dir)
        except Exception as e:  # noqa: BLE001 - OSError, onnx's ValidationError (a location outside the folder)
            raise InvalidModelError(f"{label}: cannot load its external data: {e}") from None
    return model


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _label(source: ModelSource, model: onnx.ModelProto) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"model {model.graph.name!r}" if model.graph.name else "the model"


# ====================================================================== public entry points

def lift(model: ModelSource, *, canonicalize: bool = True,
         input_shapes: dict[str, Sequence[int | str]] | None = None, params_as_inputs: bool = False,
         input_values: Mapping[str, Any] | None = None, limits: Limits | None = None) -> Graph:
    """ONNX -> kiln IR (see the module docstring); the result is verified.

    ``input_shapes`` overrides the declared shape of graph inputs by name
    (ints and symbol names), e.g. to make a dynamic batch static.
    ``params_as_inputs`` makes every used floating-point initializer with more
    than one element a graph input (after the model's own inputs, named as in
    the ONNX file, listed in ``graph.meta["params"]``), to be fed at run time
    for weight swapping and fine-tuning loops; integer and scalar initializers
    (shapes, indices, epsilons) stay constants.
    ``input_values`` specializes graph inputs: each named input becomes a
    constant of the given value (its dtype and declared shape must fit), so an
    operand kiln needs at compile time (a Reshape's shape, reduction axes...)
    computed from it folds; ``graph.meta["specialized"]`` records
    ``{name: value as a (nested) list}``. :func:`lift_specialized` picks the
    inputs to bind from a refusal.
    ``limits`` (default :data:`kiln.runtime.limits.DEFAULT_LIMITS`) bounds every constant lift
    materializes (``constant_bytes``: ConstantOfShape, folded Range, sparse constants...).

    Everything raised for a bad model is a ``kiln.Error`` (a ``FrontendError`` naming the file, or a
    ``LimitError``): onnx's and protobuf's errors, RecursionError and MemoryError included.
    """
    proto = load_model(model)
    label = _label(model, proto)
    with kiln_errors(label):
        graph = _Lifter(proto, label, input_shapes or {}, params_as_inputs, input_values or {},
                        limits or DEFAULT_LIMITS).run()
        graph.dce()
        if canonicalize:
            from .canonicalize import canonicalize as canon
            canon(graph)
        return ir.verify(graph)


@contextlib.contextmanager
def kiln_errors(label: str, stage: str = "lift") -> Any:
    """Turn anything but a kiln error raised in the block into a FrontendError naming ``label``.

    Malformed models reach onnx's checker and inliner, protobuf, numpy and deep recursion; an API
    caller who catches ``kiln.Error`` must see all of them. KeyboardInterrupt passes through.
    """
    try:
        yield
    except Error:
        raise
    except RecursionError:
        raise FrontendError(f"{label}: cannot {stage} the model: it is nested too deeply (graphs in "
                            f"attributes or chains deeper than Python's recursion limit)") from None
    except MemoryError as e:
        raise FrontendError(f"{label}: cannot {stage} the model: out of memory ({e or 'MemoryError'}); "
                            f"a constant or shape in it is too large") from None
    except Exception as e:  # noqa: BLE001 - the API boundary: every failure on bad input is a kiln.Error
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:300]
        raise FrontendError(f"{label}: cannot {stage} the model: {type(e).__name__}"
                            + (f": {first}" if first else "")) from e


def lift_specialized(model: ModelSource, examples: Mapping[str, Any], *, max_rounds: int = 8,
                     **kwargs: Any) -> Graph:
    """``lift``, binding (as ``input_values``) exactly the graph inputs that lift reports as deciding a
    compile-time operand, with their values from ``examples``; other inputs stay run-time inputs.

    Each round lifts with the inputs bound so far; a refusal whose dynamic operands name inputs that
    ``examples`` holds (and that are not bound yet) binds them and lifts again. Any other refusal, or
    one naming an input without an example, is raised as is (its message names the input).
    """
    proto = load_model(model)
    bound: dict[str, Any] = dict(kwargs.pop("input_values", None) or {})
    for _ in range(max_rounds):
        try:
            return lift(proto, input_values=bound, **kwargs)
        except UnsupportedOpsError as e:
            new = [n for n in e.specializable if n in examples and n not in bound]
            if not new:
                raise
            bound.update({n: examples[n] for n in new})
    return lift(proto, input_values=bound, **kwargs)


# Ops of other runtimes' custom domains and the standard spelling kiln takes instead (no name likeness).
_KNOWN_ALTERNATIVES = {"FastGelu": "Gelu (approximate='tanh')", "BiasGelu": "Add + Gelu", "QuickGelu": "Sigmoid + Mul",
                       "SkipLayerNormalization": "Add + LayerNormalization", "SkipSimplifiedLayerNormalization":
                       "Add + RMSNormalization", "SimplifiedLayerNormalization": "RMSNormalization",
                       "MultiHeadAttention": "Attention", "GroupQueryAttention": "Attention (kv_num_heads)",
                       "FusedConv": "Conv + activation", "FusedGemm": "Gemm + activation",
                       "FusedMatMul": "MatMul (with Transpose)", "BiasSoftmax": "Add + Softmax"}


def nearest_supported(op_type: str, domain: str = "") -> str | None:
    """The supported standard op that a user of ``op_type`` most likely wants, or None.

    A custom-domain op with a standard op's name, a known fused op of ONNX Runtime's optimizer, or the
    closest name among the ops kiln lifts (difflib, cutoff 0.75).
    """
    import difflib

    ops = supported_ops()
    if domain and op_type in ops:
        return f"the standard ai.onnx {op_type} (export without {domain} fusions)"
    if op_type in _KNOWN_ALTERNATIVES:
        return _KNOWN_ALTERNATIVES[op_type]
    close = difflib.get_close_matches(op_type, ops, n=1, cutoff=0.75)
    return close[0] if close else None


def supported_ops() -> list[str]:
    """The ONNX op types (default domain) that lift converts, sorted.

    Any other standard op is still lifted when all of its inputs are constant
    (it is folded with ``onnx.reference``).
    """
    return sorted(_converters())


# ====================================================================== converter tables

@dataclass(frozen=True)
class _Special:
    fn: Callable[[_Ctx], list[Value | None]]
    needs: tuple[str, ...]
    since: int | None = None


_SPECIAL: dict[str, _Special] = {}


def _special(*op_types: str, needs: Sequence[str] = (), since: int | None = None) -> Callable:
    """Register a converter for ``op_types``; ``since``: the newest ONNX version of the op it
    implements (default: the op's version at ``BASE_OPSET``)."""
    def deco(fn: Callable) -> Callable:
        for t in op_types:
            _SPECIAL[t] = _Special(fn, tuple(needs), since)
        return fn
    return deco


def _declared_since(op_type: str) -> int | None:
    """The newest version of ``op_type`` whose semantics kiln's converter implements."""
    spec = _SPECIAL.get(op_type)
    if spec is not None and spec.since is not None:
        return spec.since
    opdef = _generic_table().get(op_type)
    if spec is None and opdef is not None and opdef.onnx.since is not None:
        return opdef.onnx.since
    try:
        return onnx.defs.get_schema(op_type, BASE_OPSET, "").since_version
    except Exception:  # noqa: BLE001 - an op newer than BASE_OPSET with no declared version
        return None


def _signature(schema: Any) -> tuple:
    return ([(i.name, i.option) for i in schema.inputs], [(o.name, o.option) for o in schema.outputs],
            sorted((k, a.default_value.SerializeToString()) for k, a in schema.attributes.items()))


@cache
def version_gap(op_type: str, opset: int) -> str | None:
    """None when kiln implements ``op_type`` as the model's opset defines it, else why not.

    A version newer than kiln's whose inputs, outputs and attributes (with defaults) are those of
    kiln's version only widened its type constraints; the dtypes a model uses are checked when it
    is lifted, so such versions are accepted.
    """
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:  # noqa: BLE001 - not a standard op at this opset
        return None
    have = _declared_since(op_type)
    if have is None:
        return (f"{op_type} is defined since opset {schema.since_version}; kiln does not implement "
                f"this version")
    if schema.since_version <= have:
        return None
    base = onnx.defs.get_schema(op_type, have, "")
    for v in range(have + 1, schema.since_version + 1):
        try:
            s = onnx.defs.get_schema(op_type, v, "")
        except Exception:  # noqa: BLE001
            continue
        if s.since_version == v and _signature(s) != _signature(base):
            return (f"{op_type} changed in opset {v} (its inputs or attributes differ from version "
                    f"{base.since_version}, which kiln implements); re-export with opset_version={v - 1}")
    return None


def _generic_table() -> dict[str, OpDef]:
    table: dict[str, OpDef] = {}
    for opdef in all_ops().values():
        if opdef.onnx is not None and opdef.onnx.domain in ("", "ai.onnx"):
            table.setdefault(opdef.onnx.op_type, opdef)
    return table


def _converters() -> dict[str, Callable[[_Ctx], list[Value | None]]]:
    """ONNX op type -> converter, for the ops whose kiln ops are registered now."""
    ops = all_ops()
    table: dict[str, Callable] = {t: _make_generic(d) for t, d in _generic_table().items()}
    for t, spec in _SPECIAL.items():
        if all(n in ops for n in spec.needs):
            table[t] = spec.fn
        else:
            table.pop(t, None)
    return table


def _make_generic(opdef: OpDef) -> Callable:
    def convert(ctx: _Ctx) -> list[Value | None]:
        return ctx.generic(opdef)
    return convert


@cache
def _schema_defaults(op_type: str, opset: int) -> dict[str, Any]:
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:  # noqa: BLE001 - not a standard op at this opset
        return {}
    out = {}
    for name, a in schema.attributes.items():
        if a.default_value.name:
            out[name] = _attr_value(a.default_value)
    return out


def _attr_value(a: onnx.AttributeProto) -> Any:
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode("utf-8", "replace") for x in v]
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    return v


def _to_kind(kind: str, v: Any, what: str) -> Any:
    """An ONNX attribute value (or constant array) as a kiln attribute of ``kind``."""
    if isinstance(v, np.ndarray):
        if kind in ("ints", "floats"):
            return [int(x) if kind == "ints" else float(x) for x in v.reshape(-1).tolist()]
        if v.size != 1:
            raise _Refuse(f"{what} must be a single value, got shape {list(v.shape)}")
        v = v.reshape(-1)[0].item()
    if kind == "dtype":
        try:
            return kiln_dtype(int(v))
        except ValueError as e:
            raise _Refuse(f"{what}: {e}") from None
    if kind == "int":
        return int(v)
    if kind == "float":
        return float(v)
    if kind == "ints":
        return [int(x) for x in v]
    if kind == "floats":
        return [float(x) for x in v]
    return v


class _Refuse(Exception):
    """A node kiln cannot convert; collected into UnsupportedOpsError."""

    def __init__(self, reason: str = "", *, dynamic: bool = False, version: bool = False,
                 inputs: Sequence[str] = ()):
        super().__init__(reason)
        self.reason = reason
        self.dynamic = dynamic
        self.version = version
        self.inputs = list(inputs)  # graph inputs whose values decide the refused (dynamic) operand


# ====================================================================== the lifter

class _Lifter:
    def __init__(self, model: onnx.ModelProto, label: str, input_shapes: dict[str, Sequence[int | str]],
                 params_as_inputs: bool = False, input_values: Mapping[str, Any] | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        self.model = model
        self.limits = limits
        self.input_values = dict(input_values or {})
        self._inferred: dict[str, tuple[int, ...] | None] | None = None
        self.params_as_inputs = params_as_inputs
        self.label = label
        self.input_shapes = dict(input_shapes)
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
        self.g = Graph(_graph_name(model.graph.name))
        self.env: dict[str, Value | None] = {"": None}
        self.poisoned: set[str] = set()
        self.refusals: dict[tuple, Unsupported] = {}
        self.rename: dict[str, str] = {}
        self.skip: set[int] = set()
        self.symbols = 0
        self.converters = _converters()
        self._next_suffix: dict[str, int] = {}
        self._claimed: set[str] = set()

    # ------------------------------------------------------------ driver
    def run(self) -> Graph:
        opset = self._check_opset()
        self.opset = opset
        if self.model.functions:
            try:
                self.model = onnx.inliner.inline_local_functions(self.model)
            except Exception as e:  # noqa: BLE001
                raise InvalidModelError(f"{self.label}: cannot inline its local functions: {e}") from None
        gp = self.model.graph
        if not gp.output:
            raise InvalidModelError(f"{self.label} has no graph outputs")
        self.onnx_names = _all_names(gp)
        nodes = self._ordered_nodes(gp)
        self.graph_outputs = {o.name for o in gp.output}
        self._plan_aliases(nodes)
        self.uses = Counter(self._nm(n) for k, node in enumerate(nodes) if k not in self.skip
                            for n in node.input if n)
        self.uses.update(o.name for o in gp.output)
        self.uses.update(self._nm(n) for k, node in enumerate(nodes) if k not in self.skip
                         for n in _outer_reads(node))  # If/Loop/Scan bodies read outer values too
        self._inputs(gp)
        for idx, node in enumerate(nodes):
            if idx in self.skip:
                continue
            self._node(node)
        if self.refusals:
            items = list(self.refusals.values())
            cls = DynamicShapeError if all(i.dynamic for i in items) else UnsupportedOpsError
            raise cls(items, self.label)
        outs = []
        for o in gp.output:
            v = self.env.get(self._nm(o.name))
            if v is None:
                raise InvalidModelError(f"{self.label}: graph output {o.name!r} is not computed by the graph")
            self._check_declared(o, v)
            outs.append(v)
        self.g.set_outputs(outs)
        return self.g

    def _check_opset(self) -> int:
        opset = self.opsets.get("")
        if opset is None:
            if any(n.domain in ("", "ai.onnx") for n in self.model.graph.node):
                raise InvalidModelError(f"{self.label} uses standard ONNX ops but declares no ai.onnx opset")
            return MAX_OPSET
        if opset < MIN_OPSET:
            self.model = self._convert_old(opset)
            self.opsets[""] = opset = MIN_OPSET
        if opset > MAX_OPSET:
            raise OpsetError(
                f"{self.label} uses ONNX opset {opset}, which is newer than kiln supports "
                f"(opsets {MIN_OPSET}..{MAX_OPSET}); re-export it with opset_version={MAX_OPSET} or older")
        return opset

    def _convert_old(self, opset: int) -> onnx.ModelProto:
        """A model older than MIN_OPSET, converted by ``onnx.version_converter`` (and logged)."""
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(self.model, MIN_OPSET)
        except Exception as e:  # noqa: BLE001 - the converter's errors are plain RuntimeErrors
            raise OpsetError(
                f"{self.label} uses ONNX opset {opset}, older than kiln supports (opsets {MIN_OPSET}.."
                f"{MAX_OPSET}), and onnx.version_converter cannot convert it to opset {MIN_OPSET}: "
                f"{' '.join(str(e).split())[:300]}; re-export it with a newer opset") from None
        _log.warning("%s uses ONNX opset %d; converted to opset %d with onnx.version_converter",
                     self.label, opset, MIN_OPSET)
        return converted

    def _ordered_nodes(self, gp: onnx.GraphProto) -> list[onnx.NodeProto]:
        """The nodes in topological order; dangling inputs and double definitions are errors."""
        defined: dict[str, str] = {}
        for i in gp.input:
            defined.setdefault(i.name, "graph input")
        for t in gp.initializer:
            defined[t.name] = "initializer"
        producer: dict[str, int] = {}
        for k, node in enumerate(gp.node):
            for o in node.output:
                if not o:
                    continue
                if o in producer or o in defined:
                    first = f"node {_node_label(gp.node[producer[o]])}" if o in producer else defined[o]
                    raise InvalidModelError(f"{self.label}: value {o!r} is defined twice "
                                            f"(by {first} and by node {_node_label(node)})")
                producer[o] = k
        for node in gp.node:
            for i in node.input:
                if i and i not in producer and i not in defined:
                    raise DanglingInputError(
                        f"{self.label}: node {_node_label(node)} reads {i!r}, which no node, initializer "
                        f"or graph input defines (dangling input)", _node_label(node), i)
        for o in gp.output:
            if o.name not in producer and o.name not in defined:
                raise InvalidModelError(f"{self.label}: graph output {o.name!r} is not defined by any node, "
                                        f"initializer or graph input")
        # Kahn's algorithm, stable: already-sorted graphs come back unchanged.
        deps = [{producer[i] for i in n.input if i in producer} for n in gp.node]
        if all(all(d < k for d in ds) for k, ds in enumerate(deps)):
            return list(gp.node)
        users: dict[int, list[int]] = {}
        for k, ds in enumerate(deps):
            for d in ds:
                users.setdefault(d, []).append(k)
        pending = [len(ds) for ds in deps]
        ready = [k for k, p in enumerate(pending) if p == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            k = heapq.heappop(ready)
            order.append(k)
            for u in users.get(k, []):
                pending[u] -= 1
                if pending[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) != len(gp.node):
            stuck = [_node_label(gp.node[k]) for k, p in enumerate(pending) if p > 0][:5]
            raise InvalidModelError(f"{self.label}: the graph has a cycle (through nodes {stuck})")
        return [gp.node[k] for k in order]

    def _plan_aliases(self, nodes: list[onnx.NodeProto]) -> None:
        """Identity nodes that only rename a node's output to a graph output: give the producer that name."""
        produced = {o for n in nodes for o in n.output if o}
        for idx, node in enumerate(nodes):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
                continue
            src, dst = node.input[0], node.output[0]
            if (dst in self.graph_outputs and src in produced and src not in self.graph_outputs
                    and src not in self.rename):
                self.rename[src] = dst
                self.skip.add(idx)

    def _nm(self, name: str) -> str:
        return self.rename.get(name, name)

    # ------------------------------------------------------------ inputs and initializers
    def _inputs(self, gp: onnx.GraphProto) -> None:
        inits = {t.name: t for t in gp.initializer}
        own = [i.name for i in gp.input if i.name not in inits]
        unknown = set(self.input_shapes) - set(own)
        if unknown:
            raise FrontendError(f"input_shapes names {sorted(unknown)}, which are not graph inputs of "
                                f"{self.label} (inputs: {own})")
        unknown = set(self.input_values) - set(own)
        if unknown:
            raise FrontendError(f"input_values names {sorted(unknown)}, which are not graph inputs of "
                                f"{self.label} (inputs: {own})")
        used_syms = {d.dim_param for i in gp.input for d in i.type.tensor_type.shape.dim if d.dim_param}
        self.used_syms = {_symbol(s) for s in used_syms}
        for vi in gp.input:
            if vi.name in inits:
                continue
            if vi.name in self.input_values:
                self.env[vi.name] = self._specialize(vi, self.input_values[vi.name])
                continue
            self.env[vi.name] = self.g.add_input(vi.name, self._input_type(vi))
        for name, t in inits.items():
            try:
                arr = numpy_helper.to_array(t)
            except Exception as e:  # noqa: BLE001
                raise InvalidModelError(f"{self.label}: initializer {name!r} cannot be read: {e}") from None
            try:
                self._as_kiln_array(arr, f"initializer {name!r}")
            except _Refuse as r:
                if self.uses[name]:  # an unused odd initializer (strings...) does no harm
                    item = Unsupported("<initializer>", "ai.onnx", self.opset, [name], r.reason)
                    self.refusals[("<initializer>", name)] = item
                self.poisoned.add(name)
                continue
            if self.params_as_inputs and arr.dtype.kind == "f" and arr.size > 1 and self.uses[name]:
                self.env[name] = self.g.add_input(name, TensorType.of(arr))
                self.g.meta.setdefault("params", []).append(name)
            else:
                self.env[name] = self.g.add_constant(arr, name)

    def inferred_shape(self, name: str) -> tuple[int, ...] | None:
        """The static shape that ONNX shape inference with data propagation gives ONNX value ``name``.

        Computed once, on first use (a node whose compile-time operand kiln cannot resolve), over the
        model with kiln's input types (``input_shapes`` applied, specialized inputs as initializers);
        None when inference fails or leaves a dim unknown.
        """
        if self._inferred is None:
            self._inferred = self._infer_shapes()
        return self._inferred.get(name)

    def _infer_shapes(self) -> dict[str, tuple[int, ...] | None]:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        gp = model.graph
        for vi in gp.input:
            v = self.env.get(vi.name)
            if v is None or v.is_const or not vi.type.HasField("tensor_type"):
                continue
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in v.type.shape:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = str(d)
        del gp.value_info[:]  # only what inference derives counts, not what the model claims
        for vi in gp.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        have = {t.name for t in gp.initializer}
        for name in self.g.meta.get("specialized", {}):
            if name not in have:
                gp.initializer.append(numpy_helper.from_array(self.env[name].const, name))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as e:  # noqa: BLE001 - inference is a best effort here
            _log.debug("%s: ONNX shape inference failed: %s", self.label, e)
            return {}
        out: dict[str, tuple[int, ...] | None] = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            dims = list(tt.shape.dim)
            if all(d.WhichOneof("value") == "dim_value" for d in dims):
                out[vi.name] = tuple(int(d.dim_value) for d in dims)
        return out

    def _specialize(self, vi: onnx.ValueInfoProto, value: Any) -> Value:
        """Graph input ``vi`` as a constant of ``value`` (its dtype and declared shape must fit)."""
        tt = vi.type.tensor_type
        if vi.type.WhichOneof("value") != "tensor_type":
            raise FrontendError(f"{self.label}: input_values[{vi.name!r}]: the input is not a tensor")
        try:
            want = TensorType(kiln_dtype(tt.elem_type), ()).np_dtype
        except ValueError as e:
            raise FrontendError(f"{self.label}: graph input {vi.name!r}: {e}") from None
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if arr.dtype != want:
            cast = arr.astype(want)
            if not np.array_equal(cast, arr):
                raise FrontendError(f"input_values[{vi.name!r}] has dtype {arr.dtype}, the input is "
                                    f"{want.name} (and the values do not convert exactly)")
            arr = cast
        if tt.HasField("shape"):
            dims = [d.dim_value if d.WhichOneof("value") == "dim_value" else None for d in tt.shape.dim]
            if len(dims) != arr.ndim or any(d is not None and d != n for d, n in zip(dims, arr.shape)):
                shown = ["?" if d is None else d for d in dims]
                raise FrontendError(f"input_values[{vi.name!r}] has shape {list(arr.shape)}, the input is "
                                    f"declared {shown}")
        self.g.meta.setdefault("specialized", {})[vi.name] = arr.tolist()
        return self.g.add_constant(np.array(arr), vi.name)

    def _input_type(self, vi: onnx.ValueInfoProto) -> TensorType:
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            what = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                    "sparse_tensor_type": "a sparse tensor"}.get(kind, "untyped")
            raise FrontendError(f"{self.label}: graph input {vi.name!r} is {what}; kiln takes dense tensors only")
        tt = vi.type.tensor_type
        try:
            dtype = kiln_dtype(tt.elem_type)
        except ValueError as e:
            raise FrontendError(f"{self.label}: graph input {vi.name!r}: {e}") from None
        declared: list[Dim] | None = None
        if tt.HasField("shape"):
            declared = []
            for d in tt.shape.dim:
                which = d.WhichOneof("value")
                if which == "dim_value" and d.dim_value < 0:
                    raise FrontendError(f"{self.label}: graph input {vi.name!r} declares dim {len(declared)} as "
                                        f"{d.dim_value}; a dim is a size >= 0 or a symbol (dim_param)")
                if which == "dim_value":
                    declared.append(int(d.dim_value))
                elif which == "dim_param" and d.dim_param:
                    declared.append(_symbol(d.dim_param))
                else:
                    declared.append(self._fresh_symbol())
        if vi.name in self.input_shapes:
            given = [d if isinstance(d, str) else int(d) for d in self.input_shapes[vi.name]]
            if declared is not None:
                if len(given) != len(declared):
                    raise FrontendError(f"input_shapes[{vi.name!r}] = {given} has rank {len(given)}, but the "
                                        f"model declares rank {len(declared)} ({declared})")
                for k, (a, b) in enumerate(zip(given, declared)):
                    if isinstance(a, int) and isinstance(b, int) and a != b:
                        raise FrontendError(f"input_shapes[{vi.name!r}] = {given}: dim {k} is {a} but the "
                                            f"model declares {b}")
            declared = given
        if declared is None:
            raise DynamicShapeError([Unsupported("<graph input>", "", self.opset, [vi.name],
                                                 "the input has no declared rank", dynamic=True)], self.label)
        try:
            return TensorType(dtype, tuple(declared))
        except ValueError as e:
            raise FrontendError(f"{self.label}: graph input {vi.name!r}: {e}") from None

    def _fresh_symbol(self) -> str:
        while True:
            s = f"d{self.symbols}"
            self.symbols += 1
            if s not in self.used_syms:
                return s

    def check_constant(self, shape: Sequence[int], dtype: np.dtype, what: str) -> None:
        """LimitError when a constant of ``shape`` and ``dtype`` is past ``limits.constant_bytes``; call it
        before the constant is allocated (a 100-byte ConstantOfShape can ask for terabytes)."""
        nbytes = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
        check_limit(self.limits, "constant_bytes", nbytes,
                    f"{self.label}: {what} ({np.dtype(dtype)}{[int(d) for d in shape]})")

    def _as_kiln_array(self, arr: np.ndarray, what: str) -> np.ndarray:
        try:
            ir.types.from_numpy_dtype(arr.dtype)
        except KeyError:
            raise _Refuse(f"{what} has dtype {arr.dtype}, which kiln does not support") from None
        return arr

    def fresh(self, hint: str) -> str:
        """A value name free in the graph and not used by the ONNX model (so later ONNX names stay free)."""
        hint = hint or "v"
        k = self._next_suffix.get(hint, 0)  # resume where the last search for this hint stopped
        cand = hint if k == 0 else f"{hint}_{k}"
        while cand in self.onnx_names or cand in self._claimed or self.g.fresh_name(cand) != cand:
            k += 1
            cand = f"{hint}_{k}"
        self._next_suffix[hint] = k
        self._claimed.add(cand)  # the caller uses it: several unnamed outputs of one node stay distinct
        return cand

    def claim_output_name(self, name: str) -> str:
        """The ONNX name for a node output, unless it is already taken."""
        return name if name and self.g.fresh_name(name) == name else self.fresh(name or "v")

    # ------------------------------------------------------------ nodes
    def _node(self, node: onnx.NodeProto) -> None:
        domain = "" if node.domain == "ai.onnx" else node.domain
        ins = [self._nm(n) for n in node.input]
        outs = [self._nm(n) for n in node.output]
        if any(n in self.poisoned for n in ins):
            # Downstream of a refused node: nothing to convert, but an op kiln lacks is still listed.
            if (f"{domain}::{node.op_type}" if domain else node.op_type) not in self.converters:
                self._record(node, domain, "")
            self.poisoned.update(o for o in outs if o)
            return
        inputs = [self.env[n] for n in ins]
        ctx = _Ctx(self, node, domain, inputs, outs)
        try:
            results = self._convert(ctx)
        except _Refuse as r:
            self._record(node, domain, r.reason, r.dynamic, r.version, r.inputs)
            self.poisoned.update(o for o in outs if o)
            return
        except Error:
            raise
        except Exception as e:  # a malformed node, or a kiln bug: name the node either way
            raise FrontendError(f"{self.label}: lifting node {_node_label(node)} ({node.op_type}) failed: "
                                f"{type(e).__name__}: {e} (if the model is valid, this is a kiln bug: "
                                f"please file an issue)") from e
        if len(results) < len(outs):
            results = list(results) + [None] * (len(outs) - len(results))
        for name, v in zip(outs, results):
            if not name:
                continue
            if v is None:
                if self.uses[name]:
                    self._record(node, domain, f"output {name!r} is used but kiln does not compute it")
                    self.poisoned.add(name)
                continue
            self.env[name] = v

    def _convert(self, ctx: _Ctx) -> list[Value | None]:
        node = ctx.node
        if ctx.domain:
            conv = self.converters.get(f"{ctx.domain}::{node.op_type}")  # e.g. com.microsoft::QGemm
            if conv is None:
                raise _Refuse("")
            return conv(ctx)
        conv = self.converters.get(node.op_type)
        gap = version_gap(node.op_type, self.opset) if conv is not None else None
        if gap:
            raise _Refuse(gap, version=True)
        all_const = any(v is not None for v in ctx.inputs) and all(v is None or v.is_const for v in ctx.inputs)
        foldable = all_const and node.op_type not in NONDETERMINISTIC and not any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if conv is None:
            if foldable:
                return ctx.fold_with_reference()
            shaped = [i for i, v in enumerate(ctx.inputs) if v is not None and not v.is_const
                      and shape_expr(v) is not None]
            if shaped and node.op_type not in NONDETERMINISTIC:
                i = shaped[0]
                raise _Refuse(f"kiln has no {node.op_type} op and folds it only when its inputs are constant; "
                              f"input {i} is computed from a run-time shape ({_describe(ctx.inputs[i])})",
                              dynamic=True)
            runtime = [i for i, v in enumerate(ctx.inputs) if v is not None and not v.is_const]
            if node.op_type in SHAPE_PRODUCERS and all(ctx.inputs[i].type.is_static
                                                       and ctx.inputs[i].type.numel <= 1 for i in runtime):
                # e.g. Range(0, n) with n a graph input: its output's length is n, known once n is bound
                small = runtime
                i = small[0]
                raise _Refuse(f"kiln has no {node.op_type} op and folds it only when its inputs are constant; "
                              f"input {i} is computed at run time ({_describe(ctx.inputs[i])})",
                              dynamic=True, inputs=[n for k in small for n in value_sources(ctx.inputs[k])])
            raise _Refuse("")
        try:
            return conv(ctx)
        except _Refuse:
            if foldable:
                try:
                    return ctx.fold_with_reference()
                except _Refuse:
                    pass
            raise
        except OpTypeError as e:
            if foldable:
                try:
                    return ctx.fold_with_reference()
                except _Refuse:
                    pass
            raise _Refuse(f"kiln's type rule refuses it: {e}") from None

    def _record(self, node: onnx.NodeProto, domain: str, reason: str, dynamic: bool = False,
                version: bool = False, inputs: Sequence[str] = ()) -> None:
        opset = self.opsets.get(domain, 1)
        key = (node.op_type, domain, opset, reason)
        item = self.refusals.setdefault(key, Unsupported(node.op_type, domain or "ai.onnx", opset,
                                                         reason=reason, dynamic=dynamic, version=version,
                                                         nearest=None if reason else nearest_supported(
                                                             node.op_type, domain)))
        item.node_names.append(_node_label(node))
        item.inputs.extend(n for n in inputs if n not in item.inputs)

    def _check_declared(self, o: onnx.ValueInfoProto, v: Value) -> None:
        """The model's declared output type (where it is given) must agree with what kiln computes."""
        kind = o.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):
            what = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                    "sparse_tensor_type": "a sparse tensor"}.get(kind, kind)
            raise FrontendError(f"{self.label}: graph output {o.name!r} is {what}; kiln takes and returns dense "
                                f"tensors only")
        tt = o.type.tensor_type
        if not o.type.HasField("tensor_type") or not tt.elem_type:
            return
        try:
            want = kiln_dtype(tt.elem_type)
        except ValueError:
            want = None
        problems = []
        if want is not None and want != v.type.dtype:
            problems.append(f"dtype {want} vs {v.type.dtype}")
        if tt.HasField("shape"):
            dims = list(tt.shape.dim)
            if len(dims) != v.type.rank:
                problems.append(f"rank {len(dims)} vs {v.type.rank}")
            else:
                for k, (d, ours) in enumerate(zip(dims, v.type.shape)):
                    if d.WhichOneof("value") == "dim_value" and isinstance(ours, int) and d.dim_value != ours:
                        problems.append(f"dim {k}: {d.dim_value} vs {ours}")
        if problems:
            raise InvalidModelError(f"{self.label}: graph output {o.name!r} is declared one way and computed "
                                    f"another (declared vs kiln: {'; '.join(problems)}); the model's output "
                                    f"type is stale or a type rule is wrong")


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """The names a node's subgraphs (If/Loop/Scan bodies, nested too) read from enclosing scopes."""
    out: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            defined |= {o for n in g.node for o in n.output}
            reads = {i for n in g.node for i in n.input if i} | {o.name for o in g.output}
            reads |= {r for n in g.node for r in _outer_reads(n)}
            out |= reads - defined
    return out


def _graph_name(name: str) -> str:
    return name if name else "main"


def _symbol(param: str) -> str:
    """A kiln symbol for an ONNX dim_param: identifier characters only (``batch size`` -> ``batch_size``)."""
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in param.strip())
    if not s or s[0].isdigit():
        s = "s_" + s
    return s


def _all_names(gp: onnx.GraphProto) -> set[str]:
    names = {i.name for i in gp.input} | {t.name for t in gp.initializer}
    for n in gp.node:
        names.update(x for x in n.output if x)
    return names


def _node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return node.name
    first = next((o for o in node.output if o), "?")
    return f"<unnamed {node.op_type} -> {first}>"


# ====================================================================== per-node context

class _Ctx:
    """What a converter sees: the node, its inputs, and helpers that emit kiln ops (folding as they go)."""

    def __init__(self, lifter: _Lifter, node: onnx.NodeProto, domain: str, inputs: list[Value | None],
                 outs: list[str]):
        self.lifter = lifter
        self.g = lifter.g
        self.node = node
        self.domain = domain
        self.inputs = inputs
        self.outs = outs
        self.opset = lifter.opset
        self.attrs = {a.name: _attr_value(a) for a in node.attribute}

    # ------------------------------------------------------------ reading
    def attr(self, name: str, default: Any = None) -> Any:
        if name in self.attrs:
            return self.attrs[name]
        return _schema_defaults(self.node.op_type, self.opset).get(name, default)

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def x(self, i: int = 0) -> Value:
        v = self.input(i)
        if v is None:
            raise _Refuse(f"required input {i} is absent")
        return v

    def output_used(self, i: int) -> bool:
        return i < len(self.outs) and bool(self.outs[i]) and self.lifter.uses[self.outs[i]] > 0

    def refuse_used_outputs(self, start: int, what: str) -> None:
        for i in range(start, len(self.outs)):
            if self.output_used(i):
                raise _Refuse(f"its output {i} ({what}) is used, which kiln cannot compute")

    def const_input(self, i: int, what: str) -> np.ndarray | None:
        """Input i as a constant array (None when absent); refused as a dynamic shape otherwise."""
        v = self.input(i)
        if v is None:
            return None
        if v.is_const:
            return v.const
        sym = shape_expr(v)
        if sym is not None and all(isinstance(d, int) for d in sym):
            return np.array(sym, dtype=v.type.np_dtype).reshape(_static(v.type.shape))
        raise self.dynamic(i, what)

    def dynamic(self, i: int, what: str) -> _Refuse:
        """The refusal of a run-time operand ``i``, naming the graph inputs whose values decide it."""
        v = self.input(i)
        src = _describe(v)
        return _Refuse(f"input {i} ({what}) is computed at run time ({src}); kiln needs it constant",
                        dynamic=True, inputs=[] if v is None else value_sources(v))

    def inferred_output(self, i: int = 0) -> tuple[int, ...] | None:
        """Output ``i``'s static shape by ONNX shape inference (with data propagation), if it has one."""
        if i >= len(self.node.output) or not self.node.output[i]:
            return None
        return self.lifter.inferred_shape(self.node.output[i])

    def static_shape(self, v: Value, what: str) -> tuple[int, ...]:
        if not v.type.is_static:
            raise _Refuse(f"{what} needs a static shape, got {v.type}", dynamic=True)
        return tuple(int(d) for d in v.type.shape)

    # ------------------------------------------------------------ emitting
    def op(self, kop: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None, *,
           out: int | None = None) -> Value:
        """Emit one single-output kiln op (folded when its operands are constant and its result small)."""
        return self.op_multi(kop, inputs, attrs, outs=None if out is None else [out])[0]

    def op_multi(self, kop: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None, *,
                 outs: Sequence[int] | None = None) -> list[Value]:
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        opdef = get_op(kop)
        attrs = opdef.complete_attrs(dict(attrs or {}))
        types = infer_types(kop, [None if v is None else v.type for v in inputs], attrs)
        names = self._out_names(kop, types, outs)
        present = [v for v in inputs if v is not None]
        if types and all(t.is_static and t.numel == 0 for t in types):  # no elements: nothing to compute
            return [self.g.add_constant(np.zeros(tuple(t.shape), t.np_dtype), n) for t, n in zip(types, names)]
        if present and all(v.is_const for v in present) and kop not in NEVER_FOLD and all(t.is_static for t in types) \
                and sum(int(np.prod(t.shape, dtype=np.int64)) for t in types) <= LIFT_FOLD_LIMIT:
            arrays = run_node(Node(kop, attrs, self.node.name or kop),
                              [None if v is None else v.const for v in inputs])
            if all(a.dtype == t.np_dtype and a.shape == tuple(t.shape) for a, t in zip(arrays, types)):
                return [self.g.add_constant(a, n) for a, n in zip(arrays, names)]
        node = self.g.add_node(kop, inputs, attrs, name=self.node.name, out_types=types, out_names=names)
        return list(node.outputs)

    def _out_names(self, kop: str, types: list[TensorType], outs: Sequence[int] | None) -> list[str]:
        names = []
        for k in range(len(types)):
            if outs is not None and k < len(outs) and outs[k] < len(self.outs) and self.outs[outs[k]]:
                names.append(self.lifter.claim_output_name(self.outs[outs[k]]))
            else:
                base = next((o for o in self.outs if o), kop)
                names.append(self.lifter.fresh(f"{base}_{kop}"))
        return names

    def const(self, arr: np.ndarray, *, out: int | None = None, like: Value | None = None) -> Value:
        """A constant (cast to ``like``'s dtype when given), named after output ``out`` if given."""
        arr = np.asarray(arr)
        self.lifter.check_constant(arr.shape, arr.dtype if like is None else like.type.np_dtype,
                                   f"the constant computed by {_node_label(self.node)}")
        if like is not None:
            arr = arr.astype(like.type.np_dtype)
        self.lifter._as_kiln_array(arr, "a constant")
        if out is not None and out < len(self.outs) and self.outs[out]:
            name = self.lifter.claim_output_name(self.outs[out])
        else:
            name = self.lifter.fresh(f"{next((o for o in self.outs if o), 'c')}_const")
        return self.g.add_constant(arr, name)

    def scalar(self, value: float, like: Value) -> Value:
        return self.const(np.array(value, dtype=like.type.np_dtype))

    # ------------------------------------------------------------ generic conversion
    def kiln_attrs(self, opdef: OpDef, *, skip: Sequence[str] = ()) -> dict[str, Any]:
        """The node's ONNX attributes (schema defaults filled in) as kiln attributes of ``opdef``."""
        spec = opdef.onnx
        rev = {v: k for k, v in (spec.attr_names if spec else {}).items()}
        defaults = _schema_defaults(self.node.op_type, self.opset)
        out: dict[str, Any] = {}
        for name, val in {**defaults, **self.attrs}.items():
            if name in skip:
                continue
            kname = rev.get(name, name)
            if kname in opdef.attrs:
                try:
                    out[kname] = _to_kind(opdef.attrs[kname].kind, val, f"attribute {name}")
                except (TypeError, ValueError) as e:
                    raise _Refuse(f"attribute {name}={_short(val)} does not fit kiln's {kname}: {e}") from None
            elif (self.node.op_type, name) in _IGNORED_ATTRS or name not in self.attrs:
                continue
            elif name in defaults and _same(val, defaults[name]):
                continue
            else:
                raise _Refuse(f"attribute {name}={_short(val)} is not supported")
        return out

    def generic(self, opdef: OpDef, *, attrs: dict[str, Any] | None = None,
                skip_attrs: Sequence[str] = ()) -> list[Value | None]:
        """Convert the node 1:1 to ``opdef`` (attributes by name, ``attr_inputs`` made attributes)."""
        kattrs = self.kiln_attrs(opdef, skip=skip_attrs)
        kattrs.update(attrs or {})
        spec = opdef.onnx
        attr_inputs = spec.attr_inputs if spec else {}
        inputs: list[Value | None] = []
        for i, v in enumerate(self.inputs):
            if i in attr_inputs:
                kname = attr_inputs[i]
                arr = self.const_input(i, kname)
                if arr is not None:
                    kattrs[kname] = _to_kind(opdef.attrs[kname].kind, arr, f"input {i} ({kname})")
            else:
                inputs.append(v)
        n_out = len(self.outs) if opdef.variadic_outputs else len(opdef.outputs)
        self.refuse_used_outputs(n_out, "an output kiln's op does not have")
        results = self.op_multi(opdef.name, inputs, kattrs, outs=list(range(n_out)))
        return list(results)

    # ------------------------------------------------------------ folding unknown ops
    def _check_range(self) -> None:
        """Range's length from its constant operands, checked against the limit before folding allocates it."""
        ops = [None if v is None or v.const is None or v.const.size != 1 else v.const for v in self.inputs[:3]]
        if len(ops) != 3 or any(a is None for a in ops):
            raise _Refuse("start, limit and delta must be constant scalars")
        start, limit, delta = (float(np.asarray(a).reshape(())) for a in ops)
        if not all(math.isfinite(x) for x in (start, limit, delta)) or delta == 0:
            raise _Refuse(f"start={start:g}, limit={limit:g}, delta={delta:g} give no finite sequence")
        n = max(math.ceil((limit - start) / delta), 0)
        self.lifter.check_constant((n,), ops[0].dtype, f"the result of {_node_label(self.node)}")

    def fold_with_reference(self) -> list[Value | None]:
        """Evaluate this all-constant node with onnx.reference (for ops kiln has no op for)."""
        from onnx.reference import ReferenceEvaluator

        node = self.node
        if node.op_type == "Range":
            self._check_range()
        feeds, vis = {}, []
        for name, v in zip(node.input, self.inputs):
            if name and v is not None:
                feeds[name] = v.const
                vis.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.const.dtype),
                                                         list(v.const.shape)))
        outs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
        model = helper.make_model(
            helper.make_graph([node], "fold", vis, outs),
            opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception as e:  # noqa: BLE001 - any failure means we cannot fold it
            raise _Refuse(f"cannot be evaluated at compile time: {e}") from None
        vals: list[Value | None] = []
        it = iter(results)
        for k, o in enumerate(node.output):
            if not o:
                vals.append(None)
                continue
            arr = np.asarray(next(it))
            if arr.dtype == object or arr.dtype.kind in "USO":
                raise _Refuse("its constant result is not a numeric tensor")
            vals.append(self.const(self.lifter._as_kiln_array(arr, f"output {o!r}"), out=k))
        return vals


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:  # noqa: BLE001
        return a == b


def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"<tensor {v.dtype}{list(v.shape)}>"
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "..."


def _static(shape: Sequence[Dim]) -> tuple[int, ...]:
    return tuple(int(d) if isinstance(d, int) else 1 for d in shape)


def value_sources(v: Value) -> list[str]:
    """The graph inputs whose values ``v`` is computed from (not through their shapes alone)."""
    out: list[str] = []
    seen: set[int] = set()
    stack = [v]
    while stack:
        u = stack.pop()
        if id(u) in seen or u.is_const:
            continue
        seen.add(id(u))
        p = u.producer
        if p is None:
            out.append(u.name)
        elif p.op != "shape":
            stack.extend(x for x in p.inputs if x is not None)
    return sorted(out)


def _describe(v: Value | None) -> str:
    if v is None:
        return "absent"
    if v.producer is None:
        return f"graph input {v.name!r}"
    return f"%{v.name} = {v.producer.op}(...)"


# ====================================================================== symbolic shape expressions

def shape_expr(v: Value, depth: int = 0) -> tuple[Dim, ...] | None:
    """The elements of a 0-d/1-d integer value as dims (ints or symbols), when kiln can tell.

    Tracks ``shape`` of symbolically shaped values through gather, slice,
    concat, (un)squeeze, reshape, cast, mul, exact div and integer add/sub.
    """
    t = v.type
    if t.rank > 1 or t.dtype not in ("i64", "i32", "f32", "f64") or depth > 64:
        return None
    if v.is_const:
        return tuple(int(x) for x in np.asarray(v.const).reshape(-1))
    p = v.producer
    if p is None:
        return None
    a = p.attrs
    if p.op == "shape":
        shp = p.inputs[0].type.shape
        r = len(shp)
        start = a.get("start", 0) or 0
        end = a.get("end")
        start = min(max(start + r if start < 0 else start, 0), r)
        end = r if end is None else min(max(end + r if end < 0 else end, 0), r)
        return tuple(shp[start:end])
    if p.op in ("cast", "identity", "squeeze", "unsqueeze", "reshape", "flatten"):
        return shape_expr(p.inputs[0], depth + 1)
    if p.op == "gather":
        data = shape_expr(p.inputs[0], depth + 1)
        idx = p.inputs[1]
        if data is None or not idx.is_const or p.inputs[0].type.rank != 1:
            return None
        return tuple(data[int(i)] for i in np.asarray(idx.const).reshape(-1))
    if p.op == "slice":
        data = shape_expr(p.inputs[0], depth + 1)
        if data is None:
            return None
        starts, ends = a.get("starts") or [0], a.get("ends") or [len(data)]
        steps = a.get("steps") or [1]
        if len(starts) != 1:
            return None
        return tuple(data[slice(_clamp_index(starts[0], len(data)), _clamp_index(ends[0], len(data)), steps[0])])
    if p.op == "concat":
        parts = [shape_expr(x, depth + 1) for x in p.inputs]
        if any(x is None for x in parts):
            return None
        return tuple(d for part in parts for d in part)
    if p.op in ("add", "sub") and t.dtype in ("i64", "i32"):
        lhs, rhs = (shape_expr(x, depth + 1) for x in p.inputs[:2])
        if lhs is None or rhs is None or len(lhs) != len(rhs) and 1 not in (len(lhs), len(rhs)):
            return None
        n = max(len(lhs), len(rhs))
        lhs, rhs = (x * n if len(x) == 1 else x for x in (lhs, rhs))
        out_sum: list[Dim] = []
        for x, y in zip(lhs, rhs):
            if isinstance(x, int) and isinstance(y, int):
                out_sum.append(x + y if p.op == "add" else x - y)
            elif y == 0:
                out_sum.append(x)
            elif x == 0 and p.op == "add":
                out_sum.append(y)
            else:
                return None
        return tuple(out_sum)
    if p.op in ("mul", "div"):
        lhs, rhs = (shape_expr(x, depth + 1) for x in p.inputs[:2])
        if lhs is None or rhs is None:
            return None
        n = max(len(lhs), len(rhs))
        lhs, rhs = (x * n if len(x) == 1 else x for x in (lhs, rhs))
        if len(lhs) != len(rhs):
            return None
        if p.op == "mul":
            return tuple(dim_mul(x, y) for x, y in zip(lhs, rhs))
        out = []
        for x, y in zip(lhs, rhs):
            q = dim_div(x, y)
            if q is None:
                return None
            out.append(q)
        return tuple(out)
    return None


def _clamp_index(i: int, n: int) -> int:
    if i < 0:
        i += n
    return min(max(i, 0), n)


def reshape_target(in_shape: Sequence[Dim], target: Sequence[Dim], allowzero: int = 0) -> list[int] | None:
    """An ONNX reshape target of ints for a target that may contain symbolic dims.

    A symbolic dim at position i that equals ``in_shape[i]`` becomes 0 (copy);
    at most one other symbolic dim becomes -1 (when the target has no -1 yet).
    None when the target cannot be written so.
    """
    out: list[int] = []
    minus_one = any(isinstance(d, int) and d == -1 for d in target)
    for i, d in enumerate(target):
        if isinstance(d, int):
            if allowzero == 0 and d == 0 and i >= len(in_shape):
                return None
            out.append(d)
        elif not allowzero and i < len(in_shape) and in_shape[i] == d:
            out.append(0)
        elif not minus_one:
            out.append(-1)
            minus_one = True
        else:
            return None
    return out


# ====================================================================== special converters

def _shape_operand(ctx: _Ctx, i: int, what: str,
                   from_output: Callable[[tuple[int, ...]], Sequence[int] | None]) -> np.ndarray | None:
    """Input ``i`` as a constant, else derived by ``from_output`` from the node's output shape as ONNX
    shape inference (with data propagation) gives it; refused as a dynamic operand when neither works."""
    try:
        return ctx.const_input(i, what)
    except _Refuse as refusal:
        out = ctx.inferred_output(0)
        derived = None if out is None else from_output(out)
        if derived is None:
            raise refusal from None
        return np.array(list(derived), dtype=np.int64)



@_special("Identity")
def _identity(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    out = ctx.outs[0]
    if out in ctx.lifter.graph_outputs and x.name != out:
        return [ctx.op("identity", [x], out=0)]
    return [x]


@_special("Dropout")
def _dropout(ctx: _Ctx) -> list[Value | None]:
    """Inference Dropout is the identity (mask all true). training_mode must be constant (a graph input
    is refused as a dynamic operand, so it can be specialized); when true, only ratio 0 is kept (the
    identity again): any other ratio draws random numbers."""
    x = ctx.x()
    if ctx.opset >= 12 and ctx.input(2) is not None:
        tm = ctx.const_input(2, "training_mode")
        if bool(np.asarray(tm).reshape(-1)[0]):
            ratio = ctx.const_input(1, "ratio")
            r = 0.5 if ratio is None else float(np.asarray(ratio).reshape(-1)[0])
            if r != 0.0:
                raise _Refuse(f"training_mode is true with ratio {r:g}: random dropout; kiln lifts inference "
                              f"graphs (export with module.eval())")
    results: list[Value | None] = [x]
    if ctx.output_used(1):
        if ctx.opset < 10:
            raise _Refuse("its mask output is used; before opset 10 the mask has the data's type and "
                          "runtimes disagree on its inference value")
        shape = ctx.static_shape(x, "Dropout's mask output")
        results.append(ctx.const(np.ones(shape, dtype=bool), out=1))
    out = ctx.outs[0]
    if out in ctx.lifter.graph_outputs and x.name != out:
        results[0] = ctx.op("identity", [x], out=0)
    return results


@_special("Constant")
def _constant(ctx: _Ctx) -> list[Value | None]:
    a = ctx.attrs
    if "value" in a:
        arr = a["value"]
    elif "value_float" in a:
        arr = np.array(a["value_float"], dtype=np.float32)
    elif "value_floats" in a:
        arr = np.array(a["value_floats"], dtype=np.float32)
    elif "value_int" in a:
        arr = np.array(a["value_int"], dtype=np.int64)
    elif "value_ints" in a:
        arr = np.array(a["value_ints"], dtype=np.int64)
    elif "sparse_value" in a:
        sp = next(t.sparse_tensor for t in ctx.node.attribute if t.name == "sparse_value")
        ctx.lifter.check_constant(tuple(sp.dims), helper.tensor_dtype_to_np_dtype(sp.values.data_type),
                                  f"the sparse constant of {_node_label(ctx.node)}")
        arr = _dense(ctx.node.attribute)
    else:
        kinds = sorted(a) or ["no value"]
        raise _Refuse(f"a Constant holding {', '.join(kinds)} (strings are not tensors kiln computes on)")
    return [ctx.const(ctx.lifter._as_kiln_array(np.asarray(arr), "the constant"), out=0)]


def _dense(attributes: Sequence[onnx.AttributeProto]) -> np.ndarray:
    sp = next(a.sparse_tensor for a in attributes if a.name == "sparse_value")
    values = numpy_helper.to_array(sp.values)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(tuple(sp.dims), dtype=values.dtype)
    if idx.ndim == 1:
        dense.reshape(-1)[idx] = values
    else:
        dense[tuple(idx.T)] = values
    return dense


@_special("ConstantOfShape")
def _constant_of_shape(ctx: _Ctx) -> list[Value | None]:
    shape = _shape_operand(ctx, 0, "shape", lambda out: out)
    value = ctx.attrs.get("value")
    fill = np.zeros((), np.float32) if value is None else np.asarray(value).reshape(-1)[:1].reshape(())
    shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
    if any(s < 0 for s in shape):
        raise _Refuse(f"negative shape {list(shape)}")
    ctx.lifter.check_constant(shape, fill.dtype, f"the constant of {_node_label(ctx.node)}")
    arr = np.broadcast_to(fill, shape) if int(np.prod(shape, dtype=np.int64)) > LIFT_FOLD_LIMIT \
        else np.full(shape, fill, dtype=fill.dtype)
    return [ctx.const(arr, out=0)]


@_special("Shape", needs=("shape",))
def _shape(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    start, end = ctx.attr("start", 0), ctx.attrs.get("end")
    r = x.type.rank
    lo = _clamp_index(start, r)
    hi = r if end is None else _clamp_index(end, r)
    dims = x.type.shape[lo:hi]
    if all(isinstance(d, int) for d in dims):
        return [ctx.const(np.array(dims, dtype=np.int64), out=0)]
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    return [ctx.op("shape", [x], attrs, out=0)]


@_special("Size")
def _size(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    shape = ctx.static_shape(x, "Size")
    return [ctx.const(np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64), out=0)]


@_special("Gemm", needs=("matmul", "transpose", "mul", "add"))
def _gemm(ctx: _Ctx) -> list[Value | None]:
    a, b, c = ctx.x(0), ctx.x(1), ctx.input(2)
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    if ctx.attr("transA", 0):
        a = ctx.op("transpose", [a], {"perm": [1, 0]})
    if ctx.attr("transB", 0):
        b = ctx.op("transpose", [b], {"perm": [1, 0]})
    scale_after = alpha != 1.0 and not b.is_const
    if alpha != 1.0 and b.is_const:
        b = ctx.op("mul", [b, ctx.scalar(alpha, b)])
    has_c = c is not None and beta != 0.0
    y = ctx.op("matmul", [a, b], out=None if (has_c or scale_after) else 0)
    if scale_after:
        y = ctx.op("mul", [y, ctx.scalar(alpha, y)], out=None if has_c else 0)
    if has_c:
        if beta != 1.0:
            c = ctx.op("mul", [c, ctx.scalar(beta, c)])
        y = ctx.op("add", [y, c], out=0)
    return [y]


def _spatial_pads(ctx: _Ctx, x: Value, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int], what: str) -> list[int]:
    """Explicit pads for the node's ``auto_pad`` (NOTSET: its ``pads`` attribute)."""
    n = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = list(ctx.attrs.get("pads") or [0] * 2 * n)
        if len(pads) != 2 * n:
            raise _Refuse(f"pads {pads} do not fit a {n}-d {what}")
        return pads
    if auto == "VALID":
        return [0] * 2 * n
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise _Refuse(f"auto_pad={auto!r} is not an ONNX auto_pad value")
    spatial = x.type.shape[2:]
    if not all(isinstance(d, int) for d in spatial):
        raise _Refuse(f"auto_pad={auto} needs static spatial dims, got {x.type}", dynamic=True)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _ints(v: Any, n: int, default: int) -> list[int]:
    return [int(x) for x in v] if v else [default] * n


def conv_window(ctx: _Ctx, x: Value, w: Value) -> dict[str, Any]:
    """A Conv-like node's strides, pads (auto_pad resolved), dilations and group, its kernel from the weight."""
    kernel = w.type.shape[2:]
    if not all(isinstance(k, int) for k in kernel):
        raise _Refuse(f"the weight needs a static shape, got {w.type}", dynamic=True)
    ks = ctx.attrs.get("kernel_shape")
    if ks and list(ks) != list(kernel):
        raise _Refuse(f"kernel_shape {list(ks)} disagrees with the weight's shape {w.type}")
    n = len(kernel)
    strides = _ints(ctx.attrs.get("strides"), n, 1)
    dilations = _ints(ctx.attrs.get("dilations"), n, 1)
    pads = _spatial_pads(ctx, x, kernel, strides, dilations, ctx.node.op_type)
    return {"strides": strides, "pads": pads, "dilations": dilations, "group": int(ctx.attr("group", 1))}


def pool_window(ctx: _Ctx, x: Value) -> dict[str, Any]:
    """A pooling node's kernel_shape, strides, pads (auto_pad resolved), dilations and ceil_mode."""
    kernel = [int(k) for k in ctx.attrs.get("kernel_shape", [])]
    if not kernel:
        raise _Refuse("kernel_shape is missing")
    n = len(kernel)
    strides = _ints(ctx.attrs.get("strides"), n, 1)
    dilations = _ints(ctx.attrs.get("dilations"), n, 1)
    pads = _spatial_pads(ctx, x, kernel, strides, dilations, ctx.node.op_type)
    return {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
            "ceil_mode": int(ctx.attr("ceil_mode", 0))}


@_special("Conv", needs=("conv",))
def _conv(ctx: _Ctx) -> list[Value | None]:
    x, w, b = ctx.x(0), ctx.x(1), ctx.input(2)
    return [ctx.op("conv", [x, w, b], conv_window(ctx, x, w), out=0)]


@_special("ConvTranspose", needs=("conv_transpose",))
def _conv_transpose(ctx: _Ctx) -> list[Value | None]:
    x, w, b = ctx.x(0), ctx.x(1), ctx.input(2)
    kernel = w.type.shape[2:]
    if not all(isinstance(k, int) for k in kernel):
        raise _Refuse(f"the weight needs a static shape, got {w.type}", dynamic=True)
    n = len(kernel)
    strides = _ints(ctx.attrs.get("strides"), n, 1)
    dilations = _ints(ctx.attrs.get("dilations"), n, 1)
    out_pad = _ints(ctx.attrs.get("output_padding"), n, 0)
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    output_shape = ctx.attrs.get("output_shape")
    if output_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        spatial = x.type.shape[2:]
        if not all(isinstance(d, int) for d in spatial):
            raise _Refuse(f"output_shape/auto_pad need static spatial dims, got {x.type}", dynamic=True)
        if output_shape:
            target = list(output_shape)[-n:]
        else:
            target = [d * s for d, s in zip(spatial, strides)]
        begins, ends = [], []
        for i in range(n):
            total = strides[i] * (spatial[i] - 1) + out_pad[i] + ((kernel[i] - 1) * dilations[i] + 1) - target[i]
            # Python's floor division matches the ONNX reference for negative totals too
            begin, end = (total // 2, total - total // 2) if auto == "SAME_UPPER" else (total - total // 2, total // 2)
            if begin < 0:
                raise _Refuse(f"output_shape {list(output_shape or target)} needs negative leading padding")
            if end < 0:  # a larger output than the natural size: extra rows at the end, as output_padding
                out_pad[i] += -end
                end = 0
            begins.append(begin)
            ends.append(end)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0] * 2 * n
    else:
        pads = _ints(ctx.attrs.get("pads"), 2 * n, 0)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": int(ctx.attr("group", 1)),
             "output_padding": out_pad}
    return [ctx.op("conv_transpose", [x, w, b], attrs, out=0)]


@_special("MaxPool", needs=("max_pool", "max_pool_with_indices"))
def _max_pool(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    attrs = pool_window(ctx, x)
    if ctx.output_used(1):
        attrs["storage_order"] = int(ctx.attr("storage_order", 0))
        return list(ctx.op_multi("max_pool_with_indices", [x], attrs, outs=[0, 1]))
    return [ctx.op("max_pool", [x], attrs, out=0)]


@_special("AveragePool", needs=("avg_pool",))
def _avg_pool(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    attrs = pool_window(ctx, x)
    dilations = attrs.pop("dilations")
    attrs["count_include_pad"] = int(ctx.attr("count_include_pad", 0))
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    return [ctx.op("avg_pool", [x], attrs, out=0)]


@_special("BatchNormalization", needs=("batch_norm", "reduce_mean", "sub", "mul", "add", "reshape"))
def _batch_norm(ctx: _Ctx) -> list[Value | None]:
    if ctx.opset < 9 and int(ctx.attrs.get("spatial", 1)) == 0:
        raise _Refuse("spatial=0 (per-activation statistics) is not supported")
    if int(ctx.attrs.get("training_mode", 0)):
        return _batch_norm_training(ctx)
    ctx.refuse_used_outputs(1, "running or saved mean/var of training mode")
    return ctx.generic(get_op("batch_norm"), skip_attrs=("spatial", "training_mode", "is_test"))


def _batch_norm_training(ctx: _Ctx) -> list[Value | None]:
    """training_mode=1 (opset 14+): normalize with the batch's statistics (mean and biased variance over
    every axis but 1); outputs running_mean/var = input * momentum + batch statistic * (1 - momentum)."""
    x, scale, bias, mean_in, var_in = (ctx.x(i) for i in range(5))
    if x.type.rank < 2:
        raise _Refuse(f"training mode needs an input of rank >= 2, got {x.type}")
    axes = [0, *range(2, x.type.rank)]
    c = x.type.shape[1]
    momentum = float(ctx.attr("momentum", 0.9))
    eps = float(ctx.attr("epsilon", 1e-5))
    mean_k = ctx.op("reduce_mean", [x], {"axes": axes, "keepdims": 1})
    d = ctx.op("sub", [x, mean_k])
    var_k = ctx.op("reduce_mean", [ctx.op("mul", [d, d])], {"axes": axes, "keepdims": 1})
    target = reshape_target(mean_k.type.shape, [c])
    if target is None:
        raise _Refuse(f"training mode needs a static channel dim, got {x.type}", dynamic=True)
    mean = ctx.op("reshape", [mean_k], {"shape": target})
    var = ctx.op("reshape", [var_k], {"shape": target})
    y = ctx.op("batch_norm", [x, scale, bias, mean, var], {"epsilon": eps}, out=0)
    results: list[Value | None] = [y]
    for k, (given, batch) in enumerate(((mean_in, mean), (var_in, var)), start=1):
        if not ctx.output_used(k):
            results.append(None)
            continue
        kept = ctx.op("mul", [given, ctx.scalar(momentum, given)])
        results.append(ctx.op("add", [kept, ctx.op("mul", [batch, ctx.scalar(1.0 - momentum, batch)])], out=k))
    return results


@_special("LayerNormalization", needs=("layer_norm", "cast", "reduce_mean", "sub", "mul", "add", "sqrt",
                                       "reciprocal"))
def _layer_norm(ctx: _Ctx) -> list[Value | None]:
    """Y is kiln's layer_norm; the Mean and InvStdDev outputs, when used, are computed beside it in the
    stash type (float32 unless stash_type says otherwise), as ONNX's function body does."""
    if not (ctx.output_used(1) or ctx.output_used(2)):
        return ctx.generic(get_op("layer_norm"))
    x, scale, bias = ctx.x(0), ctx.x(1), ctx.input(2)
    attrs = ctx.kiln_attrs(get_op("layer_norm"))
    y = ctx.op("layer_norm", [x, scale, bias], attrs, out=0)
    r = x.type.rank
    axis = int(attrs.get("axis", -1))
    if not -r <= axis < r:
        raise _Refuse(f"axis {axis} is out of range for rank {r}")
    axes = list(range(axis % r, r))
    stash = _to_kind("dtype", int(ctx.attr("stash_type", 1)), "stash_type")
    xu = x if x.type.dtype == stash else ctx.op("cast", [x], {"to": stash})
    mean = ctx.op("reduce_mean", [xu], {"axes": axes, "keepdims": 1}, out=1)
    d = ctx.op("sub", [xu, mean])
    var = ctx.op("reduce_mean", [ctx.op("mul", [d, d])], {"axes": axes, "keepdims": 1})
    eps = ctx.scalar(float(attrs.get("epsilon", 1e-5)), var)
    inv = ctx.op("reciprocal", [ctx.op("sqrt", [ctx.op("add", [var, eps])])], out=2)
    return [y, mean if ctx.output_used(1) else None, inv if ctx.output_used(2) else None]


def _softmax_like(kop: str) -> Callable[[_Ctx], list[Value | None]]:
    def convert(ctx: _Ctx) -> list[Value | None]:
        x = ctx.x()
        r = x.type.rank
        if ctx.opset >= 13:
            return [ctx.op(kop, [x], {"axis": int(ctx.attr("axis", -1))}, out=0)]
        axis = int(ctx.attr("axis", 1))
        a = axis + r if axis < 0 else axis
        if not 0 <= a < max(r, 1):
            raise _Refuse(f"axis {axis} is out of range for rank {r}")
        # Before opset 13 the input is coerced to 2-D [prod(d<a), prod(d>=a)]; when at most one of the
        # dims from a on can differ from 1, that equals kiln's softmax over that one axis.
        rest = x.type.shape[a:]
        non_one = [a + i for i, d in enumerate(rest) if d != 1]
        if len(non_one) <= 1:
            return [ctx.op(kop, [x], {"axis": non_one[0] if non_one else a}, out=0)]
        flat = ctx.op("flatten", [x], {"axis": a})
        y = ctx.op(kop, [flat], {"axis": 1})
        target = reshape_target(flat.type.shape, x.type.shape)
        if target is None:
            raise _Refuse(f"softmax over the flattened dims {a}.. of {x.type} needs a static shape",
                          dynamic=True)
        return [ctx.op("reshape", [y], {"shape": target}, out=0)]
    return convert


_special("Softmax", needs=("softmax", "flatten", "reshape"))(_softmax_like("softmax"))
_special("LogSoftmax", needs=("log_softmax", "flatten", "reshape"))(_softmax_like("log_softmax"))


@_special("Split", needs=("split",))
def _split(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    axis = int(ctx.attr("axis", 0))
    if ctx.opset >= 13:
        sizes = ctx.const_input(1, "split")
    else:
        sizes = ctx.attrs.get("split")
    n_outs = len(ctx.outs)
    if sizes is None or len(sizes) == 0:
        a = axis + x.type.rank if axis < 0 else axis
        dim = x.type.shape[a] if 0 <= a < x.type.rank else None
        if not isinstance(dim, int):
            raise _Refuse(f"splitting the symbolic dim {dim} of {x.type} into equal parts", dynamic=True)
        num = int(ctx.attrs.get("num_outputs", n_outs))
        if "num_outputs" in ctx.attrs:
            chunk = -(-dim // num)
            sizes = [chunk] * (num - 1) + [dim - chunk * (num - 1)]
        else:
            if dim % num:
                raise _Refuse(f"dim {dim} does not split into {num} equal parts")
            sizes = [dim // num] * num
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    outs = ctx.op_multi("split", [x], {"axis": axis, "split": sizes}, outs=list(range(len(sizes))))
    return list(outs)


@_special("Squeeze", needs=("squeeze",))
def _squeeze(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    axes = ctx.const_input(1, "axes") if ctx.opset >= 13 else ctx.attrs.get("axes")
    if axes is None or len(axes) == 0:
        if not all(isinstance(d, int) for d in x.type.shape):
            raise _Refuse(f"Squeeze without axes on {x.type}: which symbolic dims are 1 is unknown",
                          dynamic=True)
        axes = [i for i, d in enumerate(x.type.shape) if d == 1]
    return [ctx.op("squeeze", [x], {"axes": [int(a) for a in np.asarray(axes).reshape(-1)]}, out=0)]


def _reduce(kop: str) -> Callable[[_Ctx], list[Value | None]]:
    def convert(ctx: _Ctx) -> list[Value | None]:
        if int(ctx.attrs.get("noop_with_empty_axes", 0)):
            axes = ctx.const_input(1, "axes") if len(ctx.inputs) > 1 else ctx.attrs.get("axes")
            if axes is None or len(axes) == 0:
                return [_identity(ctx)[0]]
        return ctx.generic(get_op(kop), skip_attrs=("noop_with_empty_axes",))
    return convert


for _t, _k in {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
               "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod", "ReduceL2": "reduce_l2",
               "ReduceSumSquare": "reduce_sum_square"}.items():
    _special(_t, needs=(_k,))(_reduce(_k))


def _reduce_args(ctx: _Ctx) -> tuple[list[int], int]:
    if int(ctx.attrs.get("noop_with_empty_axes", 0)):
        raise _Refuse("noop_with_empty_axes=1 is not supported for this reduction")
    axes = ctx.const_input(1, "axes") if len(ctx.inputs) > 1 else ctx.attrs.get("axes")
    axes = [] if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    return axes, int(ctx.attr("keepdims", 1))


@_special("ReduceL1", needs=("reduce_sum", "abs"))
def _reduce_l1(ctx: _Ctx) -> list[Value | None]:
    axes, keep = _reduce_args(ctx)
    return [ctx.op("reduce_sum", [ctx.op("abs", [ctx.x()])], {"axes": axes, "keepdims": keep}, out=0)]


@_special("ReduceLogSum", needs=("reduce_sum", "log"))
def _reduce_log_sum(ctx: _Ctx) -> list[Value | None]:
    axes, keep = _reduce_args(ctx)
    return [ctx.op("log", [ctx.op("reduce_sum", [ctx.x()], {"axes": axes, "keepdims": keep})], out=0)]


@_special("ReduceLogSumExp", needs=("reduce_sum", "reduce_max", "log", "exp", "sub", "add"))
def _reduce_log_sum_exp(ctx: _Ctx) -> list[Value | None]:
    """log(sum(exp(x - m))) + m with m = max(x): the overflow-free form onnxruntime uses too."""
    axes, keep = _reduce_args(ctx)
    x = ctx.x()
    m_keep = ctx.op("reduce_max", [x], {"axes": axes, "keepdims": 1})
    s = ctx.op("reduce_sum", [ctx.op("exp", [ctx.op("sub", [x, m_keep])])], {"axes": axes, "keepdims": keep})
    m = m_keep if keep else ctx.op("reduce_max", [x], {"axes": axes, "keepdims": 0})
    return [ctx.op("add", [ctx.op("log", [s]), m], out=0)]


@_special("Pad", needs=("pad",))
def _pad(ctx: _Ctx) -> list[Value | None]:
    if ctx.opset < 18 or ctx.input(3) is None:
        return ctx.generic(get_op("pad"))
    x = ctx.x()
    pads = ctx.const_input(1, "pads")
    axes = ctx.const_input(3, "axes")
    r = x.type.rank
    axes = [int(a) + r if a < 0 else int(a) for a in np.asarray(axes).reshape(-1)]
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    full = [0] * (2 * r)
    for k, a in enumerate(axes):
        full[a], full[a + r] = pads[k], pads[k + len(axes)]
    value = ctx.const_input(2, "constant_value")
    attrs = {"pads": full, "mode": ctx.attr("mode", "constant")}
    if value is not None:
        attrs["value"] = float(np.asarray(value).reshape(-1)[0])
    return [ctx.op("pad", [x], attrs, out=0)]


@_special("Reshape", needs=("reshape",))
def _reshape(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    allowzero = int(ctx.attr("allowzero", 0))
    v = ctx.input(1)
    sym = None if v is None or v.is_const else shape_expr(v)
    if v is not None and not v.is_const and sym is not None and not all(isinstance(d, int) for d in sym):
        if not any(isinstance(d, int) and d == 0 for d in sym):
            allowzero = 0  # allowzero only changes what a 0 in the target means
        target = reshape_target(x.type.shape, sym, allowzero)
        if target is None:
            raise ctx.dynamic(1, f"shape {list(sym)}")
        y = ctx.op("reshape", [x], {"shape": target, "allowzero": allowzero}, out=0)
        if any(isinstance(d, str) and d != o for d, o in zip(sym, y.type.shape)):
            raise ctx.dynamic(1, f"shape {list(sym)}")
        return [y]
    if v is not None and not v.is_const and (sym is None or not all(isinstance(d, int) for d in sym)):
        target = _shape_operand(ctx, 1, "shape", lambda out: out)  # from the output: literal dims
        return [ctx.op("reshape", [x], {"shape": [int(d) for d in target], "allowzero": 1}, out=0)]
    return ctx.generic(get_op("reshape"))


@_special("Expand", needs=("expand",))
def _expand(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    v = ctx.input(1)
    sym = None if v is None or v.is_const else shape_expr(v)
    if v is not None and not v.is_const and sym is not None and not all(isinstance(d, int) for d in sym):
        r = max(len(sym), x.type.rank)
        xs = (1,) * (r - x.type.rank) + tuple(x.type.shape)
        ts = (1,) * (r - len(sym)) + tuple(sym)
        target = []
        for xd, td in zip(xs, ts):
            if isinstance(td, int):
                target.append(td)
            elif xd == td:
                target.append(1)
            else:
                raise ctx.dynamic(1, f"shape {list(sym)}")
        return [ctx.op("expand", [x], {"shape": target}, out=0)]
    if v is not None and not v.is_const and sym is None:
        target = _shape_operand(ctx, 1, "shape", lambda out: out)
        return [ctx.op("expand", [x], {"shape": [int(d) for d in target]}, out=0)]
    return ctx.generic(get_op("expand"))


@_special("Tile", needs=("tile",))
def _tile(ctx: _Ctx) -> list[Value | None]:
    """Tile; run-time repeats resolve from the inferred output shape when every input dim is static and > 0."""
    x = ctx.x()

    def from_output(out: tuple[int, ...]) -> list[int] | None:
        dims = x.type.shape
        if len(out) != len(dims) or not all(isinstance(d, int) and d > 0 and o % d == 0
                                            for d, o in zip(dims, out)):
            return None
        return [o // d for d, o in zip(dims, out)]

    repeats = _shape_operand(ctx, 1, "repeats", from_output)
    return [ctx.op("tile", [x], {"repeats": [int(r) for r in np.asarray(repeats).reshape(-1)]}, out=0)]


@_special("Clip", needs=("clip",))
def _clip(ctx: _Ctx) -> list[Value | None]:
    """Constant bounds become clip's attributes; run-time bounds (opset 11+) its min/max operands."""
    x = ctx.x()
    if ctx.opset < 11:
        return ctx.generic(get_op("clip"))
    operands: list[Value | None] = [x, None, None]
    attrs: dict[str, Any] = {}
    for i, name in ((1, "min"), (2, "max")):
        v = ctx.input(i)
        if v is None:
            continue
        arr = v.const if v.is_const else None
        if arr is not None and arr.size == 1 and (x.type.dtype in ("f16", "bf16", "f32", "f64")
                                                   or float(arr.reshape(-1)[0]) == arr.reshape(-1)[0]):
            attrs[name] = float(arr.reshape(-1)[0])
        else:
            operands[i] = v
    return [ctx.op("clip", operands, attrs, out=0)]


@_special("Trilu", needs=("trilu",))
def _trilu(ctx: _Ctx) -> list[Value | None]:
    """A constant k becomes trilu's attribute; a run-time k its operand."""
    x, k = ctx.x(), ctx.input(1)
    upper = int(ctx.attr("upper", 1))
    if k is None or k.is_const:
        kk = 0 if k is None else int(np.asarray(k.const).reshape(-1)[0])
        return [ctx.op("trilu", [x], {"upper": upper, "k": kk}, out=0)]
    return [ctx.op("trilu", [x, k], {"upper": upper}, out=0)]


@_special("GatherND", needs=("reshape", "gather", "cast", "less", "add", "where", "mul", "reduce_sum"))
def _gather_nd(ctx: _Ctx) -> list[Value | None]:
    """GatherND as a gather on axis 0 of the data with its first b + K dims flattened (b = batch_dims).

    The flat index is ``batch * prod(lead) + sum_k idx[..., k] * stride_k`` (negative entries count
    from the end of their dim), with ``batch`` the flat position of the index's first b coordinates:
    folded to a constant when the indices are constant (range-checked then), else computed by
    where/add/mul/reduce_sum. The first b + K dims of the data must be static.
    """
    x, idx = ctx.x(0), ctx.x(1)
    b = int(ctx.attr("batch_dims", 0))
    if idx.type.rank == 0 or not isinstance(idx.type.shape[-1], int):
        raise _Refuse(f"indices {idx.type} need a static last dim", dynamic=True)
    k = int(idx.type.shape[-1])
    if b < 0 or b >= min(x.type.rank, idx.type.rank) or b + k > x.type.rank:
        raise _Refuse(f"batch_dims={b} with indices {idx.type} does not fit the data {x.type}")
    batch, lead = x.type.shape[:b], x.type.shape[b:b + k]
    if not all(isinstance(d, int) for d in (*batch, *lead)) or list(idx.type.shape[:b]) != list(batch):
        raise _Refuse(f"indices {idx.type} with batch_dims={b} need the first {b + k} dims of the data "
                      f"{x.type} static (and the batch dims equal)", dynamic=True)
    dims = np.array(lead, dtype=np.int64)
    strides = np.array([int(np.prod(lead[i + 1:], dtype=np.int64)) for i in range(k)], dtype=np.int64)
    block = int(np.prod(dims, dtype=np.int64))
    n_batch = int(np.prod(batch, dtype=np.int64))
    target = reshape_target(x.type.shape, [n_batch * block, *x.type.shape[b + k:]])
    if target is None:
        raise _Refuse(f"the data {x.type} cannot be flattened over its first {b + k} dims", dynamic=True)
    flat_x = ctx.op("reshape", [x], {"shape": target})
    offsets = (np.arange(n_batch, dtype=np.int64) * block).reshape((*batch, *[1] * (idx.type.rank - 1 - b)))
    if idx.is_const:
        raw = np.asarray(idx.const, dtype=np.int64)
        wrapped = np.where(raw < 0, raw + dims, raw)
        if wrapped.size and ((wrapped < 0) | (wrapped >= dims)).any():
            raise _Refuse(f"an index in {_short(idx.const)} is out of range for the data dims {list(lead)}")
        flat = ctx.const(((wrapped * strides).sum(axis=-1) + offsets).astype(np.int64))
    else:
        i64 = ctx.op("cast", [idx], {"to": "i64"}) if idx.type.dtype != "i64" else idx
        wrapped = ctx.op("where", [ctx.op("less", [i64, ctx.const(np.zeros((), np.int64))]),
                                   ctx.op("add", [i64, ctx.const(dims)]), i64])
        flat = ctx.op("reduce_sum", [ctx.op("mul", [wrapped, ctx.const(strides)])], {"axes": [-1], "keepdims": 0})
        if b:
            flat = ctx.op("add", [flat, ctx.const(offsets)])
    return [ctx.op("gather", [flat_x, flat], {"axis": 0}, out=0)]


@_special("Transpose", needs=("transpose",))
def _transpose(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    perm = ctx.attrs.get("perm")
    if perm is None or len(perm) == 0:
        perm = list(range(x.type.rank))[::-1]
    return [ctx.op("transpose", [x], {"perm": [int(p) for p in perm]}, out=0)]


@_special("Mean", needs=("sum", "div"))
def _mean(ctx: _Ctx) -> list[Value | None]:
    xs = [v for v in ctx.inputs if v is not None]
    total = xs[0] if len(xs) == 1 else ctx.op("sum", xs)
    if len(xs) == 1:
        return [ctx.op("identity", [total], out=0)] if ctx.outs[0] in ctx.lifter.graph_outputs else [total]
    return [ctx.op("div", [total, ctx.scalar(len(xs), total)], out=0)]


@_special("PRelu", needs=("where", "less", "mul"))
def _prelu(ctx: _Ctx) -> list[Value | None]:
    x, slope = ctx.x(0), ctx.x(1)
    neg = ctx.op("less", [x, ctx.scalar(0, x)])
    return [ctx.op("where", [neg, ctx.op("mul", [x, slope]), x], out=0)]


@_special("Elu", needs=("where", "less", "mul", "exp", "sub"))
def _elu(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    alpha = float(ctx.attr("alpha", 1.0))
    neg = ctx.op("less", [x, ctx.scalar(0, x)])
    em1 = ctx.op("sub", [ctx.op("exp", [x]), ctx.scalar(1, x)])
    return [ctx.op("where", [neg, ctx.op("mul", [em1, ctx.scalar(alpha, x)]), x], out=0)]


@_special("HardSwish", needs=("hard_sigmoid", "mul"))
def _hard_swish(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    hs = ctx.op("hard_sigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5})
    return [ctx.op("mul", [x, hs], out=0)]


@_special("QuantizeLinear", needs=("quantize",))
def _quantize(ctx: _Ctx) -> list[Value | None]:
    x, scale, zp = ctx.x(0), ctx.x(1), ctx.input(2)
    if zp is not None:
        dtype = zp.type.dtype
    elif int(ctx.attrs.get("output_dtype", 0)):
        dtype = _to_kind("dtype", ctx.attrs["output_dtype"], "output_dtype")
    else:
        dtype = "u8"
    attrs = {"axis": int(ctx.attr("axis", 1)), "block_size": int(ctx.attr("block_size", 0)), "dtype": dtype}
    if dtype in FLOAT8_DTYPES and "saturate" in ctx.attrs:  # saturate=0 lets float8 overflow to inf/NaN
        attrs["saturate"] = int(ctx.attrs["saturate"])
    _check_only(ctx, ("axis", "block_size", "output_dtype", "saturate"))
    return [ctx.op("quantize", [x, scale, zp], attrs, out=0)]


@_special("DequantizeLinear", needs=("dequantize",))
def _dequantize(ctx: _Ctx) -> list[Value | None]:
    x, scale, zp = ctx.x(0), ctx.x(1), ctx.input(2)
    out_dtype = int(ctx.attrs.get("output_dtype", 0))
    if out_dtype and _to_kind("dtype", out_dtype, "output_dtype") != scale.type.dtype:
        raise _Refuse("output_dtype differs from the scale's dtype")
    _check_only(ctx, ("axis", "block_size", "output_dtype"))
    attrs = {"axis": int(ctx.attr("axis", 1)), "block_size": int(ctx.attr("block_size", 0))}
    return [ctx.op("dequantize", [x, scale, zp], attrs, out=0)]


def _check_only(ctx: _Ctx, known: Sequence[str]) -> None:
    defaults = _schema_defaults(ctx.node.op_type, ctx.opset)
    for name, val in ctx.attrs.items():
        if name not in known and not (name in defaults and _same(val, defaults[name])):
            raise _Refuse(f"attribute {name}={_short(val)} is not supported")


# Converter families in their own modules; they register into _SPECIAL through @_special.
from . import (  # noqa: E402,F401
    lift_contrib,
    lift_dtypes,
    lift_image,
    lift_index,
    lift_math,
    lift_nn_extra,
    lift_quant,
    lift_recurrent,
    lift_signal,
    lift_transformer,
)

__all__ = ["LIFT_FOLD_LIMIT", "MAX_OPSET", "MIN_OPSET", "lift", "lift_specialized", "load_model",
           "reshape_target", "shape_expr", "supported_ops", "value_sources"]
