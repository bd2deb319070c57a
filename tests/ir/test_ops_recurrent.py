"""Ops of family 'recurrent': the family registers none (RNN/GRU/LSTM, If/Loop/Scan lift into
existing ops; see tests/frontend/test_lift_recurrent.py)."""

from __future__ import annotations

from kiln.ir.registry import all_ops

COVERED = set()  # every op of the family, each named again in a test below


def test_family_module_imports():
    import kiln.ir.ops.recurrent  # noqa: F401


def test_family_registers_no_op():
    """An op added to ir/ops/recurrent.py must be covered here (and lowered, and fuzzed)."""
    mine = {n for n, d in all_ops().items() if d.reference.__module__ == "kiln.ir.ops.recurrent"}
    assert mine == COVERED
