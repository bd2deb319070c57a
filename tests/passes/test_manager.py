"""The pass manager: pipeline strings, option typing, errors that name the pass."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from kiln import ir
from kiln.passes.manager import (
    Pass,
    PassError,
    PipelineError,
    format_pipeline,
    parse_pipeline,
    register_pass,
    registered_passes,
    run_pipeline,
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
