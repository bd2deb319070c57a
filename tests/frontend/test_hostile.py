"""Issue 15, the frontend side: careless or hostile models, calibration files and Ctrl-C during the torch
export end in a kiln error (or a KeyboardInterrupt), never in a foreign exception or a huge allocation."""

from __future__ import annotations

import io
import os
import signal
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.frontend.errors import FrontendError
from kiln.frontend.lift import _Lifter, lift
from kiln.passes.calibrate import CalibrationError, check_sample, load_calibration, read_npz
from kiln.runtime.errors import LimitError
from kiln.runtime.limits import Limits


def _model(nodes, inputs, outputs, inits=(), name="m") -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _constant_of_shape(dims) -> onnx.ModelProto:
    """x + ConstantOfShape(dims): the 161-byte model of issue 15 item 10 with ``dims`` [4096, 4096]."""
    shape = helper.make_tensor("s", TensorProto.INT64, [len(dims)], dims)
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    return _model([helper.make_node("ConstantOfShape", ["s"], ["c"], value=fill),
                   helper.make_node("Add", ["x", "c"], ["y"])], [_vi("x", [1])], [_vi("y", None)], [shape])


# ---------------------------------------------------------------- item 10: constants materialized at lift


def test_constant_of_shape_of_10e12_elements_is_refused_before_allocating():
    with pytest.raises(LimitError) as e:
        lift(_constant_of_shape([1_000_000, 1_000_000]))
    msg = str(e.value)
    assert "constant_bytes" in msg and "--max-constant-mb" in msg and "[1000000, 1000000]" in msg


def test_constant_limit_is_a_parameter_of_lift():
    model = _constant_of_shape([4096, 4096])  # 64 MiB: under the default limit
    lift(model)
    with pytest.raises(LimitError, match=r"64 MiB, over the limit constant_bytes=16 MiB"):
        lift(model, limits=Limits(constant_bytes=16 << 20))


def test_range_folding_checks_its_length_before_allocating():
    ins = [helper.make_tensor(n, TensorProto.INT64, [], [v]) for n, v in
           (("start", 0), ("limit", 10**12), ("delta", 1))]
    m = _model([helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
                helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)], [], [_vi("y", None)], ins)
    with pytest.raises(LimitError, match="constant_bytes"):
        lift(m)


def test_sparse_constant_checks_its_dense_size_before_allocating():
    values = helper.make_tensor("vals", TensorProto.FLOAT, [1], [1.0])
    idx = helper.make_tensor("idx", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(values, idx, [1_000_000, 1_000_000])
    m = _model([helper.make_node("Constant", [], ["c"], sparse_value=sparse),
                helper.make_node("Add", ["x", "c"], ["y"])], [_vi("x", [1])], [_vi("y", None)])
    with pytest.raises(LimitError, match="sparse constant"):
        lift(m)


# ---------------------------------------------------------------- items 12, 13: kiln errors only, early


def test_negative_dim_is_refused_at_lift():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [-3, 4])], [_vi("y", None)])
    with pytest.raises(FrontendError, match=r"graph input 'x' declares dim 0 as -3"):
        lift(m)


@pytest.mark.parametrize("raised", [onnx.checker.ValidationError("bad model"), RecursionError("deep"),
                                    MemoryError(), KeyError("oops")])
def test_lift_raises_only_kiln_errors(monkeypatch, tmp_path, raised):
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])]), path)

    def boom(self, gp):
        raise raised

    monkeypatch.setattr(_Lifter, "_ordered_nodes", boom)
    with pytest.raises(FrontendError) as e:
        lift(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, kiln.Error)


def test_unreadable_model_file_is_a_frontend_error(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything
        pytest.skip("needs a non-root user: root reads a file whose read permission is removed")
    with pytest.raises(FrontendError, match="cannot read"):
        lift(path)


# ---------------------------------------------------------------- item 7: Ctrl-C during the torch export


def _torch_case():
    torch = pytest.importorskip("torch", reason="needs torch (the dynamo exporter) installed")
    from kiln.frontend import torch_export

    return torch, torch_export, torch.nn.Linear(3, 2), (torch.randn(1, 3),)


def test_interrupt_swallowed_by_the_dynamo_exporter_is_not_a_fallback(monkeypatch):
    """The dynamo exporter turns Ctrl-C into an AttributeError: export must re-raise KeyboardInterrupt and never
    run the TorchScript fallback (the original case compiled on and exited 0)."""
    torch, te, module, args = _torch_case()
    fallback = []

    def dynamo(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("'NoneType' object has no attribute 'graph'") from None

    monkeypatch.setattr(te, "_export_dynamo", dynamo)
    monkeypatch.setattr(te, "_export_torchscript", lambda *a, **k: fallback.append(1))
    with pytest.raises(KeyboardInterrupt):
        te.export(module, args)
    assert not fallback


def test_real_sigint_during_the_dynamo_export_propagates(monkeypatch, default_sigint):
    torch, te, module, args = _torch_case()
    fallback = []

    def dynamo(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python runs the handler between bytecodes, right after the kill
                pass
        except KeyboardInterrupt:
            pass  # swallowed, as torch's exporter does
        raise AttributeError("export failed")

    monkeypatch.setattr(te, "_export_dynamo", dynamo)
    monkeypatch.setattr(te, "_export_torchscript", lambda *a, **k: fallback.append(1))
    with pytest.raises(KeyboardInterrupt):
        te.export(module, args)
    assert not fallback
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_real_dynamo_failure_still_falls_back(monkeypatch):
    torch, te, module, args = _torch_case()
    tiny = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])

    def dynamo(*a, **k):
        raise AttributeError("dynamo cannot trace this")

    monkeypatch.setattr(te, "_export_dynamo", dynamo)
    monkeypatch.setattr(te, "_export_torchscript", lambda *a, **k: tiny)
    with pytest.warns(te.ExportFallbackWarning):
        assert te.export(module, args) is tiny


# ---------------------------------------------------------------- items 8, 14: calibration and input files


def test_all_nan_calibration_file_names_the_file_array_and_count(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.full((4, 2, 3), np.nan, np.float32))
    with pytest.raises(CalibrationError) as e:
        load_calibration(path)
    msg = str(e.value)
    assert "calib.npz" in msg and "'x'" in msg and "24 non-finite values" in msg


def test_one_inf_in_a_calibration_directory_is_refused(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3), np.float32))
    bad = np.zeros((2, 3), np.float32)
    bad[1, 2] = np.inf
    np.savez(tmp_path / "b.npz", x=bad)
    with pytest.raises(CalibrationError, match=r"b\.npz.*1 non-finite"):
        load_calibration(tmp_path)


def test_float64_calibration_for_a_float32_input_is_refused():
    from kiln import ir

    g = ir.parse("graph @g(%x: f32[2,3]) -> (%y) {\n  %y = relu(%x) : f32[2,3]\n}\n")
    with pytest.raises(CalibrationError, match=r"expected dtype float32, got float64.*astype"):
        check_sample(g, {"x": np.zeros((2, 3))}, "s0")
    assert check_sample(g, {"x": np.zeros((2, 3), np.float32)}, "s0")["x"].dtype == np.float32


@pytest.mark.parametrize("content, why", [
    (b"this is not a zip", "not an .npz file"),
    (b"", "it is empty"),
    (b"PK\x03\x04garbage after a zip magic", "not a readable .npz file"),
])
def test_non_zip_calibration_file_names_the_file(tmp_path, content, why):
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    with pytest.raises(CalibrationError) as e:
        load_calibration(path)
    assert "calib.npz" in str(e.value) and why in str(e.value)
    assert "BadZipFile" not in str(e.value) and "allow_pickle" not in str(e.value)


def test_npz_header_claiming_10e12_elements_is_refused_before_reading(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (1_000_000, 1_000_000)})
    buf.write(b"\0" * 16)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue())
    with pytest.raises(LimitError, match="tensor_bytes"):
        read_npz(path, "--inputs")
    with pytest.raises(CalibrationError, match="claims"):
        read_npz(path, "--inputs", Limits(tensor_bytes=1 << 50))


def test_npz_of_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationError, match="Python objects"):
        read_npz(path, "--inputs")
