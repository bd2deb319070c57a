"""The public model corpus (kiln.corpus): real architectures, exported as users export them, compiled
and run by kiln, compared with torch (or ONNX Runtime for the models ORT's quantizer made)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln import corpus
from kiln.codegen.tolerance import MODEL_F32, Tolerance, assert_close

pytestmark = pytest.mark.slow

# ORT's quantized graphs are exact integer arithmetic; kiln's requantize may round one code differently
# where the float scale product lands on a tie, which moves an output by one output quantization step.
QUANTIZED = Tolerance(1e-3, 2e-3)


def _tolerance(cm: corpus.CorpusModel) -> Tolerance:
    return QUANTIZED if cm.reference_from == "onnxruntime" else MODEL_F32


@pytest.mark.parametrize("name", corpus.names())
def test_corpus_model_compiles_and_matches_its_reference(name):
    import kiln

    cm = corpus.build(name)
    art = kiln.compile(cm.model, example_inputs=cm.feeds)
    out = art.load().run(cm.feeds)
    assert len(out) == len(cm.reference)
    for (k, got), want in zip(out.items(), cm.reference):
        assert_close(got, want, _tolerance(cm), what=f"{name}: output {k}")


@pytest.mark.parametrize("name", corpus.names())
def test_corpus_outputs_vary_with_inputs(name):
    """A model whose outputs barely move when its inputs change would hide a miscompiled kernel."""
    cm = corpus.build(name)
    ref = np.asarray(cm.reference[0], dtype=np.float64)
    assert np.std(ref) > 1e-2 * max(np.abs(ref).max(), 1e-12), f"{name}: output is nearly constant"
    other = corpus.ort_outputs(cm.model, corpus.varied_inputs(cm, seed=1))[0]
    rel = np.abs(other - ref).max() / np.abs(ref).max()
    assert rel > 1e-2, f"{name}: outputs moved by only {rel:.2e} (relative) for new inputs"


def test_corpus_reference_agrees_with_onnxruntime():
    """The torch reference and ONNX Runtime agree on the exported graphs (a broken export would show here)."""
    for name in ("gpt2", "vit", "resnet"):
        cm = corpus.build(name)
        got = corpus.ort_outputs(cm.model, cm.feeds)
        for g, w in zip(got, cm.reference):
            assert_close(g, w, MODEL_F32, what=f"{name}: onnxruntime vs torch")
