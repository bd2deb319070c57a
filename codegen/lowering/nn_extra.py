"""TVM lowerings of the ops in ir/ops/nn_extra.py."""

from __future__ import annotations
