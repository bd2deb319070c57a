"""Findings on disk: reduce a failing case, write its folder (a one-command reproducer), replay saved folders.

A graph finding's folder holds ``case.ir`` (reduced), ``original.ir``,
``pipeline.txt``, ``inputs.npz``, ``finding.json`` (key, expected vs actual)
and ``repro.sh``; a TIR finding's holds ``func.tvmscript``,
``original.tvmscript`` and ``passes.txt`` instead.  Everything is text or npz:
no pickle, so a finding can be read with any tool and replayed by any later
kiln.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.fuzz.oracle import GraphCase, Outcome
from kiln.fuzz.worker import Task, Worker, execute

if TYPE_CHECKING:
    from kiln.fuzz.campaign import Finding, FuzzOptions

__all__ = ["Replay", "read_finding", "reduce_finding", "replay", "same_bug", "write_finding"]

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
                   worker: Worker | None) -> dict[str, Any]:
    """The smallest case found (delta debugging over nodes and passes, or TIR statements and passes)
    that still shows the same finding, within ``opts.reduce_tests`` runs and ``opts.reduce_s`` seconds."""
    deadline = time.monotonic() + opts.reduce_s

    def shows(c: dict[str, Any]) -> bool:
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


def _atomic_dir(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))


def write_finding(folder: str | os.PathLike, finding: Finding) -> Path:
    """Write one finding's folder (built in a temporary folder, then renamed into place)."""
    folder = Path(folder)
    tmp = _atomic_dir(folder)
    reduced = finding.reduced or finding.case
    meta = {"id": finding.id, "level": finding.level, "count": finding.count, "first_s": finding.first_s,
            "size_before": finding.size_before, "size_after": finding.size_after,
            "outcome": finding.outcome, "case": reduced, "original_case": finding.case,
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
        (tmp / "func.tvmscript").write_text(reduced["script"])
        (tmp / "original.tvmscript").write_text(finding.case["script"])
        (tmp / "passes.txt").write_text("\n".join(reduced["passes"]) + "\n")
        try:
            from kiln.fuzz.tir import case_inputs as tir_inputs

            np.savez(tmp / "inputs.npz", **tir_inputs(reduced["script"], int(reduced.get("seed", 0))))
        except Exception as e:  # noqa: BLE001 - a function TVM cannot parse still gets its folder
            meta["inputs_error"] = f"{type(e).__name__}: {e}"
    (tmp / "finding.json").write_text(json.dumps(meta, indent=1, default=str))
    (tmp / "repro.sh").write_text(REPRO)
    (tmp / "repro.sh").chmod((tmp / "repro.sh").stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def read_finding(folder: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(level, case, expected outcome) of a saved finding; the case files win over finding.json's copy."""
    folder = Path(folder)
    meta = json.loads((folder / "finding.json").read_text())
    case = dict(meta["case"])
    if meta["level"] == "graph":
        if (folder / "case.ir").exists():
            case["ir"] = (folder / "case.ir").read_text()
        if (folder / "pipeline.txt").exists():
            case["passes"] = [p for p in _split_pipeline((folder / "pipeline.txt").read_text().strip()) if p]
    else:
        if (folder / "func.tvmscript").exists():
            case["script"] = (folder / "func.tvmscript").read_text()
        if (folder / "passes.txt").exists():
            case["passes"] = [p for p in (folder / "passes.txt").read_text().split() if p]
    return meta["level"], case, meta["outcome"]


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
    """Re-run each saved finding in a worker process (a crash is a result, not the end of the replay)."""
    from kiln.fuzz.oracle import STAGES

    worker = None if in_process else Worker(timeout_s, plugins)
    results = []
    try:
        if worker:
            worker.start()
        for folder in folders:
            level, case, expected = read_finding(folder)
            got = _run(level, case, STAGES, worker)
            results.append(Replay(str(folder), expected, Outcome.from_json(got).to_json()))
    finally:
        if worker:
            worker.close()
    return results
