"""The pass manager: pipeline strings, option typing, errors that name the pass, instruments, RewritePass."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from kiln import ir
from kiln.passes.conv_bn import FoldConvBN
from kiln.passes.fusion import FuseBlocks
from kiln.passes.manager import (
    Instruments,
    Pass,
    PassError,
    PipelineError,
    RewritePass,
    format_pipeline,
    parse_pipeline,
    random_inputs,
    register_pass,
    registered_passes,
    run_pipeline,
    run_pipeline_report,
)


@register_pass
@dataclass(frozen=True)
class _Scale(Pass):
    """Test pass with typed options: multiplies every graph output by ``factor`` (or breaks the graph)."""

    name: ClassVar[str] = "test-scale"
    factor: float = 2.0
    broken: bool = False

    def apply(self, graph, log):
        if self.broken:
            graph.nodes[0].outputs[0].type = ir.TensorType("i64", (1,))
            return graph
        outs = []
        for v in graph.outputs:
            c = graph.add_constant(np.array(self.factor, v.type.np_dtype))
            outs.append(graph.add_node("mul", [v, c]).output)
        graph.set_outputs(outs)
        return graph


def _graph():
    return ir.parse("""graph @g(%x: f32[3]) -> (%y) {
      %y = relu(%x) : f32[3]
    }""")


def test_round_trip_of_pipeline_string():
    text = "canonicalize,test-scale{factor=3.0},dce"
    passes = parse_pipeline(text)
    assert [p.name for p in passes] == ["canonicalize", "test-scale", "dce"]
    assert passes[1].factor == 3.0
    assert format_pipeline(passes) == text
    assert format_pipeline(parse_pipeline("test-scale{factor=2.0}")) == "test-scale"  # defaults are elided


@pytest.mark.parametrize("text, message", [
    ("canonicalise", "unknown pass 'canonicalise'; known passes: canonicalize"),
    ("test-scale{fctor=2}", "has no option 'fctor'; options: ['broken', 'factor']"),
    ("test-scale{factor=two}", "option 'factor': expected float, got 'two'"),
    ("test-scale{broken=maybe}", "option 'broken': expected bool, got 'maybe'"),
    ("test-scale{factor}", "must be key=value"),
    ("dce;;", "cannot parse at column"),
])
def test_bad_pipelines_say_what_is_wrong(text, message):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert message in str(e.value)


def test_run_pipeline_applies_passes_in_order_and_reports_each():
    seen = []
    g = run_pipeline(_graph(), "test-scale{factor=3.0},test-scale", on_pass=lambda p, g: seen.append(str(p)))
    assert seen == ["test-scale{factor=3.0}", "test-scale"]
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    np.testing.assert_array_equal(ir.interpret(g, {"x": x})[g.outputs[0].name], np.maximum(x, 0) * 6)


def test_a_pass_that_breaks_the_graph_is_named_with_its_predecessors():
    with pytest.raises(PassError) as e:
        run_pipeline(_graph(), "dce,test-scale{broken=true}")
    msg = str(e.value)
    assert "pass test-scale{broken=True} left an invalid graph (after: dce)" in msg


def test_builtin_passes_are_registered():
    assert {"canonicalize", "dce"} <= set(registered_passes())


@register_pass
@dataclass(frozen=True)
class _NegToSub(RewritePass):
    """Test rewrite: ``neg(x)`` -> ``sub(0, x)``, refused where x is a graph input named ``keep``."""

    name: ClassVar[str] = "test-neg-to-sub"

    def match(self, graph, node):
        return node if node.op == "neg" else None

    def check(self, graph, node):
        return "operand %keep is protected" if node.inputs[0].name == "keep" else None

    def rewrite(self, graph, node):
        zero = graph.add_constant(np.zeros((), node.output.type.np_dtype))
        new = graph.op("sub", zero, node.inputs[0], before=node)
        graph.replace_all_uses(node.output, new)
        graph.remove(node)
        return "neg -> sub(0, x)"


_NEGS = """graph @g(%x: f64[3], %keep: f64[3]) -> (%y) {
  %a = neg(%x) : f64[3]
  %b = neg(%keep) : f64[3]
  %y = add(%a, %b) : f64[3]
}"""


def test_rewrite_pass_records_rewrites_and_refusals_and_leaves_refused_sites_alone():
    res = run_pipeline_report(ir.parse(_NEGS), "test-neg-to-sub")
    log = res.records[0].log
    assert [at for at, _ in log.rewrites] == ["a"]
    assert [(r.at, r.reason) for r in log.refusals] == [("b", "operand %keep is protected")]
    assert res.graph.op_counts() == {"neg": 1, "sub": 1, "add": 1}
    assert res.records[0].op_delta == {"neg": -1, "sub": 1}
    assert res.records[0].delta_text == "neg-1 sub+1"
    assert res.records[0].nodes_before == res.records[0].nodes_after == 3
    assert res.refusals == log.refusals


def test_check_each_pass_keeps_a_pass_that_preserves_the_outputs():
    res = run_pipeline_report(ir.parse(_NEGS), "test-neg-to-sub,dce", Instruments(check_each_pass=True))
    assert [r.max_error for r in res.records] == [0.0, 0.0]


def test_check_each_pass_names_the_first_pass_that_changes_the_outputs():
    with pytest.raises(PassError) as e:
        run_pipeline(_graph(), "dce,test-scale{factor=1.0},test-scale{factor=3.0},dce",
                     Instruments(check_each_pass=True, check_inputs={"x": np.array([1.0, 2.0, 3.0], np.float32)}))
    msg = str(e.value)
    assert "pass test-scale{factor=3.0} changed the model's outputs (after: dce, test-scale{factor=1.0})" in msg
    assert "output 'y" in msg


def test_dump_ir_writes_one_file_per_pass_that_parses_back(tmp_path):
    run_pipeline(ir.parse(_NEGS), "test-neg-to-sub,dce", Instruments(dump_ir=tmp_path / "dump"))
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["000_input.ir", "001_test-neg-to-sub.ir", "002_dce.ir"]
    assert "neg(%keep)" in (tmp_path / "dump" / "001_test-neg-to-sub.ir").read_text()
    assert ir.verify(ir.parse((tmp_path / "dump" / "002_dce.ir").read_text())).op_counts()["sub"] == 1


def test_records_time_each_pass():
    res = run_pipeline_report(_graph(), "dce,test-scale")
    assert [r.name for r in res.records] == ["dce", "test-scale"]
    assert all(r.seconds >= 0 for r in res.records)
    assert res.records[1].op_delta == {"mul": 1}


def test_option_validation_in_the_pass_becomes_a_pipeline_error():
    @dataclass(frozen=True)
    class _Mode(Pass):
        name: ClassVar[str] = "test-mode"
        mode: str = "a"

        def __post_init__(self):
            if self.mode not in ("a", "b"):
                raise ValueError(f"mode must be 'a' or 'b', got {self.mode!r}")

        def apply(self, graph, log):
            return graph

    register_pass(_Mode)
    assert parse_pipeline("test-mode{mode=b}")[0].mode == "b"
    with pytest.raises(PipelineError, match="pass 'test-mode': mode must be 'a' or 'b', got 'c'"):
        parse_pipeline("test-mode{mode=c}")


def test_random_inputs_follow_the_input_types():
    g = ir.parse("""graph @g(%x: f32[2,3], %i: i64[4], %m: bool[2]) -> (%x) {
    }""")
    feeds = random_inputs(g, seed=1)
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (2, 3)
    assert feeds["i"].dtype == np.int64 and feeds["i"].min() >= 0 and feeds["i"].max() < 8
    assert feeds["m"].dtype == np.bool_
    np.testing.assert_array_equal(random_inputs(g, seed=1)["x"], feeds["x"])


FUSED_THEN_FOLDED = """graph @g(%x: f32[1,6,7]) -> (%y) {
  %w = const f32[2,3,1] [-0.64, -0.68, 0.28, -0.21, -0.11, 0.59]
  %gamma = const f32[2] [0.69, 1.23]
  %beta = const f32[2] [-0.48, -0.47]
  %mean = const f32[2] [0.29, -0.002]
  %var = const f32[2] [0.76, 1.19]
  %t = tanh(%x) : f32[1,6,7]
  %conv = conv(%t, %w, _) {group=2} : f32[1,2,7]
  %bn = batch_norm(%conv, %gamma, %beta, %mean, %var) {epsilon=1e-05} : f32[1,2,7]
  %y = relu(%bn) : f32[1,2,7]
}"""


def test_a_rewrite_after_fuse_blocks_is_refused_with_the_reason():
    """Fuzzer finding: fold-conv-bn after fuse-blocks left a block whose member was read outside it
    (the verifier failed after the pass); such pipelines are now refused before anything runs."""
    with pytest.raises(PipelineError, match="'fold-conv-bn' comes after fuse-blocks.*put fuse-blocks last"):
        parse_pipeline("fuse-blocks,fold-conv-bn")
    with pytest.raises(PipelineError, match="comes after fuse-blocks"):
        run_pipeline(ir.parse(FUSED_THEN_FOLDED), [FuseBlocks(), FoldConvBN()])
    g = run_pipeline(ir.parse(FUSED_THEN_FOLDED), "fold-conv-bn,fuse-blocks,dce,fuse-blocks{max_ops=2}")
    assert "batch_norm" not in g.op_counts() and all(n.block for n in g.nodes)
