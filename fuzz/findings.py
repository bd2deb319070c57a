"""Findings on disk: reduce a failing case, write its folder (a one-command reproducer), replay saved folders.

A graph finding's folder holds ``case.ir`` (reduced), ``original.ir``,
``pipeline.txt``, ``inputs.npz``, ``finding.json`` (key, expected vs actual)
and ``repro.sh``; a TIR finding's holds ``func.json`` and ``original.json``
(the PrimFuncs as TVM's JSON, the only form read back), ``func.tvmscript`` and
``original.tvmscript`` (copies for people, never parsed: parsing TVMScript
runs Python) and ``passes.txt`` instead.  Everything is text or npz without
pickles, and nothing in a folder is executed: a finding from someone else can
be replayed (its TIR is checked by :func:`kiln.fuzz.tir.check_func_json` and
loaded in a worker process first).  Folders written before ``func.json``
existed are refused with :class:`FuzzError`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.fuzz.oracle import GraphCase, Outcome
from kiln.fuzz.worker import Task, Worker, check_in_child, execute
from kiln.runtime.errors import Error

if TYPE_CHECKING:
    from kiln.fuzz.campaign import Finding, FuzzOptions

__all__ = ["FORMAT", "FuzzError", "Replay", "clean_case", "read_finding", "reduce_finding", "replay", "same_bug",
           "write_finding"]

FORMAT = 2  # finding.json "format": 2 = TIR saved as TVM JSON (func.json)
MAX_TEXT = 16 << 20  # bytes: the largest file of a finding kiln reads


class FuzzError(Error, ValueError):
    """A fuzz campaign or a saved finding kiln cannot use: the message names the file or flag and why."""

REPRO = """#!/bin/sh
# Re-runs this finding's saved case through kiln and says whether it still shows (exit 1 if it does).
exec "${KILN:-kiln}" fuzz --replay "$(dirname "$0")" "$@"
"""


def same_bug(want: dict[str, Any], got: dict[str, Any]) -> bool:
    """Whether ``got`` shows the finding ``want``: same symptom, stage and pass; crashes also the same message."""
    if got.get("status") != "finding":
        return False
    if any(want.get(k) != got.get(k) for k in ("symptom", "stage", "pass_name")):
        return False
    return want.get("symptom") != "crash" or want.get("message") == got.get("message")


def _run(level: str, case: dict[str, Any], stages: tuple[str, ...], worker: Worker | None) -> dict[str, Any]:
    task = Task(level, case, stages, trace=False)
    return worker.run(task) if worker is not None else execute(task)


def reduce_finding(level: str, case: dict[str, Any], outcome: dict[str, Any], opts: FuzzOptions,
                   worker: Worker | None, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The smallest case found (delta debugging over nodes and passes, or TIR statements and passes)
    that still shows the same finding, within ``opts.reduce_tests`` runs and ``opts.reduce_s`` seconds;
    ``stop`` returning True (a signal TVM may have swallowed) ends it with KeyboardInterrupt."""
    deadline = time.monotonic() + opts.reduce_s

    def shows(c: dict[str, Any]) -> bool:
        if stop is not None and stop():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:  # out of time: keep the smallest case found so far
            return False
        return same_bug(outcome, _run(level, c, opts.stages, worker))

    if level == "graph":
        from kiln.fuzz.reduce import reduce_case

        gc = GraphCase.from_json(case)

        def still(g: Any, passes: list[str]) -> bool:
            return shows(GraphCase.of(g, passes, gc.seed, gc.origin).to_json())

        g, passes = reduce_case(gc.graph(), list(gc.passes), still, max_tests=opts.reduce_tests)
        return GraphCase.of(g, passes, gc.seed, gc.origin).to_json()
    from kiln.fuzz.tir import TirCase
    from kiln.fuzz.tir import reduce_case as reduce_tir

    small = reduce_tir(TirCase(**case), lambda c: shows(asdict(c)), max_tests=opts.reduce_tests)
    return asdict(small)


def _script(func: str) -> str:
    """The TVMScript copy of a saved function, for people (a header says it is never read back)."""
    from kiln.fuzz.tir import load_func

    try:
        text = load_func(func).script()
    except Exception as e:  # noqa: BLE001 - the JSON is the finding; the script is only a courtesy
        text = f"# TVM could not print this function: {type(e).__name__}: {e}"
    return "# A copy for people; kiln never parses it (func.json is the case).\n" + text


def _atomic_dir(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))


def write_finding(folder: str | os.PathLike, finding: Finding) -> Path:
    """Write one finding's folder (built in a temporary folder, then renamed into place)."""
    folder = Path(folder)
    tmp = _atomic_dir(folder)
    try:
        _fill(tmp, finding)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _fill(tmp: Path, finding: Finding) -> None:
    reduced = finding.reduced or finding.case
    meta = {"format": FORMAT, "id": finding.id, "level": finding.level, "count": finding.count,
            "first_s": finding.first_s, "size_before": finding.size_before, "size_after": finding.size_after,
            "reduced": finding.reduced is not None, "outcome": finding.outcome,
            "case": _meta_case(reduced), "original_case": _meta_case(finding.case),
            "repro": "sh repro.sh (in this folder)"}
    if finding.level == "graph":
        gc = GraphCase.from_json(reduced)
        (tmp / "case.ir").write_text(gc.ir)
        (tmp / "original.ir").write_text(finding.case["ir"])
        (tmp / "pipeline.txt").write_text(gc.pipeline + "\n")
        from kiln.fuzz.oracle import case_inputs

        try:
            np.savez(tmp / "inputs.npz", **case_inputs(gc.graph(), gc.seed))
        except Exception as e:  # noqa: BLE001 - a case whose inputs cannot be made still gets its folder
            meta["inputs_error"] = f"{type(e).__name__}: {e}"
    else:
        (tmp / "func.json").write_text(reduced["func"])
        (tmp / "original.json").write_text(finding.case["func"])
        (tmp / "func.tvmscript").write_text(_script(reduced["func"]))
        (tmp / "original.tvmscript").write_text(_script(finding.case["func"]))
        (tmp / "passes.txt").write_text("\n".join(reduced["passes"]) + "\n")
        try:
            from kiln.fuzz.tir import case_inputs as tir_inputs

            np.savez(tmp / "inputs.npz", **tir_inputs(reduced["func"], int(reduced.get("seed", 0))))
        except Exception as e:  # noqa: BLE001 - a function TVM cannot load still gets its folder
            meta["inputs_error"] = f"{type(e).__name__}: {e}"
    (tmp / "finding.json").write_text(json.dumps(meta, indent=1, default=str))
    (tmp / "repro.sh").write_text(REPRO)
    (tmp / "repro.sh").chmod((tmp / "repro.sh").stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _meta_case(case: dict[str, Any]) -> dict[str, Any]:
    """A case for finding.json: a TIR case's function lives in its own file (func.json), not twice."""
    return {k: v for k, v in case.items() if k != "func"}


def _read(path: Path) -> str:
    """A finding's text file, size-checked; a missing or oversized one is a FuzzError naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_TEXT:
            raise FuzzError(f"{path}: {size} bytes; a finding file may hold at most {MAX_TEXT}")
        return path.read_text()
    except FileNotFoundError:
        raise FuzzError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FuzzError(f"{path}: cannot be read ({e})") from None


def read_finding(folder: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(level, case, expected outcome) of a saved finding; the case files win over finding.json's copy.

    Nothing is evaluated: IR text goes to kiln's parser later, a TIR function
    must be TVM JSON that :func:`kiln.fuzz.tir.check_func_json` accepts.
    Raises :class:`FuzzError` for a folder kiln cannot read or will not trust.
    """
    from kiln.fuzz.tir import UnsafeTir, check_func_json

    folder = Path(folder)
    try:
        meta = json.loads(_read(folder / "finding.json"))
        level, case, outcome = meta["level"], dict(meta["case"]), dict(meta["outcome"])
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, FuzzError):
            raise
        raise FuzzError(f"{folder / 'finding.json'}: not a finding ({type(e).__name__}: {e})") from None
    if level not in ("graph", "tir"):
        raise FuzzError(f"{folder / 'finding.json'}: level {str(level)[:40]!r}; expected graph or tir")
    if not isinstance(outcome.get("symptom", ""), str) or not isinstance(outcome.get("stage", ""), str):
        raise FuzzError(f"{folder / 'finding.json'}: the outcome's symptom and stage must be strings")
    if level == "graph":
        if (folder / "case.ir").exists():
            case["ir"] = _read(folder / "case.ir")
        if (folder / "pipeline.txt").exists():
            case["passes"] = [p for p in _split_pipeline(_read(folder / "pipeline.txt").strip()) if p]
        if not isinstance(case.get("ir"), str):
            raise FuzzError(f"{folder}: no case.ir and no IR text in finding.json")
    else:
        if not (folder / "func.json").exists():
            raise FuzzError(
                f"{folder}: no func.json. TIR findings saved before kiln kept its cases as TVM JSON hold only "
                f"func.tvmscript, which kiln does not parse (parsing TVMScript runs Python). If you trust "
                f"the folder, write func.json with tvm.ir.save_json(tvm.script.from_source(text)) yourself")
        case["func"] = _read(folder / "func.json")
        if (folder / "passes.txt").exists():
            case["passes"] = [p for p in _read(folder / "passes.txt").split() if p]
        try:
            check_func_json(case["func"], str(folder / "func.json"))
        except UnsafeTir as e:
            raise FuzzError(str(e)) from None
    return level, clean_case(level, case, str(folder)), outcome


def clean_case(level: str, case: Any, where: str) -> dict[str, Any]:
    """A saved case with exactly the fields a case has, each of its type; FuzzError naming ``where``
    otherwise (so a tampered file fails here, not as a TypeError deep in a worker)."""
    text = "ir" if level == "graph" else "func"
    if not isinstance(case, dict):
        raise FuzzError(f"{where}: the case is a {type(case).__name__}, expected an object")
    passes, seed, origin = case.get("passes", []), case.get("seed", 0), case.get("origin", "")
    if not isinstance(case.get(text), str):
        raise FuzzError(f"{where}: the case has no {text!r} text")
    if not isinstance(passes, list) or not all(isinstance(x, str) for x in passes):
        raise FuzzError(f"{where}: the case's passes must be a list of strings, got {str(passes)[:80]}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise FuzzError(f"{where}: the case's seed must be an integer in [0, 2**63), got {str(seed)[:40]}")
    if not isinstance(origin, str):
        raise FuzzError(f"{where}: the case's origin must be a string")
    return {text: case[text], "passes": list(passes), "seed": seed, "origin": origin}


def _split_pipeline(text: str) -> list[str]:
    """Pipeline string -> pass strings (commas inside ``{...}`` options stay)."""
    from kiln.passes.manager import parse_pipeline

    return [str(p) for p in parse_pipeline(text)]


@dataclass
class Replay:
    """One saved finding re-run: whether it still shows, and what the run gave."""

    folder: str
    expected: dict[str, Any]
    got: dict[str, Any]

    @property
    def reproduces(self) -> bool:
        return same_bug(self.expected, self.got)


def replay(folders: list[Path], *, timeout_s: float = 60.0, plugins: tuple[str, ...] = (),
           in_process: bool = False) -> list[Replay]:
    """Re-run each saved finding in a worker process (a crash is a result, not the end of the replay).

    Every folder is read and checked before any case runs; a TIR function is
    first loaded in a worker (TVM's loader can crash on a damaged file). A
    folder kiln will not read raises :class:`FuzzError` naming it. In-process
    replay (tests) skips only the worker isolation, never the checks.
    """
    from kiln.fuzz.oracle import STAGES

    cases = [(folder, *read_finding(folder)) for folder in folders]
    if not in_process:
        tir = [(folder, case) for folder, level, case, _ in cases if level == "tir"]
        for (folder, _case), why in zip(tir, check_in_child([c["func"] for _, c in tir], timeout_s)):
            if why is not None:
                raise FuzzError(f"{Path(folder) / 'func.json'}: {why}")
    worker = None if in_process else Worker(timeout_s, plugins)
    results = []
    try:
        if worker:
            worker.start()
        for folder, level, case, expected in cases:
            try:
                got = _run(level, case, STAGES, worker)
            except (TypeError, KeyError, ValueError) as e:
                raise FuzzError(f"{folder}: the saved case is malformed ({type(e).__name__}: {e})") from None
            results.append(Replay(str(folder), expected, Outcome.from_json(got).to_json()))
    finally:
        if worker:
            worker.close()
    return results
