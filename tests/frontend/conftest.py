"""Helpers for the frontend tests: build small ONNX models and run them with ONNX Runtime."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def vi(name: str, dtype: np.dtype | type, shape: Sequence[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], inits: Mapping[str, np.ndarray] | None = None, *,
               opset: int = 13, name: str = "test", extra_opsets: Mapping[str, int] | None = None,
               ir_version: int = 8) -> onnx.ModelProto:
    """A model at ``opset`` with an ir_version that onnxruntime 1.31 reads."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs),
                              [numpy_helper.from_array(np.asarray(a), k) for k, a in (inits or {}).items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def ort_run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def assert_close(got: np.ndarray, want: np.ndarray, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Same dtype and shape, values within tolerance."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol)


def light_input(model: onnx.ModelProto) -> tuple[str, np.ndarray]:
    """The input the onnx backend test runner feeds a light model: arange(n).reshape(shape) / n as float32.

    The light models ship only ``<name>_output_0.pb``; onnx's runner
    (``onnx/backend/test/runner/__init__.py``, ``generate_dummy_data(random=False)``)
    makes the input this way (a dim without a value counts as 1), and the
    stored outputs were computed from it.
    """
    inits = {t.name for t in model.graph.initializer}
    (x,) = [i for i in model.graph.input if i.name not in inits]
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return x.name, (np.arange(n).reshape(shape) / n).astype(np.float32)
