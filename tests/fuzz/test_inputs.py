"""The malformed-input fuzz target (issue 15): short campaigns per kind find no foreign exception, crash
or hang; a planted foreign exception, crash and hang are reported as findings (the oracle can fail);
cases are a function of the seed; an interrupted campaign keeps its report; no code runs from data."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kiln.fuzz import inputs as fi
from kiln.fuzz.inputs import InputsOptions, SeedSet, make_case, prepare_seeds, run_inputs

pytestmark = pytest.mark.xdist_group("fuzz-inputs")  # one worker compiles the seed artifacts once

BAD = ("foreign", "crash", "hang", "wrong", "harness")


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind's seeds (two tiny compiled artifacts; no zoo export, which needs torch)."""
    return prepare_seeds(tmp_path_factory.mktemp("inputs-seeds"), zoo=())


def _describe(camp: fi.InputsCampaign) -> str:
    return json.dumps([{k: f[k] for k in ("kind", "outcome", "error", "site", "message", "mutation", "repro")}
                       for f in camp.report()["findings"]], indent=1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", fi.KINDS)
def test_short_campaign_per_kind_finds_nothing(kind: str, seed_dir: Path, tmp_path: Path) -> None:
    """100 mutants of one kind, each in a worker process: every one ends in a result or a kiln.Error."""
    opts = InputsOptions(kinds=(kind,), iterations=100, seed=11, out=str(tmp_path / "out"), timeout_s=60,
                         zoo=(), compile_fraction=0.02)
    camp = run_inputs(opts, seed_dir=seed_dir)
    stats = camp.report()["kinds"][kind]
    assert stats["cases"] == 100
    assert stats["ok"] + stats["error"] + sum(stats[o] for o in BAD) == 100
    assert {o: stats[o] for o in BAD} == dict.fromkeys(BAD, 0), _describe(camp)
    assert stats["error"] > 0  # the mutants do reach kiln's checks (a target that never fails is no test)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kinds"][kind]["cases"] == 100 and not report["interrupted"]


def _planted_value_error(*args: object, **kwargs: object) -> None:
    raise ValueError("planted: a foreign exception out of lift")


def test_planted_foreign_exception_is_a_finding_with_a_reproducer(seed_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lift_module = importlib.import_module("kiln.frontend.lift")  # kiln.frontend.lift is also the function
    monkeypatch.setattr(lift_module, "lift", _planted_value_error)
    out = tmp_path / "out"
    opts = InputsOptions(kinds=("onnx",), iterations=5, seed=3, out=str(out), jobs=0, zoo=())
    camp = run_inputs(opts, seed_dir=seed_dir)
    report = camp.report()
    assert report["kinds"]["onnx"]["foreign"] > 0
    assert report["kinds"]["onnx"]["foreign_by_type"] == {"builtins.ValueError": report["kinds"]["onnx"]["foreign"]}
    (f,) = report["findings"]
    assert (f["outcome"], f["error"], f["stage"]) == ("foreign", "ValueError", "lift")
    folder = Path(f["folder"])
    assert (folder / "input.onnx").stat().st_size > 0 or "bytes.empty" in f["mutation"]
    assert "planted: a foreign exception" in (folder / "traceback.txt").read_text()
    assert f["repro"].endswith(f"-m kiln.fuzz.inputs {folder}")
    again = fi.replay_finding(folder, isolated=False)
    assert (again["outcome"], again["error"]) == ("foreign", "ValueError")
    monkeypatch.undo()
    fixed = fi.replay_finding(folder, isolated=False)
    assert fixed["outcome"] in ("ok", "error")


def plant_crash_and_hang() -> None:
    """Worker plugin: onnx case 0 aborts the process, case 1 hangs, the rest raise KeyError."""
    def target(case: fi.Case, ctx: object, stage: object) -> str:
        stage("lift")  # type: ignore[operator]
        if case.index == 0:
            os.abort()
        if case.index == 1:
            time.sleep(60)
        raise KeyError("planted")

    fi.TARGETS["onnx"] = target


def test_planted_crash_and_hang_are_findings_and_the_worker_recovers(seed_dir: Path, tmp_path: Path) -> None:
    opts = InputsOptions(kinds=("onnx",), iterations=4, seed=0, out=str(tmp_path / "out"), timeout_s=3, zoo=(),
                         plugins=("tests.fuzz.test_inputs:plant_crash_and_hang",))
    camp = run_inputs(opts, seed_dir=seed_dir)
    stats = camp.report()["kinds"]["onnx"]
    assert (stats["crash"], stats["hang"], stats["foreign"]) == (1, 1, 2)
    found = {(f["outcome"], f["stage"]) for f in camp.report()["findings"]}
    assert ("crash", "lift") in found and ("hang", "lift") in found
    crash = next(f for f in camp.report()["findings"] if f["outcome"] == "crash")
    assert "SIGABRT" in crash["message"]


@pytest.mark.slow
def test_cases_are_a_function_of_seed_kind_and_index(seed_dir: Path) -> None:
    seeds = SeedSet.read(seed_dir)
    for kind in fi.KINDS:
        first = [make_case(kind, i, seeds, 5).digest for i in range(12)]
        assert [make_case(kind, i, seeds, 5).digest for i in range(12)] == first
        assert make_case(kind, 7, seeds, 5).digest == first[7]  # alone, out of order: the same case
        assert [make_case(kind, i, seeds, 6).digest for i in range(12)] != first


def test_same_seed_same_outcomes(seed_dir: Path) -> None:
    opts = InputsOptions(kinds=("onnx", "calib"), iterations=25, seed=9, jobs=0, zoo=())
    runs = [run_inputs(opts, seed_dir=seed_dir).digests for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]["onnx"]) == 25 and len({d[2] for d in runs[0]["onnx"]}) > 20


def test_an_interrupted_campaign_keeps_its_report_and_findings(seed_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def target(case: fi.Case, ctx: object, stage: object) -> str:
        stage("read")  # type: ignore[operator]
        calls.append(case.index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        raise TypeError("planted")

    monkeypatch.setitem(fi.TARGETS, "calib", target)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_inputs(InputsOptions(kinds=("calib",), iterations=50, jobs=0, out=str(out), zoo=()), seed_dir=seed_dir)
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and report["kinds"]["calib"]["cases"] == 3
    assert [f["error"] for f in report["findings"]] == ["TypeError"]
    assert (Path(report["findings"][0]["folder"]) / "case.json").exists()


def test_npy_headers_are_never_evaluated(seed_dir: Path, tmp_path: Path) -> None:
    """A header that is a Python expression, in a calibration file and in a run's --inputs file."""
    marker = tmp_path / "pwned"
    header = f"{{'descr': __import__('os').system('touch {marker}'), 'fortran_order': False, 'shape': (2,)}}"
    npy = fi._npy_build(header, bytes(8))
    blob = fi.zip_build([fi.Member("x.npy", npy)])
    ctx = fi._Ctx(seed_dir)
    try:
        for case in (fi.Case("calib", 0, "stacked", "planted", blob, {"layout": "file"}),
                     fi.Case("run", 0, "gemm", "planted", blob, {"via": "cli", "suffix": ".npz"}),
                     fi.Case("run", 0, "gemm", "planted", npy, {"via": "cli", "suffix": ".npy"})):
            res = fi.execute(case, ctx)
            assert res["outcome"] == "error", res
    finally:
        ctx.close()
    assert not marker.exists()


def test_run_layouts_that_keep_the_values_give_the_same_outputs(seed_dir: Path) -> None:
    """The ``wrong`` oracle: an input in another layout or byte order must run like the plain array."""
    ctx = fi._Ctx(seed_dir)
    try:
        for kind in sorted(fi._VALUE_PRESERVING):
            recipe = [{"op": "layout", "kind": kind, "pick": 0}]
            res = fi.execute(fi.Case("run", 0, "gemm", "planted", b"", {"via": "api", "recipe": recipe}), ctx)
            assert res["outcome"] in ("ok", "error"), (kind, res)
    finally:
        ctx.close()
    feeds = {"x": np.arange(16, dtype=np.float32).reshape(2, 8)}
    for kind in fi._VALUE_PRESERVING:
        got, same = fi.apply_recipe([{"op": "layout", "kind": kind, "pick": 0}], feeds)
        assert same and np.array_equal(np.asarray(got["x"]), feeds["x"]), kind


def test_a_layout_dependent_result_is_reported_wrong(seed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant a runtime that reads Fortran-ordered inputs wrongly: the ``wrong`` oracle must see it."""
    ctx = fi._Ctx(seed_dir)
    try:
        session = ctx.session("gemm")
        real = session.run

        def planted(inputs: dict) -> dict:
            out = real({k: np.ascontiguousarray(v) for k, v in inputs.items()})
            if all(np.asarray(v).flags.c_contiguous for v in inputs.values()):
                return out
            return {k: v + 1 for k, v in out.items()}

        monkeypatch.setattr(session, "run", planted)
        recipe = [{"op": "layout", "kind": "fortran", "pick": 0}]
        res = fi.execute(fi.Case("run", 0, "gemm", "planted", b"", {"via": "api", "recipe": recipe}), ctx)
        assert res["outcome"] == "wrong", res
    finally:
        ctx.close()


def test_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="--kind"):
        InputsOptions(kinds=("onnx", "bogus"), iterations=1)
    with pytest.raises(ValueError, match="--time"):
        InputsOptions(time_s=-5)
    with pytest.raises(ValueError, match="--timeout"):
        InputsOptions(iterations=1, timeout_s=0)
    with pytest.raises(ValueError, match="--iterations"):
        InputsOptions(iterations=0)


@pytest.mark.slow
def test_cli_level_inputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kiln", "fuzz", "--level", "inputs", "--kind", "calib", "--iterations", "30",
           "--seed", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    report = json.loads((out / "report.json").read_text())
    assert res.returncode == (1 if report["findings"] else 0), res.stdout + res.stderr
    assert report["level"] == "inputs" and report["kinds"]["calib"]["cases"] == 30
    assert "malformed inputs: 30 cases" in res.stdout and "calib kiln errors:" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
