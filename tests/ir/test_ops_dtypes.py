"""Ops of family 'dtypes': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

COVERED = set()  # every op of the family, each named again in a test below


def test_family_module_imports():
    import kiln.ir.ops.dtypes  # noqa: F401
