"""TVM lowerings of the ops in ir/ops/signal.py."""

from __future__ import annotations
