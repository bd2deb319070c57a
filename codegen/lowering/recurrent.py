"""TVM lowerings of the ops in ir/ops/recurrent.py: none (the family lifts into existing ops)."""

from __future__ import annotations
