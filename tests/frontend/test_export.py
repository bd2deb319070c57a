"""torch -> ONNX export: checked and self-contained models, BN kept, dynamic dims, quiet, fallback, errors."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kiln.frontend.torch_export import MAX_IR_VERSION, ExportError, ExportFallbackWarning, export


class ConvBn(nn.Module):
    """Conv -> BatchNorm -> ReLU with non-trivial running stats, and a Dropout that eval mode must drop."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.bn(self.conv(x))))


class DataDependentBranch(nn.Module):
    """A Python branch on a tensor value: torch.export refuses it, the TorchScript tracer follows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class Unexportable(nn.Module):
    """A forward that always raises, so that every exporter fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("forward refuses to run")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` in ONNX Runtime on the CPU."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_export_is_checked_self_contained_and_matches_torch():
    module, x = ConvBn().eval(), torch.randn(2, 3, 8, 8)
    model = export(module, x, input_names=["image"], output_names=["features"])
    onnx.checker.check_model(model)
    assert model.ir_version <= MAX_IR_VERSION
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18)}
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["features"]
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(model, {"image": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_is_left_for_kiln_to_fold():
    model = export(ConvBn().eval(), (torch.randn(1, 3, 8, 8),))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops and "Conv" in ops and "Dropout" not in ops


def test_export_runs_in_eval_mode_and_restores_the_training_flag():
    module = ConvBn().train()
    x = torch.randn(1, 3, 8, 8)
    model = export(module, (x,))
    assert module.training and module.bn.training
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    np.testing.assert_allclose(_run(model, {model.graph.input[0].name: x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_dimension():
    module = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    model = export(module, torch.randn(2, 6), input_names=["x"],
                   dynamic_shapes={"input": {0: torch.export.Dim("N")}})
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 5):
        x = torch.randn(batch, 6)
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(_run(model, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-6)


def test_opsets_below_18_are_refused():
    with pytest.raises(ValueError, match="opset 18"):
        export(nn.ReLU(), torch.randn(2), opset=17)


def test_export_is_quiet(capfd, monkeypatch):
    monkeypatch.delenv("KILN_DEBUG", raising=False)
    export(nn.Linear(3, 2), torch.randn(1, 3))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_dynamo_failure_falls_back_to_torchscript_with_a_warning():
    x = torch.ones(2, 3)
    with pytest.warns(ExportFallbackWarning, match="DataDependentBranch") as record:
        model = export(DataDependentBranch(), x, input_names=["x"])
    assert "dynamo" in str(record[0].message) and "data-dependent" in str(record[0].message)
    assert model.ir_version <= MAX_IR_VERSION
    np.testing.assert_allclose(_run(model, {"x": x.numpy()})[0], (x * 2).numpy())


def test_export_error_names_the_module_class_and_both_failures():
    with pytest.raises(ExportError) as info:
        export(Unexportable(), torch.ones(2))
    message = str(info.value)
    assert "Unexportable" in message and "forward refuses to run" in message
    assert "dynamo" in message and "TorchScript" in message
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is not None
