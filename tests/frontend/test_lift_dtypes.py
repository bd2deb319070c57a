"""Lifting Cast/CastLike (opset 25) and BitCast (26), lowering them back, and ONNX's conformance cases."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from kiln.frontend import lift, lower_to_onnx
from kiln.frontend.errors import UnsupportedOpsError
from kiln.ir import interpret


def _model(nodes, inputs, outputs, opset=25):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_cast_keeps_saturate_and_round_mode_only_where_they_matter():
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT8E4M3FN, saturate=0),
             helper.make_node("Cast", ["x"], ["b"], to=TensorProto.FLOAT8E8M0, round_mode="nearest"),
             helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT2, saturate=0, round_mode="down"),
             helper.make_node("Cast", ["x"], ["d"], to=TensorProto.FLOAT8E5M2)]
    m = _model(nodes, [("x", TensorProto.FLOAT, [4])],
               [("a", TensorProto.FLOAT8E4M3FN, [4]), ("b", TensorProto.FLOAT8E8M0, [4]),
                ("c", TensorProto.INT2, [4]), ("d", TensorProto.FLOAT8E5M2, [4])])
    g = lift(m)
    attrs = {n.outputs[0].name: n.attrs for n in g.nodes}
    assert attrs == {"a": {"to": "f8e4m3fn", "saturate": 0}, "b": {"to": "f8e8m0", "round_mode": "nearest"},
                     "c": {"to": "i2"}, "d": {"to": "f8e5m2"}}
    x = np.array([1000.0, 3.0, -2.7, np.inf], np.float32)
    want = ReferenceEvaluator(m).run(None, {"x": x})
    got = interpret(g, {"x": x})
    for w, name in zip(want, "abcd"):
        assert got[name].dtype == w.dtype
        assert got[name].view(np.uint8).tolist() == np.asarray(w).view(np.uint8).tolist(), name


def test_castlike_takes_the_like_dtype():
    m = _model([helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)],
               [("x", TensorProto.FLOAT16, [3]), ("like", TensorProto.FLOAT8E5M2FNUZ, [1])],
               [("y", TensorProto.FLOAT8E5M2FNUZ, [3])])
    g = lift(m)
    assert [(n.op, n.attrs) for n in g.nodes] == [("cast", {"to": "f8e5m2fnuz", "saturate": 0})]


def test_cast_to_string_is_refused_with_its_reason():
    m = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)],
               [("x", TensorProto.FLOAT, [2])], [("y", TensorProto.STRING, [2])])
    with pytest.raises(UnsupportedOpsError, match="STRING is not supported"):
        lift(m)


def test_bitcast_lifts_and_lowers_back():
    m = _model([helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.UINT32)],
               [("x", TensorProto.FLOAT, [3])], [("y", TensorProto.UINT32, [3])], opset=26)
    g = lift(m)
    assert [(n.op, n.attrs) for n in g.nodes] == [("bitcast", {"to": "u32"})]
    back = lower_to_onnx(g, opset=26)
    x = np.array([1.0, -0.0, np.nan], np.float32)
    assert ReferenceEvaluator(back).run(None, {"x": x})[0].tolist() == x.view(np.uint32).tolist()


def test_lowered_casts_run_the_same_in_onnx_reference():
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT8E4M3FNUZ, saturate=0),
             helper.make_node("Cast", ["x"], ["b"], to=TensorProto.FLOAT8E8M0, round_mode="down")]
    m = _model(nodes, [("x", TensorProto.FLOAT, [3])],
               [("a", TensorProto.FLOAT8E4M3FNUZ, [3]), ("b", TensorProto.FLOAT8E8M0, [3])])
    g = lift(m)
    back = lower_to_onnx(g, opset=25)
    assert {a.name for n in back.graph.node for a in n.attribute} == {"to", "saturate", "round_mode"}
    x = np.array([300.0, 0.3, 5.0], np.float32)
    got = interpret(g, {"x": x})
    for w, name in zip(ReferenceEvaluator(back).run(None, {"x": x}), "ab"):
        assert got[name].view(np.uint8).tolist() == np.asarray(w).view(np.uint8).tolist(), name


@pytest.mark.slow
def test_conformance_cases_pass_bit_exactly_in_the_interpreter():
    """ONNX's Cast/CastLike/BitCast node cases: kiln's outputs equal the expected ones bit for bit
    (NaN as NaN)."""
    import warnings

    from kiln.conformance import _array, _cases, _feeds, _input_shapes

    cases = _cases(r"^test_(cast|castlike|bitcast)_")
    assert len(cases) > 150
    for case in cases:
        for inputs, expected in case.data_sets:
            feeds = _feeds(case.model, inputs)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                g = lift(case.model, input_shapes=_input_shapes(feeds))
                got = interpret(g, feeds)
            for v, exp in zip(g.outputs, expected):
                exp, out = _array(exp), got[v.name]
                assert out.dtype == exp.dtype and out.shape == exp.shape, case.name
                out, exp = out.reshape(-1), exp.reshape(-1)
                same = (out.view(np.uint8) == exp.view(np.uint8)).reshape(out.size, -1).all(axis=1)
                if "float" in exp.dtype.name:
                    same |= np.isnan(out.astype(np.float64)) & np.isnan(exp.astype(np.float64))
                assert same.all(), case.name
    assert onnx.defs.get_schema("Cast", 28, "").since_version == 28  # Cast 28 only widened types
