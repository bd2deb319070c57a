"""The example zoo: deterministic by seed, O(1) activations, non-trivial norms, exports that match torch in ORT."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kiln import zoo

NAMES = ["resnet", "gpt", "vit", "llama", "bert", "mlp"]


def _outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The module's outputs as a tuple, computed without grad."""
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules have bit-identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_zoo_lists_its_models():
    assert zoo.names() == NAMES
    assert set(zoo.ZOO) == set(NAMES)
    for name in NAMES:
        entry = zoo.ZOO[name]
        assert entry.name == name and entry.description
        assert zoo.input_names(name) == entry.input_names


@pytest.mark.parametrize("call", [zoo.get, zoo.input_names, zoo.onnx_model])
def test_unknown_name_is_a_key_error_listing_the_zoo(call):
    with pytest.raises(KeyError) as info:
        call("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message and all(name in message for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_model_other_seed_other_model(name):
    rng_before = torch.get_rng_state()
    m0, x0 = zoo.get(name, seed=0)
    m0_again, x0_again = zoo.get(name, seed=0)
    m1, x1 = zoo.get(name, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "building a zoo model must not consume the global RNG"
    assert not m0.training
    assert _states_equal(m0, m0_again)
    assert all(torch.equal(a, b) for a, b in zip(x0, x0_again))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(m0, x0), _outputs(m0_again, x0_again)))
    assert not _states_equal(m0, m1)
    assert not all(torch.equal(a, b) for a, b in zip(x0, x1))
    assert not all(torch.equal(a, b) for a, b in zip(_outputs(m0, x0), _outputs(m1, x0)))


@pytest.mark.parametrize("name", NAMES)
def test_activations_are_order_one(name):
    module, inputs = zoo.get(name)
    for out in _outputs(module, inputs):
        assert torch.isfinite(out).all()
        assert 0.05 < float(out.std()) < 10.0 and float(out.abs().max()) < 50.0


@pytest.mark.parametrize("name", ["resnet", "gpt", "vit", "llama", "bert"])
def test_norms_have_something_to_fold(name):
    module, _ = zoo.get(name)
    norms = [m for m in module.modules() if "Norm" in type(m).__name__]
    assert norms
    for norm in norms:
        assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))
        if getattr(norm, "bias", None) is not None:
            assert not torch.allclose(norm.bias, torch.zeros_like(norm.bias))
        if isinstance(norm, torch.nn.BatchNorm2d):
            assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
            assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_exported_zoo_model_matches_torch_in_onnxruntime(name):
    module, inputs = zoo.get(name)
    model = zoo.onnx_model(name)
    assert {n.domain for n in model.graph.node} <= {""}, "only default-domain ops"
    assert [i.name for i in model.graph.input] == list(zoo.input_names(name))
    assert [o.name for o in model.graph.output] == list(zoo.output_names(name))
    if name == "resnet":
        assert any(n.op_type == "BatchNormalization" for n in model.graph.node), "BN is kiln's to fold"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: x.numpy() for n, x in zip(zoo.input_names(name), inputs)})
    for ours, ref in zip(got, _outputs(module, inputs), strict=True):
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_model_hands_out_copies_of_the_cache():
    first = zoo.onnx_model("mlp")
    first.graph.node.pop()
    first.graph.name = "mutated"
    second = zoo.onnx_model("mlp")
    assert second.graph.name != "mutated"
    assert len(second.graph.node) == len(first.graph.node) + 1
