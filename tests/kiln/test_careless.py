"""Issue 15, the CLI and compile side: careless use (outputs over inputs, bad paths, nonsense flags, bad data
files, Ctrl-C, markup in names) ends in one clean line and the right exit code, before any work is lost."""

from __future__ import annotations

import os
import signal
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.cli import main
from kiln.compiler import CompileError


def _model(path, *, dims=("N", 4), name="tiny"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32))
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["m"], name="mul0"),
                           helper.make_node("Relu", ["m"], ["y"], name="relu0")], name, [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, path)
    return str(path)


def _no_compile(monkeypatch):
    """Make kiln.compile fail the test if it is reached: the refusal must come before any work."""
    def reached(*a, **k):
        raise AssertionError("kiln.compile ran: the refusal came too late")

    monkeypatch.setattr(kiln, "compile", reached)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- item 4: outputs over inputs


def test_compile_output_that_is_the_input_model_is_refused(tmp_path, capsys, monkeypatch):
    src = _model(tmp_path / "X.onnx")
    before = open(src, "rb").read()
    _no_compile(monkeypatch)
    assert main(["compile", src, "-o", src]) == 1
    assert "is the input" in _err(capsys)
    assert open(src, "rb").read() == before


def test_output_through_a_symlink_or_hard_link_to_the_input_is_refused(tmp_path, capsys, monkeypatch):
    src = _model(tmp_path / "X.onnx")
    os.symlink(src, tmp_path / "link.kiln")
    os.link(src, tmp_path / "hard.kiln")
    _no_compile(monkeypatch)
    for out in ("link.kiln", "hard.kiln"):
        assert main(["compile", src, "-o", str(tmp_path / out)]) == 1
        assert "is the input" in _err(capsys)


def test_run_out_that_is_the_artifact_is_refused_before_loading(tmp_path, capsys):
    art = tmp_path / "a.kiln"
    art.write_bytes(b"stands for an artifact: refused before it is even read")
    assert main(["run", str(art), "--out", str(art)]) == 1
    assert "--out" in _err(capsys)
    assert art.read_bytes().startswith(b"stands for")


def test_opt_and_quantize_refuse_to_overwrite_their_inputs(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    before = open(src, "rb").read()
    assert main(["opt", src, "-o", src]) == 1
    assert "is the input" in _err(capsys)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.ones((2, 3, 4), np.float32))
    assert main(["quantize", src, "--calib", str(calib), "-o", str(calib)]) == 1
    assert "is the input" in _err(capsys)
    assert main(["quantize", src, "--calib", str(calib), "-o", str(tmp_path / "q.onnx"),
                 "--report", str(tmp_path / "q.onnx")]) == 1
    assert "another output" in _err(capsys)
    assert open(src, "rb").read() == before and np.load(calib)["x"].shape == (2, 3, 4)


# ---------------------------------------------------------------- item 13: bad -o found before compiling


@pytest.mark.parametrize("out, why", [("missing/x.kiln", "does not exist"), ("", "is a folder"),
                                      ("/proc/x.kiln", "cannot write in folder /proc")])
def test_bad_output_path_is_found_before_compiling(tmp_path, capsys, monkeypatch, out, why):
    src = _model(tmp_path / "m.onnx")
    _no_compile(monkeypatch)
    path = out if out.startswith("/") else str(tmp_path / out)
    assert main(["compile", src, "-o", path]) == 1
    err = _err(capsys)
    assert why in err and path.rstrip("/") in err and ".tmp" not in err


@pytest.mark.parametrize("target, says", [
    ("c", "target kind 'c'"), ("cuda", "target kind 'cuda'"),
    ("llvm -mtriple=aarch64-linux-gnu", "is for aarch64"),
    ("llvm -num-cores=0", "-num-cores=0 must be a positive integer"),
])
def test_targets_this_runtime_cannot_load_are_one_clean_line(tmp_path, capsys, target, says):
    src = _model(tmp_path / "m.onnx")
    out = tmp_path / "m.kiln"
    assert main(["compile", src, "-o", str(out), "--target", target]) == 1
    err = _err(capsys)
    assert says in err and err.count("error:") == 1
    assert "g++" not in err and "ld:" not in err
    assert not out.exists()


def test_ten_to_the_twelve_elements_is_a_clean_compile_error(tmp_path):
    src = _model(tmp_path / "big.onnx", dims=(250_000_000_000, 4))
    with pytest.raises(CompileError, match=r"1,000,000,000,000 elements; TVM indexes tensors with 32-bit"):
        kiln.compile(src)


# ---------------------------------------------------------------- item 10: the constant limit flag


def _constant_of_shape(path, dims):
    shape = helper.make_tensor("s", TensorProto.INT64, [len(dims)], dims)
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    g = helper.make_graph([helper.make_node("ConstantOfShape", ["s"], ["c"], value=fill),
                           helper.make_node("Add", ["x", "c"], ["y"])], "cos",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, path)
    return str(path)


def test_max_constant_mb_refuses_the_161_byte_model_that_made_64_mb(tmp_path, capsys):
    src = _constant_of_shape(tmp_path / "cos.onnx", [4096, 4096])
    assert os.path.getsize(src) < 200
    out = tmp_path / "cos.kiln"
    assert main(["compile", src, "-o", str(out), "--max-constant-mb", "16"]) == 1
    err = _err(capsys)
    assert "constant_bytes=16 MiB" in err and "--max-constant-mb" in err and not out.exists()
    assert main(["inspect", src, "--max-constant-mb", "16"]) == 1
    assert "--max-constant-mb" in _err(capsys)
    assert main(["opt", src, "--max-constant-mb", "16"]) == 1
    with pytest.raises(SystemExit) as e:
        main(["compile", src, "--max-constant-mb", "0"])
    assert e.value.code == 2


def test_constant_of_shape_of_10e12_elements_is_a_limit_error_at_compile(tmp_path, capsys):
    src = _constant_of_shape(tmp_path / "cos.onnx", [1_000_000, 1_000_000])
    assert main(["compile", src, "-o", str(tmp_path / "cos.kiln")]) == 1
    assert "constant_bytes=1 GiB" in _err(capsys)


def test_codegen_checks_constants_before_materializing_them(monkeypatch):
    """A broadcast view (ConstantOfShape) costs nothing until codegen makes it a weight: the limit is checked
    there too, before np.require allocates it."""
    from kiln import ir
    from kiln.codegen.build import build_graph
    from kiln.codegen.target import host_target
    from kiln.runtime.errors import LimitError
    from kiln.runtime.limits import Limits

    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("f32", (64, 64)))
    c = g.add_constant(np.broadcast_to(np.float32(1), (64, 64)), "c")
    g.set_outputs([g.add_node("add", [x, c], {}, out_types=[ir.TensorType("f32", (64, 64))]).outputs[0]])
    with pytest.raises(LimitError, match=r"weight 'c'.*constant_bytes=1 KiB"):
        build_graph(g, host_target(), limits=Limits(constant_bytes=1024))


# ---------------------------------------------------------------- items 14, 15: nonsense flags and files


@pytest.mark.parametrize("argv", [
    ["compile", "M", "--shape", "=3"], ["compile", "M", "--shape", "N"], ["compile", "M", "--shape", "N=0"],
    ["compile", "M", "--shape", "N=-1"], ["run", "a.kiln", "--repeat", "-5"], ["run", "a.kiln", "--repeat", "0"],
])
def test_nonsense_flag_values_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[2] in err and argv[3] in err


def test_shape_for_a_symbol_the_model_lacks_names_its_symbols(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    assert main(["compile", src, "-o", str(tmp_path / "m.kiln"), "--shape", "M=3"]) == 1
    err = _err(capsys)
    assert "'M' is not a symbolic dim" in err and "['N']" in err and not (tmp_path / "m.kiln").exists()


def test_shape_on_a_static_model_is_refused(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx", dims=(2, 4))
    assert main(["compile", src, "-o", str(tmp_path / "m.kiln"), "--shape", "N=3"]) == 1
    assert "has no symbolic dims" in _err(capsys)


@pytest.mark.parametrize("content", [b"garbage, not numpy at all", np.lib.format.MAGIC_PREFIX + b"\x01\x00xx"])
def test_garbage_inputs_file_names_the_file_not_allow_pickle(tmp_path, capsys, content):
    src = _model(tmp_path / "m.onnx")
    bad = tmp_path / "inputs.npz"
    bad.write_bytes(content)
    assert main(["opt", src, "--inputs", str(bad)]) == 1
    err = _err(capsys)
    assert "--inputs" in err and "inputs.npz" in err and "allow_pickle" not in err


# ---------------------------------------------------------------- item 8: calibration data


def _calib_model(tmp_path):
    return _model(tmp_path / "m.onnx", dims=(2, 4))


@pytest.mark.parametrize("make, says", [
    (lambda p: np.savez(p, x=np.full((4, 2, 4), np.nan, np.float32)), "32 non-finite values"),
    (lambda p: np.savez(p, x=np.ones((4, 2, 4))), "expected dtype float32, got float64"),
    (lambda p: p.write_bytes(b"not a zip"), "is not an .npz file"),
    (lambda p: zipfile.ZipFile(p, "w").close() or p.write_bytes(p.read_bytes()[:10]), "calib.npz"),
])
def test_bad_calibration_data_is_refused_naming_the_file(tmp_path, capsys, make, says):
    src = _calib_model(tmp_path)
    calib = tmp_path / "calib.npz"
    make(calib)
    out = tmp_path / "q.onnx"
    assert main(["quantize", src, "--calib", str(calib), "-o", str(out)]) == 1
    err = _err(capsys)
    assert says in err and "BadZipFile" not in err
    assert not out.exists()
    assert main(["compile", src, "--calib", str(calib), "-o", str(tmp_path / "q.kiln")]) == 1
    assert says in _err(capsys) and not (tmp_path / "q.kiln").exists()


# ---------------------------------------------------------------- item 9: no user text is markup


def test_error_message_with_markup_closing_tag_prints_as_is(tmp_path, capsys):
    path = str(tmp_path / "a[/]b[/red].onnx")
    assert main(["inspect", path]) == 1
    err = _err(capsys)
    assert "a[/]b[/red].onnx" in err and "MarkupError" not in err


def test_inspect_shows_bracketed_dims_and_file_names(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "seq_len"])
    y = helper.make_tensor_value_info("[bold]y", TensorProto.FLOAT, ["batch_size", "seq_len"])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["[bold]y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    path = tmp_path / "[red]x.onnx"
    onnx.save(m, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[red]x.onnx" in out
    assert "f32[batch_size,seq_len]" in out
    assert "[bold]y" in out


def test_inspect_ir_does_not_pass_terminal_escapes_through(tmp_path, capsys):
    """model.ir of a (signed, trusted) artifact is printed with its control characters shown, not sent."""
    art = kiln.compile("mlp")
    art.ir_text += "# \x1b]0;retitled\x07\x1b[2J\x9b31m end\n"
    path = art.save(tmp_path / "esc.kiln")
    assert main(["inspect", str(path), "--ir"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "# \\x1b]0;retitled\\x07\\x1b[2J\\x9b31m end" in out and "graph @" in out


# ---------------------------------------------------------------- exit codes: 130 for Ctrl-C, bugs say so


def _raising_compile(monkeypatch, fn):
    monkeypatch.setattr(kiln, "compile", fn)


def test_keyboard_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    _raising_compile(monkeypatch, interrupted)
    assert main(["compile", _model(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.kiln")]) == 130
    assert "interrupted" in _err(capsys)


def test_interrupt_wrapped_by_tvm_exits_130_not_runtime_error(tmp_path, capsys, monkeypatch):
    """The original case: Ctrl-C during codegen printed ``error: RuntimeError:`` and exited 1."""
    import tvm

    def build(*a, **k):
        raise tvm.error.InternalError("Traceback (most recent call last):\n  KeyboardInterrupt")

    monkeypatch.setattr(tvm.relax, "build", build)
    out = tmp_path / "m.kiln"
    assert main(["compile", _model(tmp_path / "m.onnx"), "-o", str(out)]) == 130
    err = _err(capsys)
    assert "interrupted" in err and "RuntimeError" not in err and "error:" not in err
    assert not out.exists()


def test_sigint_swallowed_by_a_library_still_exits_130(tmp_path, capsys, monkeypatch, default_sigint):
    def swallowing(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass
        raise RuntimeError("the library's own error after the interrupt")

    _raising_compile(monkeypatch, swallowing)
    assert main(["compile", _model(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.kiln")]) == 130
    assert "interrupted" in _err(capsys)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_unexpected_exception_is_one_line_that_says_it_is_a_bug(tmp_path, capsys, monkeypatch):
    def buggy(*a, **k):
        raise TypeError("unsupported operand type(s) for +: 'int' and '[/]str'")

    _raising_compile(monkeypatch, buggy)
    assert main(["compile", _model(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.kiln")]) == 1
    err = _err(capsys).strip()
    assert "kiln bug" in err and "--debug" in err and "TypeError" in err and "'[/]str'" in err
    assert len(err.splitlines()) == 1


def test_kiln_compile_turns_tvm_errors_into_compile_errors(tmp_path, monkeypatch):
    import tvm

    def build(*a, **k):
        raise tvm.error.InternalError("Check failed: something deep in TVM\n" + "  T.buffer(...)\n" * 50)

    monkeypatch.setattr(tvm.relax, "build", build)
    src = _model(tmp_path / "m.onnx")
    with pytest.raises(CompileError) as e:
        kiln.compile(src)
    assert src in str(e.value) and "Check failed" in str(e.value) and "T.buffer" not in str(e.value)
