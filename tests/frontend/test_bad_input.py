"""Bad input gets a clear error: every case checks the message, not just the exception type."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from kiln import ir
from kiln.frontend import (
    DanglingInputError,
    DynamicShapeError,
    FrontendError,
    InvalidModelError,
    OpsetError,
    UnsupportedOpsError,
    lift,
)

from .conftest import make_model, vi

F32 = np.float32


def _relu_model(**kw):
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                      [vi("x", F32, [2, 3])], [vi("y", F32, [2, 3])], **kw)


def test_not_onnx_bytes():
    with pytest.raises(InvalidModelError) as e:
        lift(b"this is certainly not an ONNX model \x00\xff")
    assert str(e.value).startswith("the given bytes is not a valid ONNX model: Error parsing message")


def test_not_onnx_file_names_the_path(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("ir_version: 7\nthis is a text file\n")
    with pytest.raises(InvalidModelError) as e:
        lift(path)
    assert str(e.value).startswith(f"{path} is not a valid ONNX model: ")
    assert isinstance(e.value, FrontendError) and isinstance(e.value, ValueError)


def test_truncated_file(tmp_path):
    data = _relu_model().SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError) as e:
        lift(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a valid ONNX model: ")
    assert "truncated" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="empty.onnx is not a valid ONNX model: the file is empty"):
        lift(path)


def test_missing_file(tmp_path):
    with pytest.raises(FrontendError, match="nope.onnx: no such file"):
        lift(tmp_path / "nope.onnx")


def test_unsupported_ops_are_all_listed_at_once():
    nodes = [
        helper.make_node("TfIdfVectorizer", ["ix"], ["t"], name="tfidf_1", mode="TF", min_gram_length=1,
                         max_gram_length=1, max_skip_count=0, ngram_counts=[0], ngram_indexes=[0], pool_int64s=[1]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel1"], name="nms_a"),
        helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel2"], name="nms_b"),
        helper.make_node("Relu", ["t"], ["r"], name="relu_after_tfidf"),
        helper.make_node("FusedMatMul", ["x", "x"], ["f"], name="ort_fused", domain="com.microsoft"),
        helper.make_node("Softmx", ["x"], ["sm"], name="typo", domain="my.ops"),
    ]
    model = make_model(nodes, [vi("ix", np.int64, [4]), vi("x", F32, [3, 3]), vi("boxes", F32, [1, 4, 4]),
                               vi("scores", F32, [1, 1, 4])],
                       [vi("r", F32, None), vi("sel1", np.int64, None), vi("sel2", np.int64, None),
                        vi("f", F32, None), vi("sm", F32, None)],
                       extra_opsets={"com.microsoft": 1, "my.ops": 1})
    with pytest.raises(UnsupportedOpsError) as e:
        lift(model)
    msg = str(e.value)
    assert msg.startswith("model 'test' cannot be lifted: 5 node(s) use ops or features kiln does not support")
    assert "TfIdfVectorizer (domain ai.onnx, opset 13): 1 node(s): 'tfidf_1'" in msg
    assert "NonMaxSuppression (domain ai.onnx, opset 13) - " in msg and "'nms_a', 'nms_b'" in msg
    assert "depends on" in msg or "data" in msg  # NMS says why: its row count depends on the data
    assert "FusedMatMul (domain com.microsoft, opset 1) - not supported; nearest supported op: MatMul" in msg
    assert "Softmx (domain my.ops, opset 1) - not supported; nearest supported op: Softmax" in msg
    assert "re-export the model with a newer opset" not in msg  # the model is at opset 13 already: no help
    assert "kiln implements these standard ops at no opset" in msg
    assert "file an issue" in msg
    assert "Custom-domain ops are not standard ONNX" in msg
    assert e.value.op_types == ["FusedMatMul", "NonMaxSuppression", "Softmx", "TfIdfVectorizer"]


def test_custom_domain_op():
    node = helper.make_node("MyGelu", ["x"], ["y"], name="custom_gelu", domain="com.example")
    model = make_model([node], [vi("x", F32, [4])], [vi("y", F32, [4])], extra_opsets={"com.example": 3})
    with pytest.raises(UnsupportedOpsError) as e:
        lift(model)
    msg = str(e.value)
    assert "MyGelu (domain com.example, opset 3) - not supported; nearest supported op: Gelu: 1 node(s): 'custom_gelu'" in msg
    assert "Custom-domain ops are not standard ONNX" in msg
    assert "re-export the model with a newer opset" not in msg


@pytest.mark.parametrize("opset", [1, 6])
def test_opset_too_old(opset, caplog):
    """Below opset 7 the model is converted by onnx.version_converter, and the log says so."""
    with caplog.at_level("WARNING", logger="kiln.frontend"):
        g = lift(_relu_model(opset=opset, ir_version=3))
    assert [n.op for n in g.nodes] == ["relu"]
    assert f"uses ONNX opset {opset}; converted to opset 7 with onnx.version_converter" in caplog.text


def test_opset_the_converter_cannot_convert():
    node = helper.make_node("Upsample", ["x"], ["y"], name="up", scales=[1.0, 2.0])  # Upsample-1 has no adapter
    model = make_model([node], [vi("x", F32, [2, 2])], [vi("y", F32, None)], opset=1, ir_version=3)
    with pytest.raises(OpsetError, match="onnx.version_converter cannot convert it to opset 7"):
        lift(model)


def test_opset_too_new():
    newest = onnx.defs.onnx_opset_version()
    assert [n.op for n in lift(_relu_model(opset=newest, ir_version=11)).nodes] == ["relu"]
    with pytest.raises(OpsetError, match=f"opset {newest + 1}, which is newer than kiln supports"):
        lift(_relu_model(opset=newest + 1, ir_version=11))


def test_op_at_a_changed_version_is_refused_per_op():
    """Each op is checked against the version kiln implements; an op changed after it is refused by name."""
    from kiln.frontend.lift import version_gap

    assert version_gap("Relu", onnx.defs.onnx_opset_version()) is None  # unchanged since opset 14
    assert version_gap("Reshape", 25) is None  # only widened its types after 23
    assert version_gap("SpaceToDepth", 28) is None or "SpaceToDepth changed in opset 28" in version_gap(
        "SpaceToDepth", 28)


def test_dangling_input():
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add_ghost")]
    model = make_model(nodes, [vi("x", F32, [2])], [vi("y", F32, [2])])
    with pytest.raises(DanglingInputError) as e:
        lift(model)
    assert str(e.value) == ("model 'test': node add_ghost reads 'ghost', which no node, initializer or graph "
                            "input defines (dangling input)")
    assert (e.value.node, e.value.value) == ("add_ghost", "ghost")


def test_undefined_graph_output():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", F32, [2])],
                       [vi("y", F32, [2]), vi("z", F32, [2])])
    with pytest.raises(InvalidModelError, match="graph output 'z' is not defined by any node, initializer or "
                                                "graph input"):
        lift(model)


def test_value_defined_twice():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="first"), helper.make_node("Neg", ["x"], ["y"], name="second")]
    model = make_model(nodes, [vi("x", F32, [2])], [vi("y", F32, [2])])
    with pytest.raises(InvalidModelError, match="value 'y' is defined twice \\(by node first and by node second\\)"):
        lift(model)


def test_cycle():
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")]
    model = make_model(nodes, [vi("x", F32, [2])], [vi("a", F32, [2])])
    with pytest.raises(InvalidModelError, match="the graph has a cycle"):
        lift(model)


def test_reshape_to_a_runtime_shape_is_a_dynamic_shape_error():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape_dyn")]
    model = make_model(nodes, [vi("x", F32, [2, 3]), vi("s", np.int64, [2])], [vi("y", F32, None)])
    with pytest.raises(DynamicShapeError) as e:
        lift(model)
    msg = str(e.value)
    assert ("Reshape (domain ai.onnx, opset 13) - input 1 (shape) is computed at run time (graph input 's'); "
            "kiln needs it constant: 1 node(s): 'reshape_dyn'") in msg
    assert "input_shapes=" in msg


def test_training_mode_batch_norm_uses_batch_statistics():
    c = np.ones(3, F32)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=1)
    model = make_model([node], [vi("x", F32, [1, 3, 2, 2])], [vi("y", F32, [1, 3, 2, 2])],
                       {"s": c, "b": c, "m": c, "v": c}, opset=15)
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(F32)
    y = ir.interpret(lift(model), {"x": x})["y"]
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) + 1, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_mode_is_refused():
    node = helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop")
    model = make_model([node], [vi("x", F32, [4])], [vi("y", F32, [4])],
                       {"ratio": np.array(0.5, F32), "train": np.array(True)})
    with pytest.raises(UnsupportedOpsError, match="Dropout .* - training_mode is true"):
        lift(model)


def test_used_max_pool_indices_are_computed():
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    model = make_model([node], [vi("x", F32, [1, 1, 4, 4])],
                       [vi("y", F32, [1, 1, 2, 2]), vi("idx", np.int64, [1, 1, 2, 2])])
    x = np.arange(16, dtype=F32).reshape(1, 1, 4, 4)
    out = ir.interpret(lift(model), {"x": x})
    assert out["idx"].ravel().tolist() == [5, 7, 13, 15]


def test_used_layer_norm_statistics_are_computed():
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln")
    model = make_model([node], [vi("x", F32, [2, 4])], [vi("y", F32, [2, 4]), vi("mean", F32, None)],
                       {"g": np.ones(4, F32)}, opset=17)
    x = np.arange(8, dtype=F32).reshape(2, 4)
    np.testing.assert_allclose(ir.interpret(lift(model), {"x": x})["mean"].ravel(), [1.5, 5.5])


def test_unsupported_attribute_value():
    c = np.ones(3, F32)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", spatial=0)
    model = make_model([node], [vi("x", F32, [1, 3, 2, 2])], [vi("y", F32, [1, 3, 2, 2])],
                       {"s": c, "b": c, "m": c, "v": c}, opset=8)
    with pytest.raises(UnsupportedOpsError, match="BatchNormalization .* - spatial=0 \\(per-activation statistics\\) "
                                                  "is not supported: 1 node\\(s\\): 'bn'"):
        lift(model)


def test_string_input():
    model = make_model([helper.make_node("Identity", ["s"], ["t"], name="id")],
                       [helper.make_tensor_value_info("s", 8, [2])],
                       [helper.make_tensor_value_info("t", 8, [2])])
    with pytest.raises(FrontendError, match="graph input 's': ONNX element type STRING is not supported by kiln"):
        lift(model)


def test_input_shapes_must_name_inputs_and_fit_them():
    model = _relu_model()
    with pytest.raises(FrontendError, match="input_shapes names \\['nope'\\], which are not graph inputs"):
        lift(model, input_shapes={"nope": [1]})
    with pytest.raises(FrontendError, match="input_shapes\\['x'\\] = \\[2\\] has rank 1, but the model declares "
                                            "rank 2"):
        lift(model, input_shapes={"x": [2]})
    with pytest.raises(FrontendError, match="dim 1 is 4 but the model declares 3"):
        lift(model, input_shapes={"x": [2, 4]})


def test_lift_rejects_other_types():
    with pytest.raises(TypeError, match="lift\\(\\) takes an onnx.ModelProto, a path or bytes, not int"):
        lift(42)


def test_dropout_mask_before_opset_10_is_refused():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop")]
    model = make_model(nodes, [vi("x", F32, [4])], [vi("y", F32, [4]), vi("mask", F32, [4])], opset=7)
    with pytest.raises(UnsupportedOpsError, match="Dropout .* - its mask output is used; before opset 10"):
        lift(model)


def test_batch_norm_training_outputs_are_refused():
    c = np.ones(3, F32)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "run_mean", "run_var"],
                            name="bn_train")
    model = make_model([node], [vi("x", F32, [1, 3, 2, 2])],
                       [vi("y", F32, [1, 3, 2, 2]), vi("run_mean", F32, [3]), vi("run_var", F32, [3])],
                       {"s": c, "b": c, "m": c, "v": c}, opset=9)
    with pytest.raises(UnsupportedOpsError, match="its output 1 \\(running or saved mean/var of training mode\\) "
                                                  "is used.*'bn_train'"):
        lift(model)
