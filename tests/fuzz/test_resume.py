"""No lost work (issue 15, item 5) and no nonsense flags (item 15): campaigns save as they go, stop
cleanly on Ctrl-C / SIGTERM, resume from their folder, and refuse a bad --out or flag before fuzzing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kiln.cli
from kiln.fuzz import tir
from kiln.fuzz.campaign import FuzzOptions, resume_campaign, run_campaign
from kiln.fuzz.findings import FuzzError

PRODUCT_PASSES = ("canonicalize", "dce", "fold-conv-bn", "fuse-blocks", "fold-ln-affine", "ln-to-rmsnorm")


def _opts(out: Path, **kw) -> FuzzOptions:
    base = dict(level="graph", iterations=6, seed=2, jobs=0, stages=("passes",), reduce=False,
                pass_pool=PRODUCT_PASSES, out=str(out), save_every_s=0.2)
    return FuzzOptions(**{**base, **kw})


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _wait_for_tests(out: Path, n: int, proc: subprocess.Popen, limit_s: float = 90) -> int:
    """Poll state.json (written by the running campaign) until it counts ``n`` tests."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            done = json.loads((out / "state.json").read_text())["tests"]
        except (FileNotFoundError, ValueError, KeyError):
            done = 0
        if done >= n:
            return done
        time.sleep(0.3)
    raise AssertionError(f"the campaign did not save {n} tests within {limit_s} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_campaign_keeps_its_work_and_resumes(tmp_path: Path, sig: int, code: int) -> None:
    """The issue's case: Ctrl-C after some seconds of `kiln fuzz` used to keep nothing."""
    out = tmp_path / "camp"
    cmd = [sys.executable, "-m", "kiln", "fuzz", "--level", "tir", "--time", "10m", "--seed", "3", "--jobs", "1",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        saved = _wait_for_tests(out, 3, proc)  # saved while running, before any signal
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"kiln fuzz --resume {out}" in " ".join(stdout.split())
    report = _report(out)
    assert report["state"] == "interrupted" and report["tests"] >= saved
    state = json.loads((out / "state.json").read_text())
    assert state["tests"] == report["tests"] and state["corpus"]["tir"] == report["corpus"]["tir"]
    corpus = sorted((out / "corpus").glob("tir-*.json"))
    assert len(corpus) == report["corpus"]["tir"] > 0
    assert not [p for p in out.rglob("*.tmp")]
    if sig == signal.SIGTERM:
        return
    res = subprocess.run([sys.executable, "-m", "kiln", "fuzz", "--resume", str(out), "--iterations", "4",
                          "--jobs", "1"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    again = _report(out)
    assert again["state"] == "done" and again["resumed"] == 1 and again["refused_on_resume"] == {}
    assert again["tests"] == report["tests"] + 4
    assert again["coverage"]["total"] >= report["coverage"]["total"]
    assert len(list((out / "corpus").glob("tir-*.json"))) == again["corpus"]["tir"] >= len(corpus)


def test_campaign_saves_as_it_goes_and_resumes_with_the_rest_of_its_budget(tmp_path: Path) -> None:
    out = tmp_path / "camp"
    seen: list[int] = []

    def stop_after_3(status: dict) -> None:
        seen.append(status["tests"])
        if status["tests"] == 3:
            time.sleep(0.25)  # past save_every_s: the third test is saved by the running campaign
        if status["tests"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_campaign(_opts(out, iterations=10), progress=stop_after_3)
    report = _report(out)
    assert report["state"] == "interrupted" and report["tests"] == 4
    state = json.loads((out / "state.json").read_text())
    first_rng = state["rng"]
    corpus_before = len(list((out / "corpus").glob("graph-*.json")))
    assert corpus_before == report["corpus"]["graph"] > 0

    camp = resume_campaign(out)  # no new budget: the 6 tests left of 10
    assert camp.n == 4 and camp.opts.iterations == 10 and camp.rng.bit_generator.state == first_rng
    assert len(camp.corpus["graph"]) == corpus_before
    camp.run()
    camp.save(final=True)
    report = _report(out)
    assert report["state"] == "done" and report["tests"] == 10 and report["resumed"] == 1
    assert len(list((out / "corpus").glob("graph-*.json"))) == report["corpus"]["graph"] >= corpus_before
    assert report["timeline"][-1]["tests"] == 10

    more = resume_campaign(out, iterations=2)  # a new budget counts from the resume
    assert more.opts.iterations == 12 and more.opts.time_s is None


def test_resume_refuses_planted_corpus_entries_and_never_imports_plugins(tmp_path: Path) -> None:
    out = tmp_path / "camp"
    run_campaign(_opts(out, iterations=2))
    marker = tmp_path / "ran"
    evil = tir.dump_func(tvm_system(marker))
    (out / "corpus" / "tir-00000.json").write_text(json.dumps({"level": "tir", "added": 1, "case": {
        "func": evil, "passes": [], "seed": 0, "origin": "planted"}}))
    (out / "corpus" / "graph-99999.json").write_text("{broken")
    camp = resume_campaign(out, iterations=1)
    assert camp.refused == {"tir": 1, "graph": 1} and not camp.corpus["tir"]
    camp.run()
    assert not marker.exists()

    state = json.loads((out / "state.json").read_text())
    state["options"]["plugins"] = ["tests.fuzz.planted"]
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(FuzzError, match="--plugin tests.fuzz.planted"):
        resume_campaign(out)
    state["options"]["plugins"] = []
    state["findings"] = [{"key": ["a"], "id": "../../escape", "level": "graph", "outcome": {"status": "finding"},
                          "case": {"ir": "x", "passes": []}}]
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(FuzzError, match="finding 0"):
        resume_campaign(out)
    with pytest.raises(FuzzError, match="no state.json"):
        resume_campaign(tmp_path)


def tvm_system(marker: Path):
    import tvm

    return tvm.script.from_source(f'''# from tvm.script import tirx as T

@T.prim_func
def f(A: T.Buffer((4,), "int32")):
    A[0] = T.call_extern("int32", "system", "touch {marker}")
''')


def test_out_that_is_a_file_or_unwritable_fails_before_fuzzing(tmp_path: Path, capsys) -> None:
    """The issue's case: an --out that is a file failed only at the end."""
    afile = tmp_path / "report.txt"
    afile.write_text("keep me")
    t = time.monotonic()
    assert kiln.cli.main(["fuzz", "--level", "graph", "--iterations", "50", "--out", str(afile)]) == 1
    assert time.monotonic() - t < 5, "checked before seeding or fuzzing"
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "Traceback" not in err
    assert afile.read_text() == "keep me"
    with pytest.raises(FuzzError, match="cannot write there"):
        run_campaign(_opts(afile / "sub"))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(FuzzError, match="cannot write there"):
            run_campaign(_opts(ro))
    used = tmp_path / "used"
    run_campaign(_opts(used, iterations=1))
    with pytest.raises(FuzzError, match="--resume"):
        run_campaign(_opts(used, iterations=1))


@pytest.mark.parametrize("argv, flag", [
    (["--time", "-5"], "--time"), (["--time", "0"], "--time"), (["--time", "soon"], "--time"),
    (["--timeout", "0"], "--timeout"), (["--timeout", "-3"], "--timeout"), (["--timeout", "nan"], "--timeout"),
    (["--iterations", "-1"], "--iterations"), (["--iterations", "0"], "--iterations"),
    (["--jobs", "0"], "--jobs"), (["--jobs", "-2"], "--jobs"), (["--seed", "-1"], "--seed"),
])
def test_nonsense_fuzz_flags_are_usage_errors(argv: list[str], flag: str, capsys) -> None:
    """The issue's case: `kiln fuzz --time -5` and `--timeout 0` (every case a false hang) were accepted."""
    with pytest.raises(SystemExit) as e:
        kiln.cli.main(["fuzz", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '{argv[1]}': expected" in err


def test_resume_with_campaign_flags_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert kiln.cli.main(["fuzz", "--resume", str(tmp_path), "--seed", "4"]) == 2
    assert "--seed cannot be given with it" in capsys.readouterr().err
    assert kiln.cli.main(["fuzz", "--resume", str(tmp_path), "--replay", str(tmp_path)]) == 2


@pytest.mark.parametrize("kw, flag", [
    ({"time_s": -5.0, "iterations": None}, "--time"), ({"timeout_s": 0.0}, "--timeout"),
    ({"iterations": -1}, "--iterations"), ({"jobs": -1}, "--jobs"), ({"seed": -3}, "--seed"),
])
def test_options_refuse_nonsense_through_the_api_too(kw: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        FuzzOptions(**{"iterations": 1, **kw})
