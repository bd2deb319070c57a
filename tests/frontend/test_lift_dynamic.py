"""Operands computed at run time: kept as run-time operands, specialized to a bound value, or refused
naming the graph input that decides them; and the ONNX op features lift gained alongside."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.frontend import DynamicShapeError, FrontendError, UnsupportedOpsError, lift
from kiln.frontend.lift import lift_specialized

from .conftest import assert_close, make_model, ort_run, vi

F32, I64 = np.float32, np.int64
rng = np.random.default_rng(7)


def _run(graph: ir.Graph, feeds: dict) -> list[np.ndarray]:
    names = {v.name for v in graph.inputs}
    got = ir.interpret(graph, {k: v for k, v in feeds.items() if k in names})
    return [got[v.name] for v in graph.outputs]


def _reduce_model() -> object:
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum", keepdims=0)
    return make_model([node], [vi("x", F32, [2, 3, 4]), vi("axes", I64, [2])], [vi("y", F32, None)], opset=18)


# ---------------------------------------------------------------- refusals name the deciding input

def test_a_graph_input_operand_is_refused_naming_it():
    with pytest.raises(DynamicShapeError) as e:
        lift(_reduce_model())
    assert e.value.specializable == ["axes"]
    msg = str(e.value)
    assert "input 1 (axes) is computed at run time (graph input 'axes')" in msg
    assert "graph input(s) 'axes' decides a compile-time operand" in msg and "input_values=" in msg


def test_the_deciding_inputs_are_traced_through_computations_but_not_through_shapes():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Add", ["s", "d"], ["t"]),
             helper.make_node("Reshape", ["x", "t"], ["y"], name="r")]
    model = make_model(nodes, [vi("x", F32, ["N", 6]), vi("d", I64, [2])], [vi("y", F32, None)])
    with pytest.raises(DynamicShapeError) as e:
        lift(model)
    assert e.value.specializable == ["d"]  # x only contributes its shape


# ---------------------------------------------------------------- input_values / lift_specialized

def test_input_values_bind_an_input_to_a_constant():
    x = rng.standard_normal((2, 3, 4)).astype(F32)
    axes = np.array([0, 2], I64)
    g = lift(_reduce_model(), input_values={"axes": axes})
    assert [v.name for v in g.inputs] == ["x"]
    assert g.meta["specialized"] == {"axes": [0, 2]}
    assert [n.op for n in g.nodes] == ["reduce_sum"] and g.nodes[0].attrs["axes"] == [0, 2]
    (want,) = ort_run(_reduce_model(), {"x": x, "axes": axes})
    assert_close(_run(g, {"x": x})[0], want)


def test_input_values_are_checked_against_the_declared_input():
    with pytest.raises(FrontendError, match=r"input_values names \['nope'\], which are not graph inputs"):
        lift(_reduce_model(), input_values={"nope": [1]})
    with pytest.raises(FrontendError, match=r"input_values\['axes'\] has shape \[3\], the input is declared \[2\]"):
        lift(_reduce_model(), input_values={"axes": [0, 1, 2]})
    with pytest.raises(FrontendError, match=r"input_values\['axes'\] has dtype float64, the input is int64"):
        lift(_reduce_model(), input_values={"axes": [0.5, 1.0]})
    g = lift(_reduce_model(), input_values={"axes": np.array([0, 1], np.int32)})  # converts exactly
    assert g.meta["specialized"] == {"axes": [0, 1]}


def test_lift_specialized_binds_only_what_lift_names():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Add", ["r", "b"], ["y"])]
    model = make_model(nodes, [vi("x", F32, [2, 6]), vi("s", I64, [2]), vi("b", F32, [3, 4])],
                       [vi("y", F32, [3, 4])])
    feeds = {"x": rng.standard_normal((2, 6)).astype(F32), "s": np.array([3, 4], I64),
             "b": rng.standard_normal((3, 4)).astype(F32)}
    g = lift_specialized(model, feeds)
    assert [v.name for v in g.inputs] == ["x", "b"]
    assert g.meta["specialized"] == {"s": [3, 4]}
    assert_close(_run(g, feeds)[0], ort_run(model, feeds)[0])
    with pytest.raises(DynamicShapeError, match="graph input 's'"):
        lift_specialized(model, {"x": feeds["x"]})  # no value for s: the refusal stands


def test_a_declared_output_shape_does_not_stand_in_for_a_runtime_shape():
    node = helper.make_node("Reshape", ["x", "s"], ["y"])
    model = make_model([node], [vi("x", F32, [2, 6]), vi("s", I64, [2])], [vi("y", F32, [3, 4])])
    with pytest.raises(DynamicShapeError, match="graph input 's'"):
        lift(model)


def test_range_with_a_runtime_limit_is_specialized():
    nodes = [helper.make_node("Range", ["zero", "n", "one"], ["y"])]
    model = make_model(nodes, [vi("n", I64, [])], [vi("y", I64, None)],
                       {"zero": np.array(0, I64), "one": np.array(1, I64)})
    with pytest.raises(DynamicShapeError) as e:
        lift(model)
    assert e.value.specializable == ["n"]
    g = lift_specialized(model, {"n": np.array(5, I64)})
    assert _run(g, {})[0].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- run-time operands that stay operands

@pytest.mark.parametrize("dtype,bounds", [(F32, ("lo", "hi")), (F32, ("lo", "")), (F32, ("", "hi")),
                                          (np.int32, ("lo", "hi"))])
def test_clip_with_runtime_bounds(dtype, bounds):
    node = helper.make_node("Clip", ["x", *bounds], ["y"])
    ins = [vi("x", dtype, [3, 4])] + [vi(b, dtype, []) for b in bounds if b]
    model = make_model([node], ins, [vi("y", dtype, [3, 4])])
    g = lift(model)
    assert [n.op for n in g.nodes] == ["clip"] and len(g.nodes[0].inputs) >= 2
    x = (rng.standard_normal((3, 4)) * 4).astype(dtype)
    for lo, hi in ((-1, 2), (3, -3)):  # min > max gives max
        feeds = {"x": x, "lo": np.array(lo, dtype), "hi": np.array(hi, dtype)}
        feeds = {k: v for k, v in feeds.items() if k in {"x", *bounds}}
        assert_close(_run(g, feeds)[0], ort_run(model, feeds)[0], rtol=0, atol=0)


def test_clip_constant_bound_beside_a_runtime_one():
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    model = make_model([node], [vi("x", F32, [5]), vi("hi", F32, [])], [vi("y", F32, [5])],
                       {"lo": np.array(-0.5, F32)})
    g = lift(model)
    (clip,) = g.nodes
    assert clip.attrs["min"] == -0.5 and clip.inputs[1] is None and clip.inputs[2].name == "hi"
    feeds = {"x": np.linspace(-2, 2, 5).astype(F32), "hi": np.array(0.25, F32)}
    assert_close(_run(g, feeds)[0], ort_run(model, feeds)[0], rtol=0, atol=0)


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [-2, 0, 1, 5])
def test_trilu_with_a_runtime_k(upper, k):
    node = helper.make_node("Trilu", ["x", "k"], ["y"], upper=upper)
    model = make_model([node], [vi("x", F32, [2, 3, 4]), vi("k", I64, [])], [vi("y", F32, [2, 3, 4])], opset=14)
    g = lift(model)
    assert [len(n.inputs) for n in g.nodes] == [2]
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(F32), "k": np.array(k, I64)}
    assert_close(_run(g, feeds)[0], ort_run(model, feeds)[0], rtol=0, atol=0)


# ---------------------------------------------------------------- Dropout's training_mode

def _dropout_model() -> object:
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"], name="drop")
    return make_model([node], [vi("x", F32, [3, 4]), vi("r", F32, []), vi("t", np.bool_, [])],
                      [vi("y", F32, [3, 4]), vi("mask", np.bool_, [3, 4])])


def test_dropout_training_mode_input_is_specialized():
    x = rng.standard_normal((3, 4)).astype(F32)
    with pytest.raises(DynamicShapeError) as e:
        lift(_dropout_model())
    assert e.value.specializable == ["t"]
    for t, r in ((False, 0.5), (True, 0.0)):
        feeds = {"x": x, "r": np.array(r, F32), "t": np.array(t)}
        g = lift_specialized(_dropout_model(), feeds)
        assert g.meta["specialized"] == ({"t": False} if not t else {"t": True, "r": 0.0})
        y, mask = _run(g, feeds)
        assert np.array_equal(y, x) and mask.dtype == np.bool_ and mask.all()
    with pytest.raises(UnsupportedOpsError, match="training_mode is true with ratio 0.5: random dropout"):
        lift_specialized(_dropout_model(), {"x": x, "r": np.array(0.5, F32), "t": np.array(True)})


# ---------------------------------------------------------------- op features lift gained

def _reference(model, feeds: dict) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


def test_batch_norm_training_mode():
    c = 3
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"],
                            training_mode=1, momentum=0.8, epsilon=1e-3)
    inits = {"s": rng.uniform(0.5, 1.5, c).astype(F32), "b": rng.standard_normal(c).astype(F32),
             "m": rng.standard_normal(c).astype(F32), "v": rng.uniform(0.5, 2, c).astype(F32)}
    model = make_model([node], [vi("x", F32, [2, c, 4, 5])],
                       [vi("y", F32, [2, c, 4, 5]), vi("rm", F32, [c]), vi("rv", F32, [c])], inits, opset=15)
    x = rng.standard_normal((2, c, 4, 5)).astype(F32)
    for got, want in zip(_run(lift(model), {"x": x}), _reference(model, {"x": x})):
        assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_layer_norm_mean_and_inv_std_dev(axis):
    node = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "mean", "inv"], axis=axis, epsilon=1e-4)
    shape = (2, 3, 4)
    norm = shape[axis % 3:]
    inits = {"w": rng.standard_normal(norm).astype(F32), "b": rng.standard_normal(norm).astype(F32)}
    model = make_model([node], [vi("x", F32, list(shape))],
                       [vi("y", F32, None), vi("mean", F32, None), vi("inv", F32, None)], inits, opset=17)
    x = rng.standard_normal(shape).astype(F32)
    got = _run(lift(model), {"x": x})
    for g, w in zip(got, ort_run(model, {"x": x})):
        assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [{"kernel_shape": [2, 2]},
                                   {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                                   {"kernel_shape": [2, 3], "dilations": [2, 1], "storage_order": 1},
                                   {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}])
def test_max_pool_indices(attrs):
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], **attrs)
    model = make_model([node], [vi("x", F32, [2, 3, 6, 7])], [vi("y", F32, None), vi("idx", I64, None)], opset=12)
    x = rng.integers(-3, 3, (2, 3, 6, 7)).astype(F32)  # ties: the first tap in window order wins
    g = lift(model)
    assert [n.op for n in g.nodes] == ["max_pool_with_indices"]
    for got, want in zip(_run(g, {"x": x}), ort_run(model, {"x": x})):
        assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("attrs", [{"kernel_shape": [2, 2], "dilations": [2, 2]},
                                   {"kernel_shape": [3, 2], "dilations": [2, 3], "pads": [2, 1, 2, 1],
                                    "count_include_pad": 1},
                                   {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 2],
                                    "ceil_mode": 1}])
def test_average_pool_dilations(attrs):
    node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    model = make_model([node], [vi("x", F32, [1, 2, 7, 8])], [vi("y", F32, None)], opset=19, ir_version=9)
    x = rng.standard_normal((1, 2, 7, 8)).astype(F32)
    assert_close(_run(lift(model), {"x": x})[0], ort_run(model, {"x": x})[0])


@pytest.mark.parametrize("const_indices", [True, False])
@pytest.mark.parametrize("batch_dims,data,indices", [
    (1, (2, 3, 4), np.array([[[1, 2]], [[0, -1]]])),
    (1, (2, 3, 4), np.array([[2], [-3]])),
    (2, (2, 3, 4, 5), np.array([[[1], [3], [0]], [[2], [0], [-1]]])),
])
def test_gather_nd_batch_dims(const_indices, batch_dims, data, indices):
    node = helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=batch_dims)
    idx = indices.astype(I64)
    x = rng.standard_normal(data).astype(F32)
    ins, inits = [vi("x", F32, list(data))], {}
    if const_indices:
        inits["i"] = idx
    else:
        ins.append(vi("i", I64, list(idx.shape)))
    model = make_model([node], ins, [vi("y", F32, None)], inits)
    feeds = {"x": x} if const_indices else {"x": x, "i": idx}
    assert_close(_run(lift(model), feeds)[0], ort_run(model, feeds)[0], rtol=0, atol=0)


def test_float_mod_with_fmod_0_since_opset_28():
    a = np.array([-4.3, 7.2, 0.0, -0.0, -3.0, 3.0, -1.0, 1.0, np.inf, 1.0, np.nan], F32)
    b = np.array([2.1, -3.4, -2.0, 2.0, np.inf, np.inf, -np.inf, -np.inf, 2.0, 0.0, 2.0], F32)
    node = helper.make_node("Mod", ["a", "b"], ["y"])
    model = make_model([node], [vi("a", F32, [11]), vi("b", F32, [11])], [vi("y", F32, [11])], opset=28)
    got = _run(lift(model), {"a": a, "b": b})[0]
    want = np.array([2.0, -3.0, -0.0, 0.0, np.inf, 3.0, -1.0, -np.inf, np.nan, np.nan, np.nan], F32)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.array_equal(np.signbit(got[2:4]), [True, False])  # a zero takes the divisor's sign
