"""TVM bugs the fuzzer found (fuzz/FINDINGS.md): their saved reproducers still show them.

When one of these fails, TVM has fixed the bug: drop the workaround named in FINDINGS.md.
"""

from pathlib import Path

import pytest

from kiln.fuzz.findings import replay

TVM_FINDINGS = Path(__file__).parents[2] / "fuzz" / "tvm-findings"


@pytest.mark.slow
def test_known_tvm_crash_still_reproduces():
    (r,) = replay([TVM_FINDINGS / "narrow-datatype-sblock-segv"], timeout_s=60)
    assert r.reproduces, r.got
    assert (r.got["symptom"], r.got["stage"], r.got["pass_name"]) == ("crash", "tir-pipeline",
                                                                      "pre:tirx.NarrowDataType")
