"""kiln IR -> ONNX: ``lower_to_onnx(graph)``, for ONNX Runtime and Netron.

Generic, from each op's ``OnnxSpec``: the node keeps its name, kiln
attributes become ONNX attributes (renamed by ``attr_names``) except those in
``attr_inputs``, which become initializers at their ONNX input position (int
and ints as int64, float and floats in the dtype of the node's first input,
unless ``attr_dtypes`` says otherwise; an absent optional attribute becomes an
empty input name). Ops without an ONNX spelling at the target opset (``silu``;
``rms_norm`` below opset 23; ``gelu`` below 20; ``layer_norm`` below 17) are
replaced by their registry ``decompose`` on a clone first.

The default opset is 23: it has LayerNormalization (17), Gelu (20), int4
QuantizeLinear/DequantizeLinear (21) and RMSNormalization (23), and
onnxruntime 1.31 runs all four. ``ir_version`` is the smallest one the opset
allows (11 for opset 23; onnxruntime 1.31 reads up to 13, while onnx 1.23
would write 14 by default). Symbolic dims become ``dim_param`` (a product
such as ``N*64`` is written as that string). Graph outputs keep their names;
the model passes ``onnx.checker``. A large constant that is one value
broadcast to a shape (a read-only stride-0 array, as lift makes from
ConstantOfShape) is written back as ConstantOfShape, not as an initializer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from kiln.ir.graph import Graph, Node
from kiln.ir.interpret import run_node
from kiln.ir.registry import OpDef, get_op
from kiln.ir.types import TensorType, to_numpy_dtype

from .dtypes import onnx_dtype
from .errors import LoweringError

DEFAULT_OPSET = 23
_FILL_MIN = 1024  # constants of one repeated value (stride 0) larger than this become ConstantOfShape
MIN_LOWER_OPSET = 13  # Softmax/LogSoftmax take kiln's (opset-13) semantics from here on
_ATTR_TYPES = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT, "str": AttributeProto.STRING,
               "ints": AttributeProto.INTS, "floats": AttributeProto.FLOATS, "strs": AttributeProto.STRINGS,
               "dtype": AttributeProto.INT}


def lower_to_onnx(graph: Graph, *, opset: int = DEFAULT_OPSET, check: bool = True) -> onnx.ModelProto:
    """The graph as an ONNX model at ``opset`` (see the module docstring); ``graph`` is not modified."""
    if not MIN_LOWER_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise LoweringError(f"cannot lower to opset {opset}: kiln lowers to opsets "
                            f"{MIN_LOWER_OPSET}..{onnx.defs.onnx_opset_version()}")
    out_names = [v.name for v in graph.outputs]
    g = _decompose(graph.clone(), opset)
    lw = _Lowerer(g, opset)
    for n in g.nodes:
        lw.node(n)
    outputs = []
    seen: set[str] = set()
    for v, want in zip(g.outputs, out_names):
        name = v.name
        if name != want or name in seen:
            want = want if want not in seen and want not in lw.names else lw.fresh(want)
            lw.nodes.append(helper.make_node("Identity", [name], [want], name=lw.node_name(f"output_{want}")))
            name = want
        seen.add(name)
        outputs.append(_value_info(name, v.type))
    inputs = [_value_info(v.name, v.type) for v in g.inputs]
    inits, fills = [], []
    for v in g.constants.values():
        if v.const.size > _FILL_MIN and not any(v.const.strides):
            # one value broadcast to a shape (e.g. lifted from ConstantOfShape): keep it that small
            shape = lw.fresh(f"{v.name}_shape")
            inits.append(_tensor(np.array(v.const.shape, np.int64), shape))
            fills.append(helper.make_node("ConstantOfShape", [shape], [v.name], name=lw.node_name(f"fill_{v.name}"),
                                          value=_tensor(v.const.reshape(-1)[:1], "value")))
        else:
            inits.append(_tensor(v.const, v.name))
    gp = helper.make_graph(fills + lw.nodes, g.name, inputs, outputs, inits + lw.inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(gp, opset_imports=opsets, producer_name="kiln",
                              ir_version=helper.find_min_ir_version_for(opsets))
    for k, v in sorted(graph.meta.items()):
        model.metadata_props.add(key=f"kiln.{k}", value=str(v))
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise LoweringError(f"the lowered model fails onnx.checker: {e}") from e
    return model


def onnx_spelling(op: str, opset: int) -> bool:
    """Whether kiln op ``op`` has an ONNX op at ``opset``."""
    spec = get_op(op).onnx
    if spec is None:
        return False
    try:
        schema = onnx.defs.get_schema(spec.op_type, opset, spec.domain)
    except Exception:  # noqa: BLE001 - SchemaError: not defined at this opset
        return False
    return spec.oldest is None or schema.since_version >= spec.oldest


def _decompose(g: Graph, opset: int) -> Graph:
    for _ in range(16):
        todo = [n for n in g.nodes if not onnx_spelling(n.op, opset)]
        if not todo:
            return g
        for n in todo:
            opdef = get_op(n.op)
            if opdef.decompose is None and all(v is None or v.is_const for v in n.inputs):
                # e.g. range: no ONNX spelling, but its value is known, so it is written as a constant
                arrays = run_node(n, [None if v is None else v.const for v in n.inputs])
                new = [g.add_constant(a, g.fresh_name(o.name)) for o, a in zip(n.outputs, arrays)]
            elif opdef.decompose is None:
                raise LoweringError(f"kiln op {n.op} (node {n.name or n.outputs[0].name}) has no ONNX spelling "
                                    f"at opset {opset} and no decomposition")
            else:
                new = opdef.decompose(g, n)
            for old, v in zip(n.outputs, new):
                g.replace_all_uses(old, v)
            g.remove(n)
    raise LoweringError("decompositions did not terminate (an op decomposes into itself)")


def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), list(t.shape))


def _tensor(arr: np.ndarray, name: str) -> onnx.TensorProto:
    arr = np.asarray(arr)
    return numpy_helper.from_array(np.ascontiguousarray(arr).reshape(arr.shape), name)  # keeps 0-d 0-d


def input_slots(opdef: OpDef, present: Sequence[bool]) -> list[tuple[str, Any]]:
    """What fills each ONNX input of ``opdef``'s op: ``("operand", i)`` (kiln operand i), ``("attr", key)``
    (attribute ``key`` written as a constant input) or ``("absent", None)``.

    Kiln's operands fill the ONNX slots its ``attr_inputs`` leave free, in order; an attr_input slot that is also
    the op's own optional operand of the same name (clip's min/max, trilu's k) takes that operand when present.
    """
    spec = opdef.onnx
    shared = {i for i, k in spec.attr_inputs.items() if i < len(opdef.inputs) and opdef.inputs[i].rstrip("?") == k}
    rest = iter([i for i in range(len(present)) if i not in shared])
    n_slots = sum(1 for i in range(len(present)) if i not in shared) + len(spec.attr_inputs)
    out: list[tuple[str, Any]] = []
    for slot in range(n_slots):
        if slot in spec.attr_inputs:
            if slot in shared and slot < len(present) and present[slot]:
                out.append(("operand", slot))
            else:
                out.append(("attr", spec.attr_inputs[slot]))
        else:
            i = next(rest, None)
            out.append(("operand", i) if i is not None and present[i] else ("absent", None))
    return out


def _schema_or_none(op_type: str, opset: int, domain: str) -> Any:
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # noqa: BLE001 - not defined at this opset
        return None


def _allows(schema: Any, i: int, dtype: str) -> bool:
    """Whether input ``i`` of ``schema`` may have kiln dtype ``dtype`` (True when the schema does not say)."""
    if schema is None:
        return False
    formals = list(schema.inputs)
    if not formals:
        return True
    formal = formals[min(i, len(formals) - 1)]
    if i >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return True
    allowed = next((set(c.allowed_type_strs) for c in schema.type_constraints
                    if c.type_param_str == formal.type_str), {formal.type_str})
    name = helper.tensor_dtype_to_string(onnx_dtype(dtype)).split(".")[-1].lower()
    return f"tensor({name})" in allowed


class _Lowerer:
    def __init__(self, g: Graph, opset: int):
        self.g = g
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names = {v.name for v in g.values()}
        self.node_names: set[str] = set()

    def fresh(self, hint: str) -> str:
        cand, k = hint, 0
        while cand in self.names:
            k += 1
            cand = f"{hint}_{k}"
        self.names.add(cand)
        return cand

    def node_name(self, hint: str) -> str:
        cand, k = hint, 0
        while cand in self.node_names:
            k += 1
            cand = f"{hint}_{k}"
        self.node_names.add(cand)
        return cand

    def node(self, n: Node) -> None:
        opdef = get_op(n.op)
        spec = opdef.onnx
        schema = onnx.defs.get_schema(spec.op_type, self.opset, spec.domain)
        name = self.node_name(n.name or f"{n.op}_{n.outputs[0].name}")
        if spec.lowerable is not None and (why := spec.lowerable(n, self.opset)):
            raise LoweringError(f"{spec.op_type} (node {n.name or n.outputs[0].name}): {why}")
        inputs = self._inputs(n, opdef, name, schema)
        values = {v.name: v for v in n.inputs if v is not None}
        for i, vname in enumerate(inputs):
            if vname in values:
                self._check_type(n, spec.op_type, schema, i, values[vname].type.dtype)
        attrs = self._attrs(n, opdef, schema)
        proto = helper.make_node(spec.op_type, inputs, [o.name for o in n.outputs], name=name,
                                 domain=spec.domain or None)
        proto.attribute.extend(attrs.values())
        self.nodes.append(proto)

    def _check_type(self, n: Node, op_type: str, schema: Any, i: int, dtype: str) -> None:
        """LoweringError when ONNX ``op_type`` at this opset does not take ``dtype`` at input ``i``
        (onnx.checker does not look; ONNX Runtime then rejects the model as an invalid graph)."""
        if not _allows(schema, i, dtype):
            newer = next((v for v in range(self.opset + 1, onnx.defs.onnx_opset_version() + 1)
                          if _allows(_schema_or_none(op_type, v, schema.domain), i, dtype)), None)
            fix = f"; lower to opset {newer} or later" if newer else ""
            raise LoweringError(f"{op_type}-{schema.since_version} (opset {self.opset}) does not take {dtype} at "
                                f"input {i} (node {n.name or n.outputs[0].name}){fix}")

    def _inputs(self, n: Node, opdef: OpDef, name: str, schema: Any) -> list[str]:
        out: list[str] = []
        for kind, ref in input_slots(opdef, [v is not None for v in n.inputs]):
            if kind == "operand":
                out.append(n.inputs[ref].name)
            elif kind == "attr":
                slot = len(out)
                formals = list(schema.inputs)
                required = slot < len(formals) and formals[slot].option == onnx.defs.OpSchema.FormalParameterOption.Single
                out.append(self._attr_input(n, ref, opdef, name, required))
            else:
                out.append("")
        while out and out[-1] == "":
            out.pop()
        return out

    def _attr_input(self, n: Node, kname: str, opdef: OpDef, name: str, required: bool = False) -> str:
        val = n.attrs.get(kname)
        if val is None or (isinstance(val, list) and not val and not required):
            return ""  # absent; for an optional input an empty list means what an absent input does
        kind = opdef.attrs[kname].kind
        dtype = opdef.onnx.attr_dtypes.get(kname)
        if dtype is not None and dtype in ("i64", "i32", "f32", "f64", "f16", "bf16", "bool", "i8", "u8"):
            np_dtype = to_numpy_dtype(dtype)
        elif kind in ("int", "ints"):
            np_dtype = np.dtype(np.int64)
        else:
            first = next((v for v in n.inputs if v is not None), None)
            np_dtype = first.type.np_dtype if first is not None else np.dtype(np.float32)
        arr = np.asarray(val, dtype=np_dtype)
        if kind in ("ints", "floats") and arr.ndim == 0:
            arr = arr.reshape(1)
        init = self.fresh(f"{name}_{kname}")
        self.inits.append(_tensor(arr, init))
        return init

    def _attrs(self, n: Node, opdef: OpDef, schema: Any) -> dict[str, AttributeProto]:
        spec = opdef.onnx
        as_inputs = set(spec.attr_inputs.values())
        out: dict[str, AttributeProto] = {}
        for k, v in n.attrs.items():
            if k in as_inputs or v is None:
                continue
            if isinstance(v, list) and not v and opdef.attrs[k].default == []:
                continue  # kiln's empty list means "the ONNX default"; ONNX rejects an empty list (dilations=[])
            oname = spec.attr_names.get(k, k)
            kind = opdef.attrs[k].kind
            implied = oname == "output_dtype" and any(x is not None and x.type.dtype == v for x in n.inputs)
            if implied:  # QuantizeLinear's zero point carries it; onnxruntime rejects output_dtype beside it
                continue
            if oname not in schema.attributes:
                if v == opdef.attrs[k].default:
                    continue
                raise LoweringError(f"kiln op {n.op} (node {n.name or n.outputs[0].name}): attribute {k}={v!r} "
                                    f"has no ONNX {spec.op_type} attribute at opset {self.opset}")
            if kind == "dtype":
                v = onnx_dtype(v)
            out[oname] = helper.make_attribute(oname, v, attr_type=_ATTR_TYPES[kind])
        return out


__all__ = ["DEFAULT_OPSET", "MIN_LOWER_OPSET", "lower_to_onnx", "onnx_spelling"]
