"""No code from data (issue 15, item 2): saved findings and corpus entries are read without running them.

Each test plants a payload that does run when handled the old way (TVMScript
parsed by ``tvm.script.from_source``, or TIR that calls out, built and run) and
checks that kiln's readers refuse it cleanly and the payload's marker file
never appears.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from kiln.fuzz import tir
from kiln.fuzz.findings import FuzzError, read_finding, replay

OUTCOME = {"status": "finding", "symptom": "mismatch", "stage": "tir-run", "pass_name": ""}


def _payload_script(marker: Path) -> str:
    """TVMScript whose parsing writes ``marker`` (a dtype expression that is Python)."""
    return f'''# from tvm.script import tirx as T

@T.prim_func
def f(A: T.Buffer((4,), __import__("pathlib").Path({str(marker)!r}).write_text("ran") and "float32")):
    for i in range(4):
        A[i] = T.float32(0)
'''


def _calls_system(marker: Path) -> tvm.tirx.PrimFunc:
    """A PrimFunc that, built and run, runs ``touch marker`` through call_extern."""
    return tvm.script.from_source(f'''# from tvm.script import tirx as T

@T.prim_func
def f(A: T.Buffer((4,), "int32")):
    A[0] = T.call_extern("int32", "system", "touch {marker}")
''')


def _finding(folder: Path, func_json: str | None, script: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "finding.json").write_text(json.dumps({"format": 2, "id": folder.name, "level": "tir",
                                                     "outcome": OUTCOME, "case": {"passes": [], "seed": 1,
                                                                                  "origin": "planted"}}))
    (folder / "passes.txt").write_text("tirx.StmtSimplify\n")
    if func_json is not None:
        (folder / "func.json").write_text(func_json)
    if script is not None:
        (folder / "func.tvmscript").write_text(script)
        (folder / "original.tvmscript").write_text(script)
    return folder


def test_the_planted_tvmscript_is_a_live_payload(tmp_path: Path) -> None:
    """The payload the other tests plant does run when parsed as TVMScript (so their checks mean something)."""
    marker = tmp_path / "ran"
    tvm.script.from_source(_payload_script(marker))
    assert marker.read_text() == "ran"


def test_replay_of_a_tvmscript_only_finding_is_a_clean_error_and_runs_nothing(tmp_path: Path) -> None:
    """The issue's case: `kiln fuzz --replay DIR` on a finding whose func.tvmscript holds Python."""
    marker = tmp_path / "ran"
    folder = _finding(tmp_path / "planted", None, _payload_script(marker))
    res = subprocess.run([sys.executable, "-m", "kiln", "fuzz", "--replay", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no func.json" in res.stderr and "Traceback" not in res.stderr + res.stdout
    assert not marker.exists()


@pytest.mark.slow
def test_replay_never_parses_the_tvmscript_copy(tmp_path: Path) -> None:
    """A finding with a good func.json replays normally; the planted TVMScript beside it is not read."""
    marker = tmp_path / "ran"
    good = tir.seed_cases(0)[-1].func  # kiln:trivial, a copy loop
    folder = _finding(tmp_path / "planted", good, _payload_script(marker))
    (r,) = replay([folder], timeout_s=60)
    assert r.got["status"] == "ok" and not r.reproduces, r.got
    assert not marker.exists()


def test_tir_that_calls_out_is_refused_before_tvm_sees_it(tmp_path: Path) -> None:
    """TVM JSON is data, but the TIR in it is built and run: a call_extern("system") is refused."""
    live = tmp_path / "live"
    func = _calls_system(live)
    lib = tvm.compile(tvm.IRModule({"f": func}), target="llvm")
    lib["f"](tvm.runtime.tensor(np.zeros(4, np.int32)))
    assert live.exists()  # the payload is real when built and run unchecked

    marker = tmp_path / "ran"
    folder = _finding(tmp_path / "planted", tir.dump_func(_calls_system(marker)))
    with pytest.raises(FuzzError, match="call_extern"):
        read_finding(folder)
    with pytest.raises(FuzzError, match="call_extern"):
        replay([folder], in_process=True)
    assert tir.run_case(tir.TirCase(tir.dump_func(_calls_system(marker)), [], 0)).status == "invalid"
    assert not marker.exists()


def test_json_that_crashes_tvms_loader_is_a_clean_error(tmp_path: Path) -> None:
    """A node that refers to itself makes TVM 0.27's load_json segfault: replay loads in a worker first."""
    doc = json.loads(tir.seed_cases(0)[-1].func)
    i = next(k for k, n in enumerate(doc["nodes"]) if n["type"] == "ir.DictAttrs")
    doc["nodes"][i]["data"]["__dict__"] = i
    folder = _finding(tmp_path / "tampered", json.dumps(doc))
    with pytest.raises(FuzzError, match="damaged or was tampered"):
        replay([folder], timeout_s=60)


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "not JSON"),
    (lambda d: json.dumps([1, 2]), "expected TVM JSON"),
    (lambda d: json.dumps({**d, "root_index": len(d["nodes"]) + 5}), "expected TVM JSON"),
    (lambda d: json.dumps({**d, "nodes": d["nodes"] + [{"type": "ir.GlobalVar", "data": {}}]}), "ir.GlobalVar"),
    (lambda d: json.dumps({**d, "nodes": d["nodes"] + [{"type": "ffi.Function", "data": {}}]}), "ffi.Function"),
    (lambda d: json.dumps({**d, "root_index": 1}), "tirx.PrimFunc at the root"),
    (lambda d: "x" * (tir.MAX_FUNC_JSON + 1), "limit"),
])
def test_check_func_json_refuses_anything_but_a_primfunc_of_tir(edit, message) -> None:
    doc = json.loads(tir.seed_cases(0)[-1].func)
    with pytest.raises(tir.UnsafeTir, match=message):
        tir.check_func_json(edit(doc))


def test_a_call_whose_target_is_not_an_intrinsic_is_refused() -> None:
    doc = json.loads(next(c.func for c in tir.seed_cases(0) if c.origin == "kernel:matmul"))
    calls = [n for n in doc["nodes"] if n["type"] == "ir.Call"]
    assert calls
    calls[0]["data"]["op"] = doc["root_index"]
    with pytest.raises(tir.UnsafeTir, match="does not call a TVM intrinsic"):
        tir.check_func_json(json.dumps(doc))


def test_every_seed_and_mutant_passes_the_check() -> None:
    """The check refuses nothing kiln itself makes (seeds, and mutants: mutate_func applies it)."""
    rng = np.random.default_rng(0)
    for case in tir.seed_cases(0):
        tir.check_func_json(case.func)
        new, _ = tir.mutate_func(case.prim_func(), rng)
        tir.check_func_json(tir.dump_func(new))


def test_a_finding_json_with_a_malformed_case_is_a_fuzz_error(tmp_path: Path) -> None:
    folder = _finding(tmp_path / "bad", tir.seed_cases(0)[-1].func)
    meta = json.loads((folder / "finding.json").read_text())
    meta["case"]["seed"] = "not a seed"
    (folder / "finding.json").write_text(json.dumps(meta))
    with pytest.raises(FuzzError, match="seed"):
        read_finding(folder)
    (folder / "finding.json").write_text("[1]")
    with pytest.raises(FuzzError, match="not a finding"):
        read_finding(folder)


def test_saved_tvm_findings_are_in_the_json_format() -> None:
    """The repository's own saved TIR finding reads without parsing TVMScript."""
    folder = Path(__file__).parents[2] / "fuzz" / "tvm-findings" / "narrow-datatype-sblock-segv"
    level, case, expected = read_finding(folder)
    assert level == "tir" and case["passes"] == ["tirx.NarrowDataType:16"]
    assert tir.load_func(case["func"]).attrs["global_symbol"] == "k_layer_norm"
