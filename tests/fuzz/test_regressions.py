"""Every finding the fuzzer made that was fixed stays fixed: its saved folder replays clean."""

from pathlib import Path

import pytest

from kiln.fuzz.findings import replay

FOLDERS = sorted(d for d in (Path(__file__).parent / "regressions").iterdir() if (d / "finding.json").exists())


@pytest.mark.parametrize("folder", FOLDERS, ids=[d.name for d in FOLDERS])
def test_fixed_finding_stays_fixed(folder):
    (r,) = replay([folder], in_process=True)
    assert not r.reproduces, r.got
    assert r.got["status"] == "ok", r.got
