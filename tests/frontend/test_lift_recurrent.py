"""Lifting RNN/GRU/LSTM (unrolled), If/Loop/Scan (inlined, unrolled) and the random-op refusals.

Every lifted model is interpreted and compared with onnxruntime on the original model.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.frontend import lift
from kiln.frontend.errors import UnsupportedOpsError

from .conftest import assert_close, make_model, ort_run, vi

F32, I64 = np.float32, np.int64
OPSET = 17
RNG = np.random.default_rng(7)


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5,
              atol: float = 1e-6, reference: bool = False) -> ir.Graph:
    """Lift + interpret vs onnxruntime (``reference``: ONNX's reference evaluator, for what ORT lacks)."""
    graph = lift(model)
    got = ir.interpret(graph, feeds)
    want = ReferenceEvaluator(model).run(None, feeds) if reference else ort_run(model, feeds)
    assert [v.name for v in graph.outputs] == [o.name for o in model.graph.output]
    for v, w in zip(graph.outputs, want):
        assert_close(got[v.name], w, rtol=rtol, atol=atol)
    return graph


def _refusal(model: onnx.ModelProto) -> str:
    with pytest.raises(UnsupportedOpsError) as e:
        lift(model)
    return str(e.value)


# ====================================================================== RNN, GRU, LSTM

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _rnn_model(kind: str, *, direction: str = "forward", layout: int = 0, seq: int = 3, batch: int = 2,
               inp: int = 3, hidden: int = 4, bias: bool = True, init: bool = True, lens=None,
               runtime_lens: bool = False, weights_as_inputs: bool = False, peep: bool = False,
               outputs: tuple[int, ...] = (0, 1, 2), **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    nd = 2 if direction == "bidirectional" else 1
    g = GATES[kind]
    x_shape = [batch, seq, inp] if layout else [seq, batch, inp]
    s_shape = [batch, nd, hidden] if layout else [nd, batch, hidden]
    arrays = {"W": RNG.uniform(-0.6, 0.6, (nd, g * hidden, inp)).astype(F32),
              "R": RNG.uniform(-0.6, 0.6, (nd, g * hidden, hidden)).astype(F32)}
    names = ["X", "W", "R", "", "", "", "", ""]
    if bias:
        arrays["B"] = RNG.uniform(-0.5, 0.5, (nd, 2 * g * hidden)).astype(F32)
        names[3] = "B"
    if lens is not None:
        arrays["L"] = np.asarray(lens, np.int32)
        names[4] = "L"
    if init:
        arrays["H0"] = RNG.uniform(-1, 1, s_shape).astype(F32)
        names[5] = "H0"
        if kind == "LSTM":
            arrays["C0"] = RNG.uniform(-1, 1, s_shape).astype(F32)
            names[6] = "C0"
    if peep:
        arrays["P"] = RNG.uniform(-0.5, 0.5, (nd, 3 * hidden)).astype(F32)
        names[7] = "P"
    n_in = {"RNN": 6, "GRU": 6, "LSTM": 8}[kind]
    names = names[:n_in]
    while names and not names[-1]:
        names.pop()
    n_out = {"RNN": 2, "GRU": 2, "LSTM": 3}[kind]
    out_names = [("Y", "Y_h", "Y_c")[k] if k in outputs else "" for k in range(n_out)]
    while out_names and not out_names[-1]:
        out_names.pop()
    node = helper.make_node(kind, names, out_names, hidden_size=hidden, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    y_shape = [batch, seq, nd, hidden] if layout else [seq, nd, batch, hidden]
    outs = [vi(n, F32, y_shape if n == "Y" else s_shape) for n in out_names if n]
    x = RNG.uniform(-1, 1, x_shape).astype(F32)
    feeds = {"X": x}
    inputs = [vi("X", F32, x_shape)]
    inits = {}
    for name, arr in arrays.items():
        if weights_as_inputs or (name == "L" and runtime_lens):
            inputs.append(vi(name, arr.dtype, list(arr.shape)))
            feeds[name] = arr
        else:
            inits[name] = arr
    return make_model([node], inputs, outs, inits, opset=OPSET), feeds


@pytest.mark.parametrize("kind,direction,layout", list(itertools.product(
    ["RNN", "GRU", "LSTM"], ["forward", "reverse", "bidirectional"], [0, 1])))
def test_rnn_directions_layouts(kind, direction, layout):
    """onnxruntime has no batch-first (layout=1) kernels: those are checked against ONNX's reference."""
    model, feeds = _rnn_model(kind, direction=direction, layout=layout)
    graph = _run_both(model, feeds, reference=bool(layout))
    assert not {"rnn", "gru", "lstm"} & set(graph.op_counts())


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_rnn_defaults_no_bias_no_state(kind):
    model, feeds = _rnn_model(kind, bias=False, init=False, direction="bidirectional")
    _run_both(model, feeds)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("runtime", [False, True])
@pytest.mark.parametrize("lens", [[4, 2, 1], [3, 0, 4]])
def test_rnn_sequence_lens(kind, runtime, lens):
    """Entries shorter than the sequence hold their state and write zeros, both directions; an entry
    of length 0 ends with zero states (onnxruntime's choice; ONNX does not say)."""
    model, feeds = _rnn_model(kind, direction="bidirectional", seq=4, batch=3, lens=lens,
                              runtime_lens=runtime)
    _run_both(model, feeds)


def test_rnn_full_constant_sequence_lens_need_no_masks():
    model, feeds = _rnn_model("LSTM", lens=[3, 3])
    graph = _run_both(model, feeds)
    assert "where" not in graph.op_counts()


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_rnn_weights_as_graph_inputs(kind):
    model, feeds = _rnn_model(kind, direction="bidirectional", weights_as_inputs=True, lens=[3, 1])
    _run_both(model, feeds)


def test_lstm_peepholes_and_input_forget():
    model, feeds = _rnn_model("LSTM", peep=True, direction="bidirectional")
    _run_both(model, feeds)
    model, feeds = _rnn_model("LSTM", peep=True, input_forget=1)
    _run_both(model, feeds)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("init", [False, True])
def test_gru_linear_before_reset(lbr, init):
    model, feeds = _rnn_model("GRU", linear_before_reset=lbr, init=init, direction="bidirectional")
    _run_both(model, feeds)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_rnn_clip(kind):
    model, feeds = _rnn_model(kind, clip=0.3)
    _run_both(model, feeds)


ACTS = {
    "RNN": [(["LeakyRelu"], [0.2], []), (["HardSigmoid"], [0.3], [0.4]), (["Relu"], [], [])],
    "GRU": [(["HardSigmoid", "LeakyRelu"], [0.25, 0.1], [0.45]), (["Sigmoid", "Softsign"], [], [])],
    "LSTM": [(["HardSigmoid", "Tanh", "Elu"], [0.3, 0.7], [0.4]),
             (["Sigmoid", "ThresholdedRelu", "Softplus"], [0.1], []),
             (["Sigmoid", "Tanh", "Relu"], [], [])],
}


@pytest.mark.parametrize("kind,acts", [(k, a) for k, v in ACTS.items() for a in v])
def test_rnn_activations_with_alpha_beta(kind, acts):
    """alpha/beta are consumed in order by the activations that take them (onnxruntime's reading)."""
    names, alphas, betas = acts
    extra = {"activations": names}
    if alphas:
        extra["activation_alpha"] = alphas
    if betas:
        extra["activation_beta"] = betas
    model, feeds = _rnn_model(kind, **extra)
    _run_both(model, feeds)


@pytest.mark.parametrize("outputs", [(1,), (0,), (0, 2)])
def test_lstm_some_outputs(outputs):
    model, feeds = _rnn_model("LSTM", outputs=outputs)
    _run_both(model, feeds)


def test_rnn_symbolic_batch():
    model, feeds = _rnn_model("GRU", init=False)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "N"
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_param = "N"
    graph = lift(model)
    assert graph.inputs[0].type.shape == (3, "N", 3)
    for batch in (1, 5):
        x = RNG.uniform(-1, 1, (3, batch, 3)).astype(F32)
        got = ir.interpret(graph, {"X": x})
        for v, w in zip(graph.outputs, ort_run(model, {"X": x})):
            assert_close(got[v.name], w, rtol=1e-5, atol=1e-6)


def test_rnn_refusals():
    model, _ = _rnn_model("LSTM")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    with pytest.raises(Exception, match="sequence length .* is symbolic"):
        lift(model)
    model, _ = _rnn_model("RNN", activations=["Gelu"])
    assert "'Gelu' is not an ONNX RNN activation" in _refusal(model)


# ====================================================================== If

def _branch(name: str, nodes, outputs) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], outputs)


def _if_model(cond_const: bool | None, else_op: str = "Sub") -> onnx.ModelProto:
    """res = cond ? x + w : x (else_op) w, with w an outer-scope initializer."""
    then_g = _branch("then", [helper.make_node("Add", ["x", "w"], ["t"])], [vi("t", F32, [2, 3])])
    else_g = _branch("else", [helper.make_node(else_op, ["x", "w"], ["e"])], [vi("e", F32, [2, 3])])
    inits = {"w": np.arange(6, dtype=F32).reshape(2, 3)}
    inputs = [vi("x", F32, [2, 3])]
    if cond_const is None:
        inputs.append(vi("c", np.bool_, []))
    else:
        inits["c"] = np.array(cond_const)
    node = helper.make_node("If", ["c"], ["res"], then_branch=then_g, else_branch=else_g)
    return make_model([node], inputs, [vi("res", F32, [2, 3])], inits, opset=OPSET)


@pytest.mark.parametrize("cond", [True, False])
def test_if_constant_condition_lifts_the_taken_branch_only(cond):
    """The untaken branch holds an op kiln does not have, which would refuse the model if lifted."""
    x = RNG.standard_normal((2, 3)).astype(F32)
    model = _if_model(cond, else_op="Add" if cond else "Sub")
    if cond:
        model.graph.node[0].attribute[0].g.node[0].op_type = "BitShift"  # else branch: never lifted
    graph = lift(model)
    assert "where" not in graph.op_counts()
    got = ir.interpret(graph, {"x": x})[graph.outputs[0].name]
    assert_close(got, x + np.arange(6, dtype=F32).reshape(2, 3) if cond else x - np.arange(6, dtype=F32).reshape(2, 3))


@pytest.mark.parametrize("cond", [True, False])
def test_if_computed_condition_selects_with_where(cond):
    model = _if_model(None)
    x = RNG.standard_normal((2, 3)).astype(F32)
    graph = _run_both(model, {"x": x, "c": np.array(cond)})
    assert graph.op_counts().get("where") == 1


def test_if_condition_computed_in_the_graph_with_a_one_element_shape():
    then_g = _branch("then", [helper.make_node("Neg", ["x"], ["t"])], [vi("t", F32, [4])])
    else_g = _branch("else", [helper.make_node("Abs", ["x"], ["e"])], [vi("e", F32, [4])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["res"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x", F32, [4])], [vi("res", F32, [4])], {"zero": np.zeros(1, F32)},
                       opset=OPSET)
    for sign in (1, -1):
        _run_both(model, {"x": sign * np.abs(RNG.standard_normal(4)).astype(F32)})


def test_if_computed_condition_with_different_branch_types_is_refused():
    then_g = _branch("then", [helper.make_node("Identity", ["x"], ["t"])], [vi("t", F32, [2, 3])])
    else_g = _branch("else", [helper.make_node("ReduceSum", ["x"], ["e"], keepdims=0)], [vi("e", F32, [])])
    node = helper.make_node("If", ["c"], ["res"], then_branch=then_g, else_branch=else_g)
    model = make_model([node], [vi("x", F32, [2, 3]), vi("c", np.bool_, [])], [vi("res", F32, None)],
                       opset=OPSET)
    assert "kiln evaluates both branches and selects with where" in _refusal(model)


def test_if_branch_refusal_names_the_inner_node():
    then_g = _branch("then", [helper.make_node("BitShift", ["x", "x"], ["t"], direction="LEFT")],
                     [vi("t", F32, [2, 3])])
    else_g = _branch("else", [helper.make_node("Abs", ["x"], ["e"])], [vi("e", F32, [2, 3])])
    node = helper.make_node("If", ["c"], ["res"], then_branch=then_g, else_branch=else_g)
    model = make_model([node], [vi("x", F32, [2, 3]), vi("c", np.bool_, [])], [vi("res", F32, [2, 3])],
                       opset=OPSET)
    msg = _refusal(model)
    assert "BitShift" in msg and "its then cannot be lifted" in msg


# ====================================================================== Loop

def _loop_body(extra_nodes=(), cond_node=None) -> onnx.GraphProto:
    """y_out = y_in + x[i] * w (w from the outer scope); scan output y_out; cond_out per cond_node."""
    nodes = [
        helper.make_node("Gather", ["x", "i"], ["xi"], axis=0),
        helper.make_node("Mul", ["xi", "w"], ["xw"]),
        helper.make_node("Add", ["y_in", "xw"], ["y_out"]),
        helper.make_node("Identity", ["y_out"], ["scan"]),
        cond_node or helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        *extra_nodes,
    ]
    return helper.make_graph(
        nodes, "body", [vi("i", I64, []), vi("cond_in", np.bool_, []), vi("y_in", F32, [3])],
        [vi("cond_out", np.bool_, []), vi("y_out", F32, [3]), vi("scan", F32, [3])])


def _loop_model(body: onnx.GraphProto, trip: int | None, cond: bool | None = True,
                trip_input: bool = False) -> onnx.ModelProto:
    inits = {"w": np.array([1.0, -2.0, 0.5], F32)}
    inputs = [vi("x", F32, [6, 3]), vi("y0", F32, [3])]
    names = ["", "", "y0"]
    if trip is not None:
        names[0] = "M"
        if trip_input:
            inputs.append(vi("M", I64, []))
        else:
            inits["M"] = np.array(trip, I64)
    if cond is not None:
        names[1] = "C"
        inits["C"] = np.array(cond)
    node = helper.make_node("Loop", names, ["y", "ys"], body=body)
    return make_model([node], inputs, [vi("y", F32, [3]), vi("ys", F32, None)], inits, opset=OPSET)


def _loop_feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((6, 3)).astype(F32), "y0": RNG.standard_normal(3).astype(F32)}


@pytest.mark.parametrize("trip", [1, 4, 6])
def test_loop_constant_trip_count_unrolled(trip):
    graph = _run_both(_loop_model(_loop_body(), trip), _loop_feeds())
    assert graph.outputs[1].type.shape == (trip, 3)


def test_loop_condition_folded_each_iteration_stops_early():
    """cond_out = i < 2 folds to a constant every iteration: three iterations of the six allowed."""
    body = _loop_body([helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2, I64)))],
                      cond_node=helper.make_node("Less", ["i", "two"], ["cond_out"]))
    body.node.insert(0, body.node.pop())  # the Constant must come before its user
    graph = _run_both(_loop_model(body, 6), _loop_feeds())
    assert graph.outputs[1].type.shape == (3, 3)
    graph = _run_both(_loop_model(body, None), _loop_feeds())
    assert graph.outputs[1].type.shape == (3, 3)


def test_loop_with_nested_if_reading_body_values():
    """An If inside the body reads the body's own values: the renaming reaches nested subgraphs."""
    then_g = _branch("then", [helper.make_node("Neg", ["xw"], ["t"])], [vi("t", F32, [3])])
    else_g = _branch("else", [helper.make_node("Abs", ["xw"], ["e"])], [vi("e", F32, [3])])
    body = onnx.GraphProto()
    body.CopyFrom(_loop_body())
    body.node[2].input[1] = "sel"
    body.node.insert(2, helper.make_node("If", ["flag"], ["sel"], then_branch=then_g, else_branch=else_g))
    model = _loop_model(body, 4)
    model.graph.input.append(vi("flag", np.bool_, []))
    for flag in (True, False):
        _run_both(model, {**_loop_feeds(), "flag": np.array(flag)})


def test_loop_refusals():
    assert "its trip count M is computed at run time" in _refusal(_loop_model(_loop_body(), 3, trip_input=True))
    assert "kiln unrolls loops of at most 256 iterations" in _refusal(_loop_model(_loop_body(), 300))
    body = _loop_body(cond_node=helper.make_node("Cast", ["yo_sum"], ["cond_out"], to=9))
    body.node.insert(3, helper.make_node("ReduceSum", ["y_out"], ["yo_sum"], keepdims=0))
    assert "computes the loop condition at run time" in _refusal(_loop_model(body, 3))


# ====================================================================== Scan

def _scan_body() -> onnx.GraphProto:
    nodes = [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
             helper.make_node("Mul", ["s_out", "x_t"], ["out1"]),
             helper.make_node("Identity", ["s_out"], ["out2"])]
    return helper.make_graph(nodes, "scan_body", [vi("s_in", F32, [2]), vi("x_t", F32, [2])],
                             [vi("s_out", F32, [2]), vi("out1", F32, [2]), vi("out2", F32, [2])])


@pytest.mark.parametrize("in_axis,in_dir,out_axis,out_dir", [(0, 0, 0, 0), (1, 1, 1, 0), (0, 1, -1, 1)])
def test_scan9_axes_and_directions(in_axis, in_dir, out_axis, out_dir):
    x_shape = [4, 2] if in_axis == 0 else [2, 4]
    node = helper.make_node("Scan", ["s0", "x"], ["s", "o1", "o2"], body=_scan_body(), num_scan_inputs=1,
                            scan_input_axes=[in_axis], scan_input_directions=[in_dir],
                            scan_output_axes=[out_axis, 0], scan_output_directions=[out_dir, 0])
    model = make_model([node], [vi("s0", F32, [2]), vi("x", F32, x_shape)],
                       [vi("s", F32, [2]), vi("o1", F32, None), vi("o2", F32, None)], opset=OPSET)
    _run_both(model, {"s0": RNG.standard_normal(2).astype(F32), "x": RNG.standard_normal(x_shape).astype(F32)})


def test_scan8_batch():
    node = helper.make_node("Scan", ["", "s0", "x"], ["s", "o1", "o2"], body=_scan_body(), num_scan_inputs=1,
                            directions=[1])
    model = make_model([node], [vi("s0", F32, [3, 2]), vi("x", F32, [3, 4, 2])],
                       [vi("s", F32, [3, 2]), vi("o1", F32, [3, 4, 2]), vi("o2", F32, [3, 4, 2])], opset=8,
                       ir_version=3)
    s0, x = RNG.standard_normal((3, 2)).astype(F32), RNG.standard_normal((3, 4, 2)).astype(F32)
    graph = lift(model)
    got = ir.interpret(graph, {"s0": s0, "x": x})
    # Scan-8 reference: per batch entry, reverse scan over axis 1
    s = s0.copy()
    o1, o2 = np.zeros_like(x), np.zeros_like(x)
    for t in range(3, -1, -1):
        s = s + x[:, t]
        o1[:, 3 - t], o2[:, 3 - t] = s * x[:, t], s
    want = [s, o1, o2]
    for v, w in zip(graph.outputs, want):
        assert_close(got[v.name], w)


def test_scan_symbolic_axis_is_refused():
    node = helper.make_node("Scan", ["s0", "x"], ["s", "o1", "o2"], body=_scan_body(), num_scan_inputs=1)
    model = make_model([node], [vi("s0", F32, [2]), vi("x", F32, ["T", 2])],
                       [vi("s", F32, [2]), vi("o1", F32, None), vi("o2", F32, None)], opset=OPSET)
    with pytest.raises(Exception, match="kiln unrolls Scan and needs it static"):
        lift(model)


# ====================================================================== random ops

@pytest.mark.parametrize("op,inputs,attrs", [
    ("RandomNormal", [], {"shape": [2, 3]}),
    ("RandomUniform", [], {"shape": [2, 3], "seed": 1.0}),
    ("RandomNormalLike", ["x"], {"seed": 3.0}),
    ("RandomUniformLike", ["x"], {}),
    ("Bernoulli", ["x"], {"seed": 0.0}),
])
def test_random_ops_are_refused_seeded_or_not(op, inputs, attrs):
    node = helper.make_node(op, inputs, ["y"], **attrs)
    model = make_model([node], [vi("x", F32, [2, 3])], [vi("y", F32, [2, 3])], opset=OPSET)
    msg = _refusal(model)
    assert op in msg and "feed the random values as a graph input" in msg
    assert ("its seed is set" in msg) == ("seed" in attrs)


# ====================================================================== compiled

@pytest.mark.slow
def test_recurrent_and_control_flow_compiled():
    """A bidirectional LSTM with run-time sequence_lens, a computed If and a Scan, compiled, vs onnxruntime."""
    import kiln

    lstm, feeds = _rnn_model("LSTM", direction="bidirectional", seq=3, batch=2, lens=[3, 1], runtime_lens=True,
                             peep=True, outputs=(0, 1))
    nodes = list(lstm.graph.node)
    then_g = _branch("then", [helper.make_node("Neg", ["Y_h"], ["t"])], [vi("t", F32, [2, 2, 4])])
    else_g = _branch("else", [helper.make_node("Abs", ["Y_h"], ["e"])], [vi("e", F32, [2, 2, 4])])
    nodes.append(helper.make_node("If", ["c"], ["sel"], then_branch=then_g, else_branch=else_g))
    nodes.append(helper.make_node("Scan", ["s0", "Y_h"], ["s", "o1"], body=_scan_body_4(),
                                  num_scan_inputs=1, scan_input_axes=[1]))
    inputs = list(lstm.graph.input) + [vi("c", np.bool_, []), vi("s0", F32, [2, 4])]
    outs = list(lstm.graph.output) + [vi("sel", F32, [2, 2, 4]), vi("s", F32, [2, 4]), vi("o1", F32, None)]
    inits = {t.name: numpy_helper.to_array(t) for t in lstm.graph.initializer}
    model = make_model(nodes, inputs, outs, inits, opset=OPSET)
    sess = kiln.compile(model, example_inputs={**feeds, "c": np.array(True), "s0": np.zeros((2, 4), F32)}).load()
    for cond in (True, False):
        run = {**feeds, "c": np.array(cond), "s0": RNG.standard_normal((2, 4)).astype(F32)}
        got = sess.run(run)
        for o, want in zip(model.graph.output, ort_run(model, run)):
            assert_close(got[o.name], want, rtol=1e-4, atol=1e-5)


def _scan_body_4() -> onnx.GraphProto:
    nodes = [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["s_out", "x_t"], ["out1"])]
    return helper.make_graph(nodes, "scan_body", [vi("s_in", F32, [2, 4]), vi("x_t", F32, [2, 4])],
                             [vi("s_out", F32, [2, 4]), vi("out1", F32, [2, 4])])
