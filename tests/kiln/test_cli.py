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


def test_opt_writes_onnx_that_onnx_runtime_runs_with_the_same_outputs(tmp_path, capsys):
    import onnxruntime as ort

    path = _tiny_model(tmp_path / "tiny.onnx")
    out = tmp_path / "opt.onnx"
    assert main(["opt", str(path), "--passes", "canonicalize,dce", "-o", str(out), "--dump-ir",
                 str(tmp_path / "dump"), "--check-each-pass"]) == 0
    text = capsys.readouterr().out
    assert "canonicalize" in text and "max rel err" in text and f"wrote {out}" in text
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == ["000_input.ir", "001_canonicalize.ir",
                                                                   "002_dce.ir"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_opt_writes_ir_text_and_checks_given_inputs(tmp_path, capsys):
    from kiln import ir

    path = _tiny_model(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((2, 4), np.float32))
    assert main(["opt", str(path), "-o", str(tmp_path / "g.ir"), "--inputs", str(tmp_path / "in.npz")]) == 0
    assert ir.verify(ir.parse((tmp_path / "g.ir").read_text())).op_counts() == {"mul": 1, "relu": 1}
    np.savez(tmp_path / "bad.npz", y=np.ones((2, 4), np.float32))
    capsys.readouterr()
    assert main(["opt", str(path), "--inputs", str(tmp_path / "bad.npz")]) == 1
    assert "no array for graph inputs ['x']" in capsys.readouterr().err


def test_opt_explain_prints_each_refusal_with_its_reason(capsys):
    assert main(["opt", "resnet", "--params-as-inputs", "--passes", "fold-conv-bn,dce", "--explain"]) == 0
    out = capsys.readouterr().out
    refused = [line for line in out.splitlines() if line.startswith("refused fold-conv-bn")]
    assert len(refused) == 9  # the zoo ResNet's nine BNs: weights are inputs, deploy cannot fold them
    assert all("mode=tune" in line for line in refused)
    assert main(["opt", "resnet", "--passes", "fold-conv-bn,dce", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.count("rewrote fold-conv-bn") == 9 and "batch_norm-9" in out


def test_passes_lists_every_registered_pass_with_its_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("canonicalize", "dce", "fold-conv-bn", "fold-ln-affine", "ln-to-rmsnorm", "ln-to-crmsnorm"):
        assert name in out
    assert "mode=deploy" in out and "default pipeline: fuse-qlinear,canonicalize,fold-conv-bn,hoist-views,sink-views,dce,fuse-blocks" in out
