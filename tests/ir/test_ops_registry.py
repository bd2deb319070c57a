"""Meta-tests over the whole op registry: every op is documented, classified, spelled and tested."""

from __future__ import annotations

import inspect
import re

import pytest

from kiln import ir
from kiln.ir import FusionKind
from kiln.ir.registry import REQUIRED, check_attr

from . import (
    test_ops_crms_norm,
    test_ops_dtypes,
    test_ops_elementwise,
    test_ops_image,
    test_ops_index,
    test_ops_math,
    test_ops_nn,
    test_ops_nn_extra,
    test_ops_quant,
    test_ops_recurrent,
    test_ops_reduce,
    test_ops_signal,
    test_ops_tensor,
    test_ops_transformer,
)

MODULES = [test_ops_elementwise, test_ops_nn, test_ops_tensor, test_ops_reduce, test_ops_quant, test_ops_crms_norm,
           test_ops_math, test_ops_index, test_ops_image, test_ops_nn_extra, test_ops_transformer,
           test_ops_recurrent, test_ops_signal, test_ops_dtypes]
OPS = ir.all_ops()
NO_ONNX = {"silu": "decompose", "crms_norm": "decompose", "qmatmul": "decompose", "qconv": "decompose",
           "dq_matmul": "decompose", "range": "folded to a constant by the lifter", "arange": "decompose"}


def test_every_registered_op_is_exercised_by_a_test_file():
    covered = set().union(*(m.COVERED for m in MODULES))
    assert sorted(set(OPS) - covered) == [], "registered ops no test exercises"
    assert sorted(covered - set(OPS)) == [], "tests claim ops that are not registered"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_claimed_ops_appear_in_their_test_module(module):
    # COVERED must not be a bare list: each op's name is used as a literal (or in a list of names) there
    src = re.split(r"COVERED(?::[^=\n]*)? =", inspect.getsource(module), maxsplit=1)
    body = src[0] + src[1].split("\n\n", 1)[1]
    missing = [name for name in module.COVERED if f'"{name}"' not in body]
    assert not missing, f"{module.__name__} claims {missing} but never names them outside COVERED"


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_definition_is_complete(name):
    opdef = OPS[name]
    assert opdef.doc.strip(), f"{name} has no docstring"
    assert isinstance(opdef.fusion, FusionKind)
    if opdef.onnx is None:
        assert name in NO_ONNX, f"{name} has no ONNX spelling and is not listed as lowered otherwise"
        if NO_ONNX[name] == "decompose":
            assert opdef.decompose is not None
    else:
        spec = opdef.onnx
        assert spec.op_type[:1].isupper()
        for idx, attr in spec.attr_inputs.items():
            assert idx >= 1 and attr in opdef.attrs, f"{name}: ONNX input {idx} maps to unknown attr {attr}"
        for attr in list(spec.attr_dtypes) + list(spec.attr_names):
            assert attr in opdef.attrs
    for key, a in opdef.attrs.items():  # defaults satisfy their own schema
        if a.default is not REQUIRED and a.default is not None:
            assert check_attr(a.kind, a.default) == a.default, f"{name}.{key}"


EXPECTED_FUSION = {
    "add": "broadcast", "exp": "elementwise", "cast": "elementwise",
    "reshape": "injective", "transpose": "injective", "slice": "injective", "concat": "injective",
    "gather": "injective", "pad": "injective", "expand": "injective", "tile": "injective", "squeeze": "injective",
    "unsqueeze": "injective", "flatten": "injective", "split": "injective", "trilu": "injective",
    "quantize": "injective", "dequantize": "injective", "qmatmul": "out-elementwise-fusable",
    "qconv": "out-elementwise-fusable", "dq_matmul": "out-elementwise-fusable",
    "reduce_mean": "reduction", "reduce_sum": "reduction", "softmax": "reduction", "layer_norm": "reduction",
    "rms_norm": "reduction", "crms_norm": "reduction", "argmax": "reduction", "global_avg_pool": "reduction", "cumsum": "reduction",
    "conv": "out-elementwise-fusable", "conv_transpose": "out-elementwise-fusable",
    "matmul": "out-elementwise-fusable", "max_pool": "out-elementwise-fusable", "avg_pool": "out-elementwise-fusable",
    "shape": "opaque",
}


@pytest.mark.parametrize("name,kind", sorted(EXPECTED_FUSION.items()))
def test_fusion_kinds(name, kind):
    assert OPS[name].fusion.value == kind


def test_catalogue_names_and_attributes():
    # the frontend lifts ONNX against exactly these operand and attribute names
    want = {
        "conv": (("x", "w", "b?"), {"strides", "pads", "dilations", "group"}),
        "conv_transpose": (("x", "w", "b?"), {"strides", "pads", "dilations", "group", "output_padding"}),
        "max_pool": (("x",), {"kernel_shape", "strides", "pads", "dilations", "ceil_mode"}),
        "avg_pool": (("x",), {"kernel_shape", "strides", "pads", "ceil_mode", "count_include_pad", "dilations"}),
        "batch_norm": (("x", "scale", "bias", "mean", "var"), {"epsilon"}),
        "layer_norm": (("x", "scale", "bias?"), {"axis", "epsilon"}),
        "rms_norm": (("x", "scale"), {"axis", "epsilon"}),
        "instance_norm": (("x", "scale", "bias"), {"epsilon"}),
        "lrn": (("x",), {"size", "alpha", "beta", "bias"}),
        "reshape": (("x",), {"shape", "allowzero"}),
        "split": (("x",), {"axis", "split"}),
        "slice": (("x",), {"starts", "ends", "axes", "steps"}),
        "pad": (("x",), {"pads", "mode", "value"}),
        "shape": (("x",), {"start", "end"}),
        "range": ((), {"start", "limit", "delta", "dtype"}),
        "argmax": (("x",), {"axis", "keepdims", "select_last_index"}),
        "cumsum": (("x",), {"axis", "exclusive", "reverse"}),
        "reduce_mean": (("x",), {"axes", "keepdims"}),
        "quantize": (("x", "scale", "zero_point?"), {"axis", "block_size", "dtype", "saturate"}),
        "dequantize": (("x", "scale", "zero_point?"), {"axis", "block_size"}),
    }
    for name, (inputs, attrs) in want.items():
        assert OPS[name].inputs == inputs, name
        assert set(OPS[name].attrs) == attrs, name
    assert OPS["split"].outputs == ("ys*",)
    assert OPS["concat"].inputs == ("xs*",)


# ---------------------------------------------------------------- every stage knows every op

def test_every_op_has_a_tvm_lowering():
    import kiln.codegen.lowering  # noqa: F401  (attaches the lowerings)

    missing = sorted(n for n, d in ir.all_ops().items() if d.lower_tvm is None)
    assert missing == [], f"ops without a TVM lowering (codegen/lowering/<family>.py): {missing}"


def test_every_op_has_a_fuzz_builder():
    from kiln.fuzz.generate import OP_BUILDERS, REACHED_OTHERWISE

    missing = sorted(n for n in ir.all_ops() if n not in OP_BUILDERS and n not in REACHED_OTHERWISE)
    assert missing == [], f"ops the fuzzer cannot generate (fuzz/build_<family>.py): {missing}"
    assert not set(REACHED_OTHERWISE) - set(ir.all_ops())


def test_registry_groups_replace_like_for_like():
    """Ops of one ``group`` take the same operands: each must build on the others' operands."""
    from kiln.fuzz.generate import ops_in_group

    groups = {d.group.split("/")[0] for d in ir.all_ops().values() if d.group}
    for g in groups:
        members = ops_in_group(g)
        assert members, f"group {g!r} has only source ops"
        arity = {len(ir.get_op(m).inputs) for m in members}
        assert len(arity) == 1 or g in ("norm", "conv", "binary-arith"), (g, members, arity)


def test_view_ops_are_shape_only():
    views = sorted(n for n, d in ir.all_ops().items() if d.view)
    assert views == ["flatten", "identity", "reshape", "squeeze", "unsqueeze"]
    assert all(ir.get_op(n).fusion != FusionKind.OPAQUE for n in views)
