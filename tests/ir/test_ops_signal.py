"""Ops of family 'signal': kiln has none. DFT and STFT lift to transpose/reshape/gather and a matmul
with a constant DFT matrix, the windows and MelWeightMatrix to constants (frontend/lift_signal.py,
tested in tests/frontend/test_lift_signal.py)."""

from __future__ import annotations

COVERED: set[str] = set()  # every op of the family, each named again in a test below


def test_family_module_imports():
    import kiln.ir.ops.signal  # noqa: F401


def test_family_registers_no_ops():
    from kiln.ir.ops import signal
    from kiln.ir.registry import all_ops
    assert {n for n, d in all_ops().items() if d.reference.__module__ == signal.__name__} == COVERED
