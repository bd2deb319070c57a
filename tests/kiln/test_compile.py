"""kiln.compile end to end: every zoo model and light ONNX model compiled, loaded and checked
against the reference interpreter (tolerances: kiln.codegen.tolerance), plus the API's model forms."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln import ir, zoo
from kiln.cli import main
from kiln.codegen.tolerance import MODEL_F32, Tolerance, assert_close
from kiln.compiler import CompileError
from kiln.frontend import lift

LIGHT = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512")


def _zoo_feeds(name):
    _, example = zoo.get(name)
    return {n: t.numpy() for n, t in zip(zoo.input_names(name), example)}


# the default pipeline (block fusion on) and the same without fuse-blocks (anchor + epilogue kernels)
PIPELINES = {"fusion-on": None, "fusion-off": "canonicalize,fold-conv-bn,dce"}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_compiles_and_matches_the_interpreter(name, pipeline, tmp_path):
    art = kiln.compile(name, passes=PIPELINES[pipeline])
    assert not art.stats["notes"], art.stats["notes"]
    sess = kiln.load(art.save(tmp_path / f"{name}.kiln"))
    feeds = _zoo_feeds(name)
    expected = ir.interpret(lift(zoo.onnx_model(name)), feeds)
    got = sess.run(feeds)
    assert list(got) == list(expected)
    for k in expected:
        assert_close(got[k], expected[k], MODEL_F32, what=f"{name}:{k}")


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name", LIGHT)
def test_light_model_compiles_and_matches_the_interpreter(name, pipeline):
    """With random weights (the stored ones make every output the same number)."""
    from kiln.bench import _light_case, light_models

    proto, feeds = _light_case(light_models()[name])
    art = kiln.compile(proto, feeds, passes=PIPELINES[pipeline])
    assert not art.stats["notes"], art.stats["notes"]
    got = art.load().run(feeds)
    expected = ir.interpret(lift(proto), feeds)
    for k in expected:
        assert np.unique(expected[k]).size > 100  # an input- and weight-dependent output
        scale = float(np.abs(expected[k]).max())
        assert_close(got[k], expected[k], Tolerance(MODEL_F32.rtol, MODEL_F32.atol * scale), what=f"{name}:{k}")


def _tiny_onnx():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32) - 1.5)
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                          "tiny", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def test_onnx_proto_and_path_compile_with_symbols_bound_by_example_inputs(tmp_path):
    proto = _tiny_onnx()
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    want = np.maximum(x * (np.arange(4, dtype=np.float32) - 1.5), 0)
    art = kiln.compile(proto, {"x": x})
    assert art.manifest["symbols"] == {"N": 3}
    assert art.manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert art.manifest["pipeline"] == "fuse-qlinear,canonicalize,fold-conv-bn,hoist-views,sink-views,dce,fuse-blocks"
    np.testing.assert_array_equal(art.load().run({"x": x})["y"], want)
    path = tmp_path / "tiny.onnx"
    onnx.save(proto, path)
    with pytest.warns(UserWarning, match=r"symbolic dims \['N'\] have no value"):
        art = kiln.compile(str(path))
    assert art.manifest["symbols"] == {"N": 1}
    np.testing.assert_array_equal(art.load().run({"x": x[:1]})["y"], want[:1])


def test_torch_module_compiles():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(2, 8)
    art = kiln.compile(model, (x,))
    (got,) = art.load().run({art.manifest["inputs"][0]["name"]: x.numpy()}).values()
    with torch.no_grad():
        assert_close(got, model(x).numpy(), MODEL_F32)


def test_compile_errors_name_the_problem():
    with pytest.raises(CompileError, match="no such file, and not a zoo model"):
        kiln.compile("no_such_model.onnx")
    with pytest.raises(CompileError, match="needs example_inputs"):
        kiln.compile(torch.nn.ReLU())
    from kiln.passes.manager import PipelineError

    with pytest.raises(PipelineError, match="unknown pass 'nope'"):
        kiln.compile(_tiny_onnx(), passes="canonicalize,nope")


def test_cli_compile_then_run(tmp_path, capsys):
    model = tmp_path / "tiny.onnx"
    onnx.save(_tiny_onnx(), model)
    art = tmp_path / "tiny.kiln"
    assert main(["compile", str(model), "-o", str(art), "--shape", "N=2"]) == 0
    out = capsys.readouterr().out
    assert "kernels generated" in out and "artifact size" in out and "compile time" in out
    x = np.array([[1, 2, 3, 4], [-1, -2, -3, -4]], np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert main(["run", str(art), "--inputs", str(tmp_path / "x.npz"), "--out", str(tmp_path / "y.npz"),
                 "--repeat", "5"]) == 0
    out = capsys.readouterr().out
    assert "[2, 4]" in out and "latency over 5 runs: median" in out
    with np.load(tmp_path / "y.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["y"], np.maximum(x * (np.arange(4, dtype=np.float32) - 1.5), 0))


def test_cli_run_refuses_a_damaged_artifact_and_wrong_inputs(tmp_path, capsys):
    art = kiln.compile(_tiny_onnx(), shapes={"N": 2})
    path = art.save(tmp_path / "tiny.kiln")
    data = open(path, "rb").read()
    (tmp_path / "cut.kiln").write_bytes(data[: len(data) // 2])
    assert main(["run", str(tmp_path / "cut.kiln")]) != 0
    err = capsys.readouterr().err
    assert "cut.kiln" in err and "Traceback" not in err
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 4), np.float32))
    assert main(["run", str(path), "--inputs", str(tmp_path / "bad.npz")]) != 0
    err = capsys.readouterr().err
    assert "input 'x'" in err and "N=2" in err and "Traceback" not in err
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 4), np.float64), z=np.zeros(1))
    assert main(["run", str(path), "--inputs", str(tmp_path / "wrong.npz")]) != 0
    assert "unexpected inputs ['z']" in capsys.readouterr().err


def test_cli_compile_bad_shape_and_unknown_model(tmp_path, capsys):
    assert main(["compile", "nope"]) != 0
    assert "not a zoo model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compile", "mlp", "--shape", "N"])
    assert e.value.code == 2 and "expected SYMBOL=N" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_writes_ratios_as_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "mlp", "--no-tvm", "--repeat", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["zoo"]
    assert row["model"] == "mlp" and not row["errors"]
    for key in ("kiln_ms", "ort_ms", "torch_ms", "kiln_over_ort", "kiln_over_torch"):
        assert row[key] > 0
    assert row["rel_err_vs_ort"] < 1e-4
    assert os.path.getsize(out) > 0


def test_bench_fusion_times_fusion_off_on_and_ort_together(tmp_path):
    out = tmp_path / "fusion.json"
    assert main(["bench", "--fusion", "mlp", "--repeat", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["fusion"]
    assert [r["variant"] for r in rows] == ["fusion off", "fusion on", "ONNX Runtime"]
    assert all(r["ms"] > 0 and "error" not in r for r in rows)
    assert rows[0]["kernels"] == rows[1]["kernels"] == 3  # matmul+add(+relu) three times: nothing more to fuse
    assert rows[1]["rel_err_vs_first"] == 0.0 and rows[2]["rel_err_vs_first"] < 1e-5


def test_outputs_that_alias_inputs_or_weights_are_copies():
    """Outputs are handed out without a copy, except views of an input or weight: writing to
    those must change neither the caller's input nor the next run's weights."""
    g = ir.parse("""graph @g(%x: f32[2,4]) -> (%x, %c, %r, %y) {
      %c = const f32[4] [1.0, 2.0, 3.0, 4.0]
      %r = reshape(%x) {shape=[8]} : f32[8]
      %y = add(%x, %c) : f32[2,4]
    }""")
    art = kiln.compile(g)
    assert [o["aliases"] for o in art.manifest["outputs"]] == [True, True, True, False]
    sess = art.load()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    first = sess.run({"x": x})
    for out in first.values():
        out[...] = -7.0
    np.testing.assert_array_equal(x, np.arange(8, dtype=np.float32).reshape(2, 4))
    again = sess.run({"x": x})
    np.testing.assert_array_equal(again["c"], [1, 2, 3, 4])
    np.testing.assert_array_equal(again["y"], x + [1, 2, 3, 4])


def test_params_as_inputs_compiles_weights_as_named_inputs_that_can_be_swapped(tmp_path):
    feeds = _zoo_feeds("mlp")
    art = kiln.compile("mlp", params_as_inputs=True)
    names = art.manifest["params"]
    assert names == list(art.params) and len(names) == 6
    assert [s["name"] for s in art.manifest["inputs"]] == ["x", *names]
    assert not art.weights  # nothing left baked in
    sess = art.load()
    graph = lift(zoo.onnx_model("mlp"), params_as_inputs=True)
    ref_graph = lift(zoo.onnx_model("mlp"))
    out = sess.run({**feeds, **art.params})
    assert_close(out["logits"], ir.interpret(ref_graph, feeds)["logits"], MODEL_F32)
    rng = np.random.default_rng(0)
    swapped = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in art.params.items()}
    want = ir.interpret(graph, {**feeds, **swapped})["logits"]
    assert_close(sess.run({**feeds, **swapped})["logits"], want, MODEL_F32)
    assert not np.allclose(want, out["logits"])


def test_cli_compile_params_as_inputs_writes_the_initial_weights_beside_the_artifact(tmp_path, capsys):
    art = tmp_path / "m.kiln"
    assert main(["compile", "mlp", "-o", str(art), "--params-as-inputs"]) == 0
    assert "weights are inputs (6)" in capsys.readouterr().out
    params = tmp_path / "m.params.npz"
    with np.load(params, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(kiln.compile("mlp", params_as_inputs=True).params)
    np.savez(tmp_path / "x.npz", x=_zoo_feeds("mlp")["x"])
    assert main(["run", str(art), "--inputs", str(tmp_path / "x.npz"), "--params", str(params),
                 "--out", str(tmp_path / "y.npz")]) == 0
    with np.load(tmp_path / "y.npz", allow_pickle=False) as z:
        want = ir.interpret(lift(zoo.onnx_model("mlp")), _zoo_feeds("mlp"))["logits"]
        assert_close(z["logits"], want, MODEL_F32)


@pytest.mark.slow
def test_tune_mode_conv_bn_compiles_with_weights_as_inputs_and_matches_eval_mode():
    feeds = _zoo_feeds("resnet")
    art = kiln.compile("resnet", params_as_inputs=True, passes="canonicalize,fold-conv-bn{mode=tune},dce")
    assert "batch_norm" not in art.ir_text and "conv" in art.ir_text
    assert any(n.startswith("stem.1.") for n in art.manifest["params"])  # BN parameters are inputs too
    want = ir.interpret(lift(zoo.onnx_model("resnet")), feeds)["logits"]
    sess = art.load()
    assert_close(sess.run({**feeds, **art.params})["logits"], want, MODEL_F32)
    # new BN statistics at run time: the folded weights follow them
    graph = lift(zoo.onnx_model("resnet"), params_as_inputs=True)
    params = dict(art.params)
    params["stem.1.running_var"] = params["stem.1.running_var"] * 4.0
    assert_close(sess.run({**feeds, **params})["logits"], ir.interpret(graph, {**feeds, **params})["logits"],
                 MODEL_F32)


def test_cli_inspect_artifact_lists_kernels_with_their_ops(tmp_path, capsys):
    art = tmp_path / "m.kiln"
    assert main(["compile", "mlp", "-o", str(art), "--params-as-inputs"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(art), "--ir"]) == 0
    out = capsys.readouterr().out
    manifest = kiln.load(str(art)).manifest
    assert f"kernels ({len(manifest['kernels'])})" in out
    for k in manifest["kernels"]:
        assert k["name"] in out and " ".join(k["ops"]) in out
    assert "weight input" in out and "pipeline: fuse-qlinear,canonicalize,fold-conv-bn,hoist-views,sink-views,dce" in out
    assert "graph @" in out  # --ir prints the artifact's IR, with its fused blocks
    assert 'block("b0")' in out and 'block("b0")' in kiln.load(str(art)).ir_text


# ---------------------------------------------------------------- operands computed from graph inputs

def _axes_model() -> onnx.ModelProto:
    """y = ReduceSum(x, axes) * 1 + Clip(z, lo, hi): axes decides a shape; lo/hi are run-time values."""
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
             helper.make_node("Clip", ["z", "lo", "hi"], ["c"]),
             helper.make_node("Add", ["s", "c"], ["y"])]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "axes", [helper.make_tensor_value_info("x", f32, [2, 3, 4]),
                        helper.make_tensor_value_info("axes", TensorProto.INT64, [2]),
                        helper.make_tensor_value_info("z", f32, [3]),
                        helper.make_tensor_value_info("lo", f32, []),
                        helper.make_tensor_value_info("hi", f32, [])],
        [helper.make_tensor_value_info("y", f32, [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.slow
def test_inputs_deciding_shapes_are_specialized_from_the_examples(tmp_path):
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "axes": np.array([0, 2], np.int64),
             "z": np.array([-2.0, 0.5, 3.0], np.float32), "lo": np.array(-1.0, np.float32),
             "hi": np.array(1.0, np.float32)}
    art = kiln.compile(_axes_model(), example_inputs=feeds)
    assert [s["name"] for s in art.manifest["inputs"]] == ["x", "z", "lo", "hi"]
    assert art.manifest["specialized"] == [{"name": "axes", "dtype": "int64", "shape": [2], "value": [0, 2]}]
    sess = kiln.load(art.save(tmp_path / "m.kiln"))
    want = feeds["x"].sum(axis=(0, 2)) + np.clip(feeds["z"], -1.0, 1.0)
    for given in (feeds, {k: v for k, v in feeds.items() if k != "axes"}):
        np.testing.assert_allclose(sess.run(given)["y"], want, rtol=1e-5, atol=1e-5)
    tight = sess.run({**feeds, "lo": np.array(0.0, np.float32), "hi": np.array(0.25, np.float32)})["y"]
    np.testing.assert_allclose(tight, feeds["x"].sum(axis=(0, 2)) + np.array([0.0, 0.25, 0.25]), rtol=1e-5)
    with pytest.raises(kiln.runtime.InputError, match=r"input 'axes' was specialized to \[0, 2\] at compile "
                                                      r"time; got \[1\]; recompile with that value"):
        sess.run({**feeds, "axes": np.array([1], np.int64)})


def test_an_input_deciding_a_shape_without_an_example_is_refused_by_name():
    from kiln.frontend import DynamicShapeError

    with pytest.raises(DynamicShapeError, match=r"graph input\(s\) 'axes' decides a compile-time operand"):
        kiln.compile(_axes_model())
