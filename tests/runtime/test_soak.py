"""Leaks and soak (issue 15 item 11 and the soak bar): libraries unloaded on close, bounded RSS, no stale temps.

The full soak (4 x 5,000 runs, 500 loads) is ``python scripts/soak.py``; this runs a small one.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kiln.runtime import ArtifactError, load, write_artifact
from kiln.runtime.artifact import remove_stale_temps, temp_path

REPO = Path(__file__).resolve().parents[2]


def _soak_module():
    spec = importlib.util.spec_from_file_location("kiln_soak", REPO / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


soak = _soak_module()


def test_close_unloads_the_library_and_later_runs_are_refused(artifacts):
    x = np.ones((2, 8), np.float32)
    sess = load(artifacts["static"].path)
    assert soak.library_mappings() > 0
    assert not list(Path(sess.path).parent.glob("kiln-lib-*"))
    sess.run({"x": x})
    sess.close()
    sess.close()
    assert sess.closed and soak.library_mappings() == 0
    with pytest.raises(ArtifactError, match="this Session was closed"):
        sess.run({"x": x})
    with load(artifacts["static"].path) as again:
        again.run({"x": x})
    assert soak.library_mappings() == 0
    dropped = load(artifacts["static"].path)
    dropped.run({"x": x})
    del dropped
    gc.collect()
    assert soak.library_mappings() == 0


def test_fifty_load_close_cycles_leave_no_mapping_and_bounded_rss(artifacts):
    """The issue's case: 200 loads left +21 MiB and 200 deleted .so files mapped. Now: none, flat RSS."""
    res = soak.soak_loads(artifacts["static"].path, loads=50, warmup=10)
    assert res["library_mappings_left"] == 0
    assert res["rss_growth_mib"] < 2.0, res


def test_one_session_four_threads_match_single_threaded(artifacts):
    with load(artifacts["symbolic"].path) as sess:
        res = soak.soak_runs(sess, threads=4, runs=200, warmup=20)
    assert res["errors"] == [] and res["mismatches"] == 0 and res["runs"] == 800
    assert res["rss_growth_mib"] < 5.0, res


def test_call_in_flight_keeps_the_library_until_it_returns(artifacts):
    """close() from another thread while runs are going: they finish or are refused cleanly, no crash."""
    import threading

    sess = load(artifacts["static"].path)
    x = np.ones((2, 8), np.float32)
    outcomes: list[str] = []

    def spin() -> None:
        for _ in range(2000):
            try:
                sess.run({"x": x})
            except ArtifactError:
                outcomes.append("closed")
                return
        outcomes.append("done")

    threads = [threading.Thread(target=spin) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    sess.close()
    for t in threads:
        t.join()
    assert len(outcomes) == 3 and set(outcomes) <= {"closed", "done"}
    gc.collect()
    assert soak.library_mappings() == 0


SAVE_AND_HANG = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from tests.runtime.conftest import W
from kiln.runtime import artifact
from kiln.runtime.artifact import write_artifact
import json
manifest = json.loads(sys.argv[3])
os.replace = lambda *a: (print("written", flush=True), time.sleep(600))
write_artifact(sys.argv[2], library=b"\\x7fELF" + os.urandom(1 << 20), weights={"w": W}, ir_text="ir", manifest=manifest)
"""


def test_save_killed_with_sigkill_leaves_a_temp_the_next_save_removes(artifacts, tmp_path):
    """The issue's case: kill -9 during save left a full-size hidden temp file. The next save removes it."""
    import json

    built = artifacts["static"]
    out = tmp_path / "model.kiln"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_AND_HANG, str(REPO), str(out), json.dumps(built.manifest)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "written"
        proc.kill()
    finally:
        proc.wait(timeout=60)
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(f".model.kiln.tmp-{proc.pid}-"), stale
    assert (tmp_path / stale[0]).stat().st_size > 1 << 20
    live = Path(temp_path(str(tmp_path / "other.kiln")))  # this process's own: alive, so kept
    live.write_bytes(b"in progress")
    write_artifact(tmp_path / "next.kiln", library=built.library, weights=built.weights, ir_text="ir",
                   manifest=built.manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["next.kiln", live.name])
    assert remove_stale_temps(tmp_path) == []
