"""ONNX's node conformance suite through lift + the interpreter (the compiled path: `make conformance`)."""

from __future__ import annotations

import onnx
import pytest

from kiln import conformance

pytestmark = pytest.mark.slow

# The interpreter path must stay at or above this many passing in-scope cases (README: ONNX conformance).
INTERP_PASS_FLOOR = 1671  # measured: 1671 of 1723 in-scope cases


@pytest.fixture(scope="module")
def outcomes():
    return conformance.run("interp", jobs=1)


def test_no_case_is_wrong_or_crashes(outcomes):
    bad = [f"{o.status}: {o.case}: {o.detail}" for o in outcomes if o.status in ("wrong", "crashed")]
    assert bad == [], "\n".join(bad[:40])


def test_interpreter_pass_count_does_not_regress(outcomes):
    s = conformance.summarize(outcomes)
    assert s["total"].get("pass", 0) >= INTERP_PASS_FLOOR, conformance.summary_line("interp", s)


def test_every_refusal_says_why(outcomes):
    silent = [o.case for o in outcomes if o.status == "refused" and len(o.detail) < 40]
    assert silent == []


def test_scope_rules():
    helper = onnx.helper
    t = onnx.TensorProto
    seq = helper.make_graph([helper.make_node("SequenceEmpty", [], ["s"])], "g", [],
                            [helper.make_tensor_sequence_value_info("s", t.FLOAT, None)])
    assert "sequence" in conformance.scope_reason(helper.make_model(seq))
    ml = helper.make_graph([helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml")], "g",
                           [helper.make_tensor_value_info("x", t.FLOAT, [2])],
                           [helper.make_tensor_value_info("y", t.FLOAT, [2])])
    assert "ai.onnx.ml" in conformance.scope_reason(helper.make_model(ml))
    plain = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", t.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", t.FLOAT, [2])])
    assert conformance.scope_reason(helper.make_model(plain)) is None
    assert conformance.op_of(plain and helper.make_model(plain), "test_relu") == "Relu"


def test_matches_compares_nan_and_dtypes():
    import numpy as np

    assert conformance._matches(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), 1e-3, 0) is None
    assert "NaN" in conformance._matches(np.array([np.nan, 1.0]), np.array([0.0, 1.0]), 1e-3, 0)
    assert "dtype" in conformance._matches(np.array([1], np.int64), np.array([1], np.int32), 0, 0)
    assert "differ" in conformance._matches(np.array([1.0, 2.0]), np.array([1.0, 2.1]), 1e-3, 0)
