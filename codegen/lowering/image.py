"""TVM lowerings of the ops in ir/ops/image.py."""

from __future__ import annotations
