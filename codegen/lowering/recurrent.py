"""TVM lowerings of the ops in ir/ops/recurrent.py."""

from __future__ import annotations
