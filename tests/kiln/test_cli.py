"""The kiln command line: inspect on files and zoo names, one-line errors, --debug tracebacks."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.cli import main


def _tiny_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32))
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["m"], name="mul0"),
                           helper.make_node("Relu", ["m"], ["y"], name="relu0")], "tiny", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, path)
    return path


def test_inspect_onnx_file_prints_signature_and_op_counts(tmp_path, capsys):
    path = _tiny_model(tmp_path / "tiny.onnx")
    assert main(["inspect", str(path), "--ir"]) == 0
    out = capsys.readouterr().out
    assert "ai.onnx 18" in out
    assert "f32[N,4]" in out
    assert "relu" in out and "mul" in out
    assert "graph @tiny(%x: f32[N,4]) -> (%y) {" in out


def test_inspect_ir_file(tmp_path, capsys):
    p = tmp_path / "g.ir"
    p.write_text("graph @g(%x: f32[2]) -> (%y) {\n  %y = tanh(%x) : f32[2]\n}\n")
    assert main(["inspect", str(p)]) == 0
    assert "tanh" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_zoo_model(capsys):
    assert main(["inspect", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "matmul" in out and "input" in out


def test_bad_input_is_one_readable_line_and_nonzero(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all")
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "model.onnx" in err and "not a valid ONNX model" in err
    assert "Traceback" not in err


def test_unknown_model_name_lists_the_zoo(capsys):
    assert main(["inspect", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "neither a file nor a zoo model" in err and "gpt" in err


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run([sys.executable, "-m", "kiln", "--debug", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_package_maps_stage_folders_to_one_import_name():
    import pathlib

    import kiln
    import kiln.frontend
    import kiln.ir
    root = pathlib.Path(kiln.__file__).resolve().parent.parent
    assert pathlib.Path(kiln.ir.__file__).resolve().parent == root / "ir"
    assert pathlib.Path(kiln.frontend.__file__).resolve().parent == root / "frontend"
