"""Op family 'dtypes': ops about element types (bitcast)."""

from __future__ import annotations
