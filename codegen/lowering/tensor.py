"""TVM lowerings of the ops in ir/ops/tensor.py."""

from __future__ import annotations

from tvm import te, topi  # noqa: F401

from . import LowerCtx, lowers  # noqa: F401
