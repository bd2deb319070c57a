"""Differential harness: one kiln op through ``ir.interpret`` vs the same op as a one-node ONNX
model in onnxruntime.

``check(op, inputs, attrs)`` derives the ONNX node from the op's ``OnnxSpec`` (attribute
inputs become constant initializers, ``attr_names`` renames, empty-list defaults are left
out), so the registry's ONNX spellings are tested along with the references. It also
asserts that the type rule's output types equal what the reference produced and what
onnxruntime produced. Dtypes onnxruntime's Python API cannot carry (bf16, i4, u4) go in as
initializers and come out through an appended Cast.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kiln import ir
from kiln.frontend.lower import input_slots
from kiln.ir import TensorType

OPSET = 21
ONNX_DTYPE = {
    "bool": TensorProto.BOOL, "i4": TensorProto.INT4, "u4": TensorProto.UINT4,
    "i8": TensorProto.INT8, "u8": TensorProto.UINT8, "i16": TensorProto.INT16,
    "u16": TensorProto.UINT16, "i32": TensorProto.INT32, "u32": TensorProto.UINT32,
    "i64": TensorProto.INT64, "u64": TensorProto.UINT64, "f16": TensorProto.FLOAT16,
    "bf16": TensorProto.BFLOAT16, "f32": TensorProto.FLOAT, "f64": TensorProto.DOUBLE,
}
# dtypes onnxruntime's Python binding cannot feed or fetch -> the dtype they travel as
CARRIER = {"bf16": "f32", "i4": "i8", "u4": "i8"}
TOL = {"f16": (2e-3, 2e-3), "bf16": (1e-2, 1e-2), "f32": (2e-5, 2e-6), "f64": (1e-10, 1e-12)}


def kdt(a: np.ndarray) -> str:
    return TensorType.of(np.asarray(a)).dtype


def _tensor(a: np.ndarray, name: str) -> onnx.TensorProto:
    a = np.asarray(a)
    if kdt(a) in ("i4", "u4"):  # numpy_helper wants the ml_dtypes arrays as such
        return numpy_helper.from_array(a.astype(ml_dtypes.int4 if kdt(a) == "i4" else ml_dtypes.uint4), name)
    return numpy_helper.from_array(a, name)


@functools.lru_cache(maxsize=512)
def _session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def run_graph(nodes: Sequence[onnx.NodeProto], feeds: dict[str, np.ndarray],
              initializers: dict[str, np.ndarray], outputs: Sequence[tuple[str, str]],
              opset: int = OPSET) -> list[np.ndarray]:
    """Run an ONNX graph; ``outputs`` are (name, kiln dtype). bf16/i4/u4 outputs are cast on the
    ONNX side to a carrier dtype and back to their own dtype here (exactly)."""
    nodes = list(nodes)
    outs_info, fetch = [], []
    for name, dt in outputs:
        if dt in CARRIER:
            nodes.append(helper.make_node("Cast", [name], [name + "__carried"], to=ONNX_DTYPE[CARRIER[dt]]))
            name, odt = name + "__carried", CARRIER[dt]
        else:
            odt = dt
        outs_info.append(helper.make_tensor_value_info(name, ONNX_DTYPE[odt], None))
        fetch.append(name)
    ins_info = [helper.make_tensor_value_info(k, ONNX_DTYPE[kdt(v)], list(np.shape(v))) for k, v in feeds.items()]
    graph = helper.make_graph(nodes, "single", ins_info, outs_info,
                              initializer=[_tensor(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # onnx 1.23 writes 14; onnxruntime 1.31 reads at most 13
    res = _session(model.SerializeToString()).run(fetch, feeds)
    return [np.asarray(r).astype(TensorType(dt, ()).np_dtype) if dt in CARRIER else np.asarray(r)
            for r, (_, dt) in zip(res, outputs)]


def to_onnx(op: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any],
            out_dtypes: Sequence[str]) -> tuple[onnx.NodeProto, dict, dict]:
    """The op as one ONNX node (via its OnnxSpec) plus its feeds and initializers."""
    opdef = ir.get_op(op)
    spec = opdef.onnx
    assert spec is not None, f"{op} has no ONNX spelling"
    attrs = opdef.complete_attrs(attrs)
    feeds: dict[str, np.ndarray] = {}
    inits: dict[str, np.ndarray] = {}
    names: dict[int, str] = {}
    slots = input_slots(opdef, [a is not None for a in inputs])  # the ONNX positions lower_to_onnx uses
    for pos, (kind, i) in enumerate(slots):
        if kind == "operand":
            names[pos] = f"in{i}"
            (inits if kdt(inputs[i]) in CARRIER else feeds)[f"in{i}"] = np.asarray(inputs[i])
    onnx_attrs: dict[str, Any] = {}
    for key, value in attrs.items():
        kind = opdef.attrs[key].kind
        if key in spec.attr_inputs.values():
            idx = next(i for i, k in spec.attr_inputs.items() if k == key)
            if idx in names:
                continue  # the op's own operand fills this slot
            if value is None or (value == [] and opdef.attrs[key].default == []):
                continue  # absent optional input: ONNX's default
            dt = spec.attr_dtypes.get(key) or kdt(inputs[0])
            arr = np.asarray(value).astype(TensorType(dt, ()).np_dtype)
            names[idx] = f"attr_{key}"
            inits[f"attr_{key}"] = arr
            continue
        if value is None or (isinstance(value, list) and not value):
            continue
        if kind == "dtype":
            if op == "quantize" and len(inputs) > 2 and inputs[2] is not None:
                continue  # ONNX takes the zero point's dtype; output_dtype must then be absent
            value = ONNX_DTYPE[value]
        onnx_attrs[spec.attr_names.get(key, key)] = value
    n_in = max(names) + 1 if names else 0
    in_names = [names.get(i, "") for i in range(n_in)]
    out_names = [f"out{i}" for i in range(len(out_dtypes))]
    node = helper.make_node(spec.op_type, in_names, out_names, domain=spec.domain, **onnx_attrs)
    return node, feeds, inits


def run_ort(op: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any] | None = None, *,
            out_dtypes: Sequence[str], opset: int = OPSET) -> list[np.ndarray]:
    node, feeds, inits = to_onnx(op, inputs, attrs or {}, out_dtypes)
    return run_graph([node], feeds, inits, [(n, d) for n, d in zip(node.output, out_dtypes)], opset)


def run_kiln(op: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any] | None = None
             ) -> tuple[list[np.ndarray], list[TensorType]]:
    """Interpret a one-node kiln graph; returns the outputs and the type rule's output types."""
    attrs = dict(attrs or {})
    types = ir.infer_types(op, [None if a is None else TensorType.of(a) for a in inputs],
                           ir.get_op(op).complete_attrs(attrs))
    g = ir.Graph("single")
    vals = [None if a is None else g.add_input(f"in{i}", TensorType.of(a)) for i, a in enumerate(inputs)]
    while vals and vals[-1] is None:
        vals.pop()
    node = g.add_node(op, vals, attrs, out_names=[f"out{i}" for i in range(len(types))])
    g.set_outputs(node.outputs)
    ir.verify(g)
    res = ir.interpret(g, {f"in{i}": a for i, a in enumerate(inputs) if a is not None})
    return [res[f"out{i}"] for i in range(len(types))], types


def assert_same(got: np.ndarray, want: np.ndarray, *, rtol: float | None = None, atol: float | None = None,
                what: str = "") -> None:
    """Equal dtype and shape; values exactly equal for ints/bools, else allclose (NaNs equal)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    dt = kdt(got)
    if dt in TOL:
        r, a = TOL[dt]
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=r if rtol is None else rtol, atol=a if atol is None else atol,
                                   equal_nan=True, err_msg=what)
    else:
        np.testing.assert_array_equal(got.astype(np.int64) if dt in ("i4", "u4") else got,
                                      want.astype(np.int64) if dt in ("i4", "u4") else want, err_msg=what)


def check(op: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any] | None = None, *,
          rtol: float | None = None, atol: float | None = None, opset: int = OPSET) -> list[np.ndarray]:
    """kiln's reference == onnxruntime for this op; the type rule's types == the actual ones."""
    outs, types = run_kiln(op, inputs, attrs)
    for o, t in zip(outs, types):
        assert TensorType.of(o) == t, f"{op}: type rule says {t}, reference gave {TensorType.of(o)}"
    want = run_ort(op, inputs, attrs, out_dtypes=[t.dtype for t in types], opset=opset)
    assert len(want) == len(outs)
    for i, (o, w) in enumerate(zip(outs, want)):
        assert_same(o, w, rtol=rtol, atol=atol, what=f"{op} output {i} vs onnxruntime")
    return outs


def T(text: str) -> TensorType:
    """A type from text like 'f32[N,3,8,8]' or 'i64[]'."""
    dt, rest = text.split("[", 1)
    dims = [d.strip() for d in rest.rstrip("]").split(",") if d.strip()]
    return TensorType(dt, tuple(int(d) if d.isdigit() else d for d in dims))


def infer(op: str, types: Sequence[TensorType | str | None], **attrs: Any) -> list[TensorType]:
    """The op's type rule on types given as TensorType or text, attributes completed with defaults."""
    ts = [T(t) if isinstance(t, str) else t for t in types]
    return ir.infer_types(op, ts, ir.get_op(op).complete_attrs(attrs))
