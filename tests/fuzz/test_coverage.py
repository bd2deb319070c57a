"""Coverage feedback: kiln's arcs (new patterns give new arcs), tracer hygiene, message and site normalization."""

from __future__ import annotations

import json
import sys

import pytest

from kiln import ir
from kiln.fuzz.coverage import (
    ArcTracer,
    Coverage,
    arc_parts,
    error_site,
    kiln_module,
    normalize_message,
    trace_arcs,
)
from kiln.passes.manager import run_pipeline
from tests.passes.test_conv_bn import TEXT as CONV_BN  # conv -> batch_norm -> relu

PIPELINE = "canonicalize,fold-conv-bn,dce,fuse-blocks"

CONV_ONLY = """graph @g(%x: f32[1,1,3,3]) -> (%z) {
  %w = const f32[2,1,1,1] [1.0, 3.0]
  %b = const f32[2] [1.0, 1.0]
  %c = conv(%x, %w, %b) : f32[1,2,3,3]
  %z = relu(%c) : f32[1,2,3,3]
}"""


def _arcs_of(text: str) -> tuple[set[int], dict[int, str]]:
    g = ir.parse(text)
    tracer = ArcTracer()
    with tracer:
        run_pipeline(g, PIPELINE)
    return tracer.arcs, tracer.files


@pytest.fixture
def no_outer_tracer():
    """Run without pytest-cov's (or a debugger's) tracer, and put it back afterwards."""
    saved = sys.gettrace()
    sys.settrace(None)
    yield
    sys.settrace(saved)


def test_a_rewrite_pattern_adds_arcs_in_its_pass(no_outer_tracer):
    plain, _ = _arcs_of(CONV_ONLY)
    folded, files = _arcs_of(CONV_BN)
    assert plain and folded
    cov = Coverage()
    assert cov.add(plain, "arc") == len(plain)
    assert cov.add(plain, "arc") == 0  # the same test again adds nothing
    new = folded - plain
    assert cov.would_add(folded, "arc") == len(new) > 0
    assert cov.add(folded, "arc") == len(new)
    in_conv_bn = {a for a in new if files.get(arc_parts(a)[0]) == "kiln.passes.conv_bn"}
    assert in_conv_bn, sorted({files[arc_parts(a)[0]] for a in new})


def test_arcs_are_stable_across_runs(no_outer_tracer):
    a, _ = _arcs_of(CONV_BN)
    b, _ = _arcs_of(CONV_BN)
    assert a == b
    assert all(isinstance(x, int) and 0 < x < 2**63 for x in a)  # JSON-safe ints


def _foreign(n: int) -> int:
    return sum(json.loads(json.dumps(list(range(n)))))


def test_frames_outside_kiln_and_the_fuzzer_itself_are_not_traced(no_outer_tracer):
    result, arcs = trace_arcs(_foreign, 10)
    assert result == 45 and arcs == set()
    _, arcs = trace_arcs(normalize_message, "kiln.fuzz is not traced: v12")
    assert arcs == set()
    assert kiln_module(__file__) is None
    assert kiln_module(ir.text.__file__) == ("kiln.ir.text", True)
    assert kiln_module(sys.modules["kiln.fuzz.coverage"].__file__) == ("kiln.fuzz.coverage", False)


def test_trace_arcs_returns_the_exception_and_the_arcs_up_to_it(no_outer_tracer):
    err, arcs = trace_arcs(ir.parse, "graph @g(%x: f32[2]) -> (%y) {\n}")
    assert isinstance(err, ir.ParseError)
    assert arcs


def test_the_previous_tracer_is_restored(no_outer_tracer):
    calls = []

    def outer(frame, event, arg):
        calls.append(event)
        return None

    sys.settrace(outer)
    try:
        with ArcTracer() as t1:
            assert sys.gettrace() is not outer
            before = len(calls)
            with ArcTracer() as t2:
                ir.parse(CONV_ONLY)
            inner_restored = sys.gettrace()
            ir.parse(CONV_BN)
            replaced_calls = len(calls) - before
        assert sys.gettrace() is outer
        ir.parse(CONV_ONLY)
        after_calls = len(calls) - before
    finally:
        sys.settrace(None)
    assert inner_restored == t1._global
    assert t2.arcs and t1.arcs  # each recorded its own block
    assert replaced_calls == 0 and after_calls > 0  # the outer tracer was off, then back


# ====================================================================== messages and sites

@pytest.mark.parametrize("raw, want", [
    ("value %v12 has type f32[3, 4] at 0x7f3a2b10", "value %v# has type f32[#, #] at 0x#"),
    ("dtype float32 vs int8; eps 1e-05; N*64", "dtype float32 vs int8; eps #; N*#"),
    ("onnx::Conv_12.weight in conv2d via log1p", "onnx::Conv_#.weight in conv2d via log1p"),
    ("bad file /work/main/passes/conv_bn.py and ir/verify.py", "bad file conv_bn.py and verify.py"),
    ("graph g is invalid:\n  - value %add_3 is defined twice\n  - node relu_7",
     "graph g is invalid: | - value %add_# is defined twice | - node relu_#"),
    ("Check failed: (a_ty->dtype == b_ty->dtype) is false: mismatched types. int32 vs. float32\n",
     "Check failed: (a_ty->dtype == b_ty->dtype)"),
    ("[12:00:01] /workspace/tvm/src/arith/int_set.cc:123: Check failed: x == y (3 vs. 4) : bad",
     "arith/int_set.cc:123: Check failed: x == y (# vs. #)"),
    ('Traceback (most recent call last):\n  File "/x/tvm/ir/expr.py", line 95, in __init__\n'
     '  File "/project/src/ir/expr.cc", line 802, in tvm::IntImm::IntImm(tvm::PrimType)\n'
     "ValueError: Check failed: (value_ty.MatchesCode(DLDataTypeCode::kDLInt)) is false: IntImm supports only int",
     "ir/expr.cc:802: Check failed: (value_ty.MatchesCode(DLDataTypeCode::kDLInt))"),
])
def test_normalize_message(raw, want):
    assert normalize_message(raw) == want


def test_normalized_messages_are_one_short_line():
    out = normalize_message("x" * 500 + "\n" + "y 1 2 3\n" * 50)
    assert "\n" not in out and len(out) <= 200


def test_error_site_names_the_innermost_kiln_frame():
    with pytest.raises(ir.ParseError) as e:
        ir.parse("graph @g(%x: f32[2]) -> (%y) {\n  %y = relu(%z) : f32[2]\n}")
    site = error_site(e.value)
    assert site.startswith("ParseError@kiln.ir.text.parse:"), site
    assert int(site.rsplit(":", 1)[1]) > 0


def test_error_site_follows_the_cause_and_reads_tvm_sites():
    try:
        try:
            ir.parse("graph @g(%x: q32[2]) -> (%x) {\n}")
        except ir.ParseError as inner:
            raise RuntimeError("pass failed") from inner
    except RuntimeError as outer:
        assert error_site(outer).startswith("ParseError@kiln.ir.text.")
    msg = ('Traceback:\n  File "/project/src/ir/expr.cc", line 802, in tvm::IntImm\n'
           "ValueError: Check failed: (x) is false: y")
    assert error_site(ValueError(msg)) == "ValueError@ir/expr.cc:802"
    assert error_site(KeyError("nothing")) == "KeyError@?"


# ====================================================================== the map

def test_coverage_counts_by_source_and_round_trips_through_json():
    cov = Coverage()
    assert cov.add([1, 2, 3], "arc") == 3
    assert cov.add(["feat:conv>relu", "feat:add"], "feat") == 2
    assert cov.add(["err:ValueError@x:1"], "err") == 1
    assert cov.add([3, 4], "arc") == 1
    assert cov.would_add(["feat:add", "feat:new"], "feat") == 1
    assert cov.would_add(["tvm-pass:Simplify"], "tvm-pass") == 1 and "tvm-pass" not in cov.by_source
    assert cov.total == 7
    assert cov.by_source == {"arc": 4, "err": 1, "feat": 2}
    assert ("arc", 4) in cov and ("feat", 4) not in cov
    back = Coverage.from_json(json.loads(json.dumps(cov.to_json())))
    assert back.by_source == cov.by_source and back.total == 7
    assert back.add([1, 2, 5], "arc") == 1
