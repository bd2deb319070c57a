"""TVM lowerings of the ops in ir/ops/transformer.py."""

from __future__ import annotations
