"""The graph oracle and the worker: stages, NaN/instability filters, crash and hang isolation."""

import numpy as np
import pytest

import tests.fuzz.planted  # noqa: F401  (registers the planted passes in this process)
from kiln.fuzz.oracle import GraphCase, compare, run_graph_case
from kiln.fuzz.worker import Task, Worker

SUB_RELU = """graph @g(%x: f32[2,3], %y: f32[2,3]) -> (%out) {
  %r = relu(%y) : f32[2,3]
  %d = sub(%x, %r) : f32[2,3]
  %out = tanh(%d) : f32[2,3]
}"""

SOFTMAX = """graph @g(%x: f32[2,4]) -> (%out) {
  %out = softmax(%x) {axis=-1} : f32[2,4]
}"""

MATMUL = """graph @g(%x: f32[2,4], %w: f32[4,3]) -> (%out) {
  %out = matmul(%x, %w) : f32[2,3]
}"""


def test_a_correct_case_passes_every_stage_and_reports_coverage():
    out = run_graph_case(GraphCase(SUB_RELU, ["canonicalize", "dce", "fuse-blocks"], seed=3))
    assert out.status == "ok", out
    assert any(f.startswith("feat:") for f in out.features)
    assert "pass:fuse-blocks:rewrote" in out.features
    assert len(out.arcs) > 100  # kiln's own code ran under the tracer


def test_a_planted_miscompile_is_a_mismatch_at_its_pass():
    out = run_graph_case(GraphCase(SUB_RELU, ["dce", "planted-sub-to-add", "dce"], seed=1), stages=("passes",))
    assert out.status == "finding"
    assert (out.symptom, out.stage, out.pass_name) == ("mismatch", "pass", "planted-sub-to-add")
    assert "differs" in out.message and out.detail["expected"] != out.detail["actual"]


LINEAR = """graph @g(%x: f32[4,8]) -> (%out) {
  %w = const f32[8,3] [0.5, -0.25, 0.75, 1.0, -1.0, 0.5, 0.125, 0.25, -0.5, 0.3, -0.7, 0.9, 0.2, -0.1, 0.6, -0.8, 0.4, 0.05, -0.35, 0.45, 0.15, -0.6, 0.7, -0.2]
  %out = matmul(%x, %w) : f32[4,3]
}"""


def test_a_quantizing_pass_becomes_the_reference_and_a_miscompile_after_it_is_still_found():
    """insert-qdq moves the outputs by design (Pass.exact is False): not a finding; the stages after it are
    judged against the quantized graph, so a planted miscompile behind it is still caught at its pass."""
    ok = run_graph_case(GraphCase(LINEAR, ["insert-qdq{samples=2}", "fuse-qlinear", "fuse-blocks"], seed=2),
                        stages=("passes", "onnxruntime"))
    assert ok.status == "ok", ok
    bad = run_graph_case(GraphCase(SUB_RELU, ["insert-qdq{samples=2}", "planted-sub-to-add"], seed=1),
                         stages=("passes",))
    assert (bad.status, bad.stage, bad.pass_name) == ("finding", "pass", "planted-sub-to-add"), bad


def test_a_non_finite_reference_is_not_judged():
    text = """graph @g(%x: f32[3]) -> (%out) {
      %z = sub(%x, %x) : f32[3]
      %out = div(%x, %z) : f32[3]
    }"""
    out = run_graph_case(GraphCase(text, ["planted-sub-to-add"], seed=0), stages=("passes", "onnxruntime"))
    assert out.status == "ok" and "ref:unusable" in out.features


def test_compare_is_exact_for_integers_and_relative_for_floats():
    a = {"y": np.array([1.0, 1000.0], np.float32)}
    assert compare(a, {"y": np.array([1.0001, 1000.0], np.float32)}) is None  # within 1e-3 of the magnitude
    assert "differs" in compare(a, {"y": np.array([3.0, 1000.0], np.float32)})
    assert "shape" in compare(a, {"y": np.zeros(3, np.float32)})
    assert "missing" in compare(a, {})
    i = {"k": np.array([1, 2], np.int64)}
    assert compare(i, {"k": np.array([1, 2], np.int64)}) is None
    assert "1 of 2 elements differ" in compare(i, {"k": np.array([1, 3], np.int64)})
    nan = {"y": np.array([np.nan, 1.0], np.float32)}
    assert compare(nan, {"y": np.array([5.0, 1.0], np.float32)}) is None  # NaN references are filtered


@pytest.mark.slow
def test_the_worker_survives_a_segfault_and_a_hang_and_names_them():
    w = Worker(timeout_s=20, plugins=("tests.fuzz.planted",))
    w.start()
    try:
        crash = w.run(Task("graph", GraphCase(SOFTMAX, ["planted-segv"]).to_json(), ("passes",), trace=False))
        assert (crash["status"], crash["symptom"], crash["stage"]) == ("finding", "crash", "pass")
        assert crash["pass_name"] == "planted-segv"  # the child recorded where it was before it died
        assert "SIGSEGV" in crash["message"]
        ok = w.run(Task("graph", GraphCase(MATMUL, ["dce"]).to_json(), ("passes",), trace=False))
        assert ok["status"] == "ok"  # a fresh child took over
        w.timeout_s = 3
        hang = w.run(Task("graph", GraphCase(MATMUL, ["planted-hang"]).to_json(), ("passes",), trace=False))
        assert (hang["symptom"], hang["stage"], hang["pass_name"]) == ("hang", "pass", "planted-hang")
        assert w.restarts >= 1
    finally:
        w.close()
