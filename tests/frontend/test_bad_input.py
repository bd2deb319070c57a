"""Bad input gets a clear error: every case checks the message, not just the exception type."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

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
        helper.make_node("Hardmax", ["x"], ["h"], name="hardmax_1"),
        helper.make_node("Det", ["sq"], ["d1"], name="det_a"),
        helper.make_node("Det", ["sq"], ["d2"], name="det_b"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Einsum", ["r", "r"], ["e"], name="einsum_after_hardmax", equation="ij,ij->i"),
        helper.make_node("FusedMatMul", ["x", "x"], ["f"], name="ort_fused", domain="com.microsoft"),
    ]
    model = make_model(nodes, [vi("x", F32, [3, 3]), vi("sq", F32, [3, 3])],
                       [vi("e", F32, None), vi("d1", F32, None), vi("d2", F32, None), vi("f", F32, None)],
                       extra_opsets={"com.microsoft": 1})
    with pytest.raises(UnsupportedOpsError) as e:
        lift(model)
    msg = str(e.value)
    assert msg.startswith("model 'test' cannot be lifted: 5 node(s) use ops or features kiln does not support")
    assert "Hardmax (domain ai.onnx, opset 13): 1 node(s): 'hardmax_1'" in msg
    assert "Det (domain ai.onnx, opset 13): 2 node(s): 'det_a', 'det_b'" in msg
    assert "Einsum (domain ai.onnx, opset 13): 1 node(s): 'einsum_after_hardmax'" in msg  # downstream too
    assert "FusedMatMul (domain com.microsoft, opset 1): 1 node(s): 'ort_fused'" in msg
    assert "How to avoid: re-export the model with a newer opset" in msg
    assert "file an issue" in msg
    assert "Custom-domain ops are not standard ONNX" in msg
    assert e.value.op_types == ["Det", "Einsum", "FusedMatMul", "Hardmax"]


def test_custom_domain_op():
    node = helper.make_node("MyGelu", ["x"], ["y"], name="custom_gelu", domain="com.example")
    model = make_model([node], [vi("x", F32, [4])], [vi("y", F32, [4])], extra_opsets={"com.example": 3})
    with pytest.raises(UnsupportedOpsError) as e:
        lift(model)
    msg = str(e.value)
    assert "MyGelu (domain com.example, opset 3): 1 node(s): 'custom_gelu'" in msg
    assert "Custom-domain ops are not standard ONNX" in msg
    assert "re-export the model with a newer opset" not in msg


@pytest.mark.parametrize("opset", [1, 6])
def test_opset_too_old(opset):
    with pytest.raises(OpsetError) as e:
        lift(_relu_model(opset=opset, ir_version=3))
    msg = str(e.value)
    assert f"uses ONNX opset {opset}, which is older than kiln supports (opsets 7..23)" in msg
    assert "onnx.version_converter.convert_version" in msg


def test_opset_too_new():
    with pytest.raises(OpsetError, match="opset 24, which is newer than kiln supports .*opset_version=23"):
        lift(_relu_model(opset=24, ir_version=11))


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


def test_training_mode_batch_norm_is_refused():
    c = np.ones(3, F32)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=1)
    model = make_model([node], [vi("x", F32, [1, 3, 2, 2])], [vi("y", F32, [1, 3, 2, 2])],
                       {"s": c, "b": c, "m": c, "v": c}, opset=15)
    with pytest.raises(UnsupportedOpsError, match="BatchNormalization .* - training_mode=1; kiln lifts inference "
                                                  "graphs .*'bn'"):
        lift(model)


def test_dropout_in_training_mode_is_refused():
    node = helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop")
    model = make_model([node], [vi("x", F32, [4])], [vi("y", F32, [4])],
                       {"ratio": np.array(0.5, F32), "train": np.array(True)})
    with pytest.raises(UnsupportedOpsError, match="Dropout .* - training_mode is true"):
        lift(model)


def test_used_max_pool_indices_are_refused():
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2])
    model = make_model([node], [vi("x", F32, [1, 1, 4, 4])],
                       [vi("y", F32, [1, 1, 2, 2]), vi("idx", np.int64, [1, 1, 2, 2])])
    with pytest.raises(UnsupportedOpsError, match="MaxPool .* - its output 1 \\(Indices\\) is used, which kiln "
                                                  "cannot compute: 1 node\\(s\\): 'pool'"):
        lift(model)


def test_used_layer_norm_statistics_are_refused():
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln")
    model = make_model([node], [vi("x", F32, [2, 4])], [vi("y", F32, [2, 4]), vi("mean", F32, None)],
                       {"g": np.ones(4, F32)}, opset=17)
    with pytest.raises(UnsupportedOpsError, match="its output 1 \\(Mean / InvStdDev\\) is used"):
        lift(model)


def test_unsupported_attribute_value():
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[2], dilations=[2])
    model = make_model([node], [vi("x", F32, [1, 1, 8])], [vi("y", F32, None)], opset=19, ir_version=9)
    with pytest.raises(UnsupportedOpsError, match="AveragePool .* - dilations=\\[2\\] \\(kiln's avg_pool has no "
                                                  "dilation\\)"):
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
