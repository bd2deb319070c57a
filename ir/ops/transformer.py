"""Op family 'transformer' (see the module docstrings of ir/ops for the conventions)."""

from __future__ import annotations
