"""TVM lowerings of the ops in ir/ops/math.py."""

from __future__ import annotations
