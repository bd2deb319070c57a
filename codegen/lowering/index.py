"""TVM lowerings of the ops in ir/ops/index.py."""

from __future__ import annotations
