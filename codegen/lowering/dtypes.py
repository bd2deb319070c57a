"""TVM lowerings of the ops in ir/ops/dtypes.py."""

from __future__ import annotations
