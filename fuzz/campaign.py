"""The fuzzing campaign: Tzer's joint loop over graphs, pipelines and TIR, with coverage feedback.

Each worker slot follows one corpus entry: it mutates the entry's graph (or
TIR function) while mutants keep adding coverage (a mutant that does becomes
the slot's entry and joins the corpus), then, after ``stale_limit`` mutants
without new coverage, mutates the entry's pass pipeline the same way, then
picks another entry.  With ``feedback=False`` the same loop runs but coverage
never counts as new: mutants never join the corpus (the ablation baseline).
Findings are deduplicated by (symptom, stage, pass, normalized message),
reduced, and written one folder each with a one-command reproducer.

With an output folder the campaign saves as it goes (:meth:`Campaign.save`,
every ``save_every_s`` seconds, and on SIGINT/SIGTERM): new corpus entries
(``corpus/<level>-NNNNN.json``), new findings (unreduced until the end),
``report.json`` and ``state.json`` (options, counters, coverage, the random
generator's state, the findings), each file written atomically, so an
interrupted campaign loses at most the cases in flight.  :func:`resume_campaign`
continues one from its folder: the saved corpus, coverage, counters and random
state, with what is left of the original budget, or a new budget counted from
the resume.  Nothing in the folder is executed: cases are re-checked (TIR in a
worker process) and plugin modules are imported only when named again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from kiln.fuzz.coverage import Coverage
from kiln.fuzz.findings import FuzzError, clean_case
from kiln.fuzz.oracle import STAGES, GraphCase, Outcome
from kiln.fuzz.worker import Task, Worker, check_in_child, execute, wait_any

__all__ = ["Campaign", "Finding", "FuzzOptions", "Interrupted", "parse_duration", "prepare_out", "resume_campaign",
           "run_campaign"]

LEVELS = ("graph", "tir", "both")
# Bigger cases always reach more arcs, so unchecked feedback grows them (and slows every test):
# mutants above these sizes are tested but never kept (AFL trims for the same reason).
MAX_GRAPH_NODES = 24
MAX_TIR_LINES = 200
STATE_FORMAT = 1
MAX_STATE = 256 << 20  # bytes of state.json kiln reads back
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}")


class Interrupted(KeyboardInterrupt):
    """SIGTERM during a campaign (SIGINT is Python's KeyboardInterrupt): the campaign saves and stops."""


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1h"`` -> seconds (a finite number above 0)."""
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        seconds = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise ValueError(f"duration {text!r}: expected a number with an optional s, m or h suffix") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {text!r}: expected more than 0 seconds (e.g. 90, 90s, 10m, 1h)")
    return seconds


@dataclass(frozen=True)
class FuzzOptions:
    """Everything a campaign depends on; the same options and seed replay the same campaign (with jobs=1)."""

    level: str = "both"
    time_s: float | None = None
    iterations: int | None = None
    seed: int = 0
    jobs: int = 1
    out: str | None = None
    feedback: bool = True
    timeout_s: float = 60.0
    plugins: tuple[str, ...] = ()
    pass_pool: tuple[str, ...] | None = None
    stages: tuple[str, ...] = STAGES
    reduce: bool = True
    reduce_tests: int = 80
    stale_limit: int = 4
    max_nodes: int = 8
    harvest_every: int = 8
    trace: bool = True
    models: tuple[str, ...] = ()  # extra graph seeds: zoo names, "light:<name>" (onnx's light CNNs) or .onnx paths
    known_crashes: bool = False  # also draw TVM passes with a known crash (fuzz/FINDINGS.md) into TIR sequences
    reduce_s: float = 90.0  # wall-clock cap on reducing one finding
    save_every_s: float = 5.0  # with ``out``: how often the folder is brought up to date

    def __post_init__(self) -> None:
        def positive(flag: str, v: float | None, whole: bool = False) -> None:
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                               and (not whole or float(v).is_integer()))
            if not ok:
                raise ValueError(f"{flag} {v!r}: expected {'a whole number of at least 1' if whole else 'more than 0'}")

        if self.level not in LEVELS:
            raise ValueError(f"--level {self.level!r}: expected one of {', '.join(LEVELS)}")
        if self.time_s is None and self.iterations is None:
            raise ValueError("a campaign needs --time or --iterations")
        positive("--time", self.time_s)
        positive("--iterations", self.iterations, whole=True)
        positive("--timeout", self.timeout_s)
        positive("save_every_s", self.save_every_s)
        if not isinstance(self.jobs, int) or self.jobs < 0:
            raise ValueError(f"--jobs {self.jobs!r}: expected 1 or more worker processes (0: in-process)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63:
            raise ValueError(f"--seed {self.seed!r}: expected a whole number in [0, 2**63)")
        if not set(self.stages) <= set(STAGES):
            raise ValueError(f"stages {list(self.stages)}: expected some of {', '.join(STAGES)}")


@dataclass
class Entry:
    """A corpus entry: a case of one level, and what it added when it joined."""

    level: str
    case: dict[str, Any]
    added: int
    origin: str

    @cached_property
    def size(self) -> int:
        """Parsed once: every pick weighs every entry by it."""
        return _size(self.level, self.case)


@dataclass
class Finding:
    """One unique finding: its key, the first case that showed it, and its reduced case."""

    id: str
    level: str
    outcome: dict[str, Any]
    case: dict[str, Any]
    reduced: dict[str, Any] | None = None
    count: int = 1
    first_s: float = 0.0
    folder: str = ""
    size_before: int = 0
    size_after: int = 0


@dataclass
class Slot:
    """A worker's place in Tzer's joint loop."""

    entry: Entry | None = None
    phase: str = "graph"  # graph/func mutation, then pipeline mutation
    stale: int = 0
    pending: tuple[str, dict[str, Any], str] | None = None  # (level, case, mutator) in flight
    started: float = 0.0


def _reclassify(level: str, case: dict[str, Any], out: Outcome) -> Outcome:
    """A mutated TIR function that kills the process when built by the unmutated pipeline (division by
    zero, a wild load it was mutated into) is an invalid test, as Tzer counts it; on kiln's own kernel
    it stays a finding."""
    mutated = "|ir-" in case.get("origin", "")
    if level == "tir" and out.status == "finding" and out.stage == "tir-run" and out.pass_name == "reference" \
            and mutated:
        out.status = "invalid"
        out.features.append(f"err:tir-run-reference-{out.message}")
    return out


def _source(feature: str) -> str:
    return feature.split(":", 1)[0] if ":" in feature else "feat"


def _size(level: str, case: dict[str, Any]) -> int:
    """Reproducer size: graph nodes plus passes, or TVMScript lines plus passes."""
    if level == "graph":
        return len(GraphCase.from_json(case).graph().nodes) + len(case["passes"])
    return _script_lines(case["func"]) + len(case["passes"])


@lru_cache(maxsize=512)
def _script_lines(func: str) -> int:
    """Non-blank TVMScript lines of a saved function (printing costs milliseconds; mutants repeat)."""
    from kiln.fuzz.tir import load_func

    return sum(1 for line in load_func(func).script().splitlines() if line.strip())


@dataclass
class Campaign:
    """A running campaign (the CLI drives it; tests drive it with small budgets)."""

    opts: FuzzOptions
    progress: Callable[[dict[str, Any]], None] | None = None
    coverage: Coverage = field(default_factory=Coverage)
    corpus: dict[str, list[Entry]] = field(default_factory=lambda: {"graph": [], "tir": []})
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    tests: Counter = field(default_factory=Counter)
    busy_s: Counter = field(default_factory=Counter)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    mutators: Counter = field(default_factory=Counter)
    productive: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.opts.seed)
        self.t0 = time.monotonic()
        self.n = 0
        self.spent_s = 0.0  # campaign seconds before this process (a resumed campaign)
        self.resumed = 0
        self.refused: dict[str, int] = {}  # saved entries a resume would not take, by level
        self.state = "running"
        self._seeded = False
        self._written = {"graph": 0, "tir": 0}  # corpus entries already in the output folder
        self._new_findings: list[tuple[str, ...]] = []
        self._last_save = time.monotonic()
        self._stop = 0  # the signal that asked the campaign to stop

    # ------------------------------------------------------------------ seeds
    def seed_corpus(self) -> None:
        """Seeds: generated graphs and the pattern graphs with random pipelines; kiln's kernels as TIR."""
        from kiln.fuzz.generate import seed_graphs

        self._seeded = True
        from kiln.fuzz.mutate import random_pipeline

        if self.opts.level in ("graph", "both"):
            for name in self.opts.models:
                passes = random_pipeline(self.rng, self.opts.pass_pool)
                case = GraphCase.of(model_graph(name), passes, int(self.rng.integers(1 << 30)), f"seed:{name}")
                self.corpus["graph"].append(Entry("graph", case.to_json(), 0, case.origin))
            for label, g in seed_graphs(self.rng):
                passes = random_pipeline(self.rng, self.opts.pass_pool)
                case = GraphCase.of(g, passes, int(self.rng.integers(1 << 30)), f"seed:{label}")
                self.corpus["graph"].append(Entry("graph", case.to_json(), 0, case.origin))
        if self.opts.level in ("tir", "both"):
            from kiln.fuzz.tir import seed_cases

            for tc in seed_cases(int(self.rng.integers(1 << 30))):
                self.corpus["tir"].append(Entry("tir", asdict(tc), 0, tc.origin))
        self.save()

    # ------------------------------------------------------------------ mutation
    def _pick(self, level: str) -> Entry:
        """A corpus entry: productive and small ones more often (energy ~ (1 + sqrt(added)) / size)."""
        entries = self.corpus[level]
        weights = np.array([(1.0 + e.added ** 0.5) / max(e.size, 1) for e in entries])
        return entries[int(self.rng.choice(len(entries), p=weights / weights.sum()))]

    def _level(self) -> str:
        if self.opts.level != "both":
            return self.opts.level
        return "graph" if self.rng.random() < 0.5 else "tir"

    def _mutate_graph(self, slot: Slot) -> tuple[dict[str, Any], str]:
        from kiln.fuzz.mutate import crossover_pipelines, mutate_graph, mutate_pipeline

        assert slot.entry is not None
        case = GraphCase.from_json(slot.entry.case)
        seed = int(self.rng.integers(1 << 30))
        if slot.phase == "graph":
            g, how = mutate_graph(case.graph(), self.rng)
            return GraphCase.of(g, case.passes, seed, f"{case.origin}|{how}").to_json(), how
        if self.rng.random() < 0.25 and len(self.corpus["graph"]) > 1:
            other = GraphCase.from_json(self._pick("graph").case)
            passes, how = crossover_pipelines(case.passes, other.passes, self.rng), "pipeline-crossover"
        else:
            passes, how = mutate_pipeline(case.passes, self.rng, self.opts.pass_pool)
        return GraphCase(case.ir, passes, seed, f"{case.origin}|{how}").to_json(), how

    def _mutate_tir(self, slot: Slot) -> tuple[dict[str, Any], str]:
        from kiln.fuzz.tir import TirCase, crossover_passes, mutate_func, mutate_passes, pass_pool

        assert slot.entry is not None
        tc = TirCase(**slot.entry.case)
        if slot.phase == "graph":
            new, how = mutate_func(tc.prim_func(), self.rng)
            out = TirCase.of(new, tc.passes, int(self.rng.integers(1 << 30)), f"{tc.origin}|{how}")
        else:
            if self.rng.random() < 0.25 and len(self.corpus["tir"]) > 1:
                other = TirCase(**self._pick("tir").case)
                passes, how = crossover_passes(tc.passes, other.passes, self.rng), "passes-crossover"
            else:
                passes, how = mutate_passes(tc.passes, self.rng, pass_pool(self.opts.known_crashes)), "passes-mutate"
            out = TirCase(tc.func, passes, tc.seed, f"{tc.origin}|{how}")
        return asdict(out), how

    def next_task(self, slots: dict[str, Slot]) -> tuple[Slot, Task]:
        """The next mutant of one level's slot (levels interleave with --level both), as a worker task;
        mutators that fail are retried on other entries."""
        level = self._level()
        slot = slots.setdefault(level, Slot())
        for _ in range(20):
            if slot.entry is None:
                slot.entry, slot.phase, slot.stale = self._pick(level), "graph", 0
            try:
                case, how = self._mutate_graph(slot) if level == "graph" else self._mutate_tir(slot)
            except Exception:  # noqa: BLE001 - MutationFailed, or a mutant TVM cannot print/serialize
                slot.stale += 1
                self._advance(slot)
                continue
            slot.pending = (level, case, how)
            harvest = level == "graph" and self.opts.level == "both" and self.n % self.opts.harvest_every == 0
            return slot, Task(level, case, self.opts.stages, self.opts.trace, harvest)
        raise RuntimeError(f"no mutator could change any {level} corpus entry in 20 tries")

    def _advance(self, slot: Slot) -> None:
        """Tzer's schedule: after stale_limit mutants without new coverage, switch to the pipeline, then move on."""
        if slot.stale < self.opts.stale_limit:
            return
        if slot.phase == "graph":
            slot.phase, slot.stale = "pipeline", 0
        else:
            slot.entry = None

    # ------------------------------------------------------------------ results
    def _features(self, out: Outcome) -> dict[str, list[Any]]:
        by: dict[str, list[Any]] = {"arc": list(out.arcs)}
        for f in out.features:
            by.setdefault(_source(f), []).append(f)
        return by

    def record(self, slot: Slot, result: dict[str, Any], wall_s: float) -> None:
        """Fold one result into coverage, corpus, findings and the timeline."""
        assert slot.pending is not None
        level, case, how = slot.pending
        slot.pending = None
        out = _reclassify(level, case, Outcome.from_json(result))
        self.n += 1
        self.tests[level] += 1
        self.busy_s[level] += wall_s
        self.statuses[out.status] += 1
        self.mutators[how] += 1
        new = sum(self.coverage.add(feats, src) for src, feats in self._features(out).items())
        for tc in out.extra.get("tir_cases", []):
            if self.opts.level == "both":
                self.corpus["tir"].append(Entry("tir", tc, 0, tc.get("origin", "kernel")))
        if out.status == "finding":
            self._finding(level, case, out)
        small = _size(level, case) <= (MAX_GRAPH_NODES if level == "graph" else MAX_TIR_LINES)
        if new and small and self.opts.feedback and out.status in ("ok", "unsupported", "finding"):
            self.productive[how] += 1
            child = Entry(level, case, new, case.get("origin", ""))
            self.corpus[level].append(child)
            slot.entry, slot.stale = child, 0
        else:
            slot.stale += 1
            self._advance(slot)
        self._point()
        if self.progress:
            self.progress(self.status())
        self.maybe_save()
        self._check_stop()

    def _point(self) -> None:
        """A timeline point when coverage, corpus or findings changed, else at most one a second."""
        p = {"t": round(self.elapsed(), 3), "tests": self.n, "coverage": self.coverage.total,
             "corpus": sum(len(v) for v in self.corpus.values()), "findings": len(self.findings)}
        last = self.timeline[-1] if self.timeline else None
        same = last is not None and all(last[k] == p[k] for k in ("coverage", "corpus", "findings"))
        if same and p["t"] - last["t"] < 1.0:
            last["tests"] = p["tests"]
            return
        self.timeline.append(p)

    def _finding(self, level: str, case: dict[str, Any], out: Outcome) -> None:
        key = (level, *out.key)
        if key in self.findings:
            self.findings[key].count += 1
            return
        self.findings[key] = Finding(f"{out.symptom}-{out.stage}-{out.key_id}", level, out.to_json(), case,
                                     first_s=self.elapsed(), size_before=_size(level, case))
        self._new_findings.append(key)

    # ------------------------------------------------------------------ loop
    def elapsed(self) -> float:
        """Campaign seconds, across resumes."""
        return self.spent_s + time.monotonic() - self.t0

    def done(self) -> bool:
        o = self.opts
        return (o.iterations is not None and self.n >= o.iterations) or \
               (o.time_s is not None and self.elapsed() >= o.time_s)

    def status(self) -> dict[str, Any]:
        el = max(self.elapsed(), 1e-9)
        return {"tests": self.n, "tests_per_s": self.n / el, "coverage": self.coverage.total,
                "corpus": sum(len(v) for v in self.corpus.values()), "findings": len(self.findings),
                "elapsed_s": el}

    def run(self) -> None:
        """The loop: keep every worker busy until the budget is spent; then reduce and write findings.

        With ``opts.out`` the folder is checked first (:func:`prepare_out`) and
        kept up to date; on SIGINT/SIGTERM (KeyboardInterrupt) it is saved with
        ``state`` "interrupted" before the interruption goes on to the caller.
        """
        if self.opts.out:
            prepare_out(self.opts.out, resume=self.resumed > 0 or self._seeded)
        self._base_spent = self.spent_s
        old = self._catch_signals()
        try:
            if not self._seeded:
                self.t0 = time.monotonic()
                self.seed_corpus()
                self._check_stop()
            if self.opts.jobs == 0:
                self._run_inline()
            else:
                self._run_workers()
            self.seconds = self.elapsed()
            if self.opts.reduce:
                self.reduce_findings()
        except KeyboardInterrupt:
            self.seconds = self.elapsed()
            self.state = "interrupted"
            if self.opts.out:
                _shielded(lambda: self.save(final=True))
            raise
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        self.state = "done"

    def _catch_signals(self) -> dict[int, Any]:
        """SIGINT and SIGTERM stop the campaign (main thread only) once the cases in flight are done:
        the first one leaves a flag that the loop checks between cases (an exception raised at a
        random point could land inside a TVM callback, which turns it into an error of the case, or
        in a finalizer); a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def stop(signum: int, _frame: Any) -> None:
            if self._stop:
                raise Interrupted() if signum == signal.SIGTERM else KeyboardInterrupt()
            self._stop = signum

        return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _check_stop(self) -> None:
        if self._stop:
            raise Interrupted() if self._stop == signal.SIGTERM else KeyboardInterrupt()

    def _run_inline(self) -> None:
        slots: dict[str, Slot] = {}
        while not self.done():
            self._check_stop()
            slot, task = self.next_task(slots)
            t = time.monotonic()
            self.record(slot, execute(task), time.monotonic() - t)

    def _run_workers(self) -> None:
        workers = [Worker(self.opts.timeout_s, self.opts.plugins) for _ in range(self.opts.jobs)]
        slots: dict[int, dict[str, Slot]] = {id(w): {} for w in workers}
        running: dict[int, Slot] = {}
        try:
            for w in workers:
                w.start()
                self._check_stop()
            self.spent_s, self.t0 = self._base_spent, time.monotonic()  # the budget counts tests, not start-up
            while True:
                self._check_stop()
                for w in workers:
                    if not w.busy and not self.done():
                        slot, task = self.next_task(slots[id(w)])
                        w.submit(task)
                        slot.started = time.monotonic()
                        running[id(w)] = slot
                if not any(w.busy for w in workers):
                    break
                for w in wait_any(workers, 1.0):
                    slot = running.pop(id(w))
                    self.record(slot, w.collect(), time.monotonic() - slot.started)
        finally:
            for w in workers:
                w.close()

    # ------------------------------------------------------------------ reduction and output
    def reduce_findings(self) -> None:
        """Reduce every finding (in a worker, so a crashing reproducer cannot stop the campaign)."""
        from kiln.fuzz.findings import reduce_finding

        worker = Worker(self.opts.timeout_s, self.opts.plugins) if self.opts.jobs else None
        try:
            if worker:
                worker.start()
            for f in self.findings.values():
                if f.reduced is not None:  # reduced before a resume
                    continue
                f.size_before = _size(f.level, f.case)
                if f.outcome["symptom"] == "hang":  # each test would cost the timeout
                    f.reduced, f.size_after = f.case, f.size_before
                    continue
                f.reduced = reduce_finding(f.level, f.case, f.outcome, self.opts, worker, lambda: bool(self._stop))
                f.size_after = _size(f.level, f.reduced)
                self._new_findings.append(next(k for k, v in self.findings.items() if v is f))
                self.maybe_save()
        finally:
            if worker:
                worker.close()

    def report(self) -> dict[str, Any]:
        per_level = {lv: {"tests": self.tests[lv], "busy_s": round(self.busy_s[lv], 2),
                          "tests_per_s": self.tests[lv] / self.busy_s[lv] if self.busy_s[lv] else 0.0}
                     for lv in ("graph", "tir") if self.tests[lv]}
        return {
            "state": self.state,
            "resumed": self.resumed,
            "refused_on_resume": dict(self.refused),
            "options": {k: v for k, v in asdict(self.opts).items()},
            "seconds": round(getattr(self, "seconds", self.elapsed()), 2),
            "tests": self.n,
            "tests_per_s": self.n / max(getattr(self, "seconds", self.elapsed()), 1e-9),
            "levels": per_level,
            "statuses": dict(self.statuses),
            "coverage": {"total": self.coverage.total, "by_source": dict(self.coverage.by_source)},
            "corpus": {lv: len(v) for lv, v in self.corpus.items()},
            "mutators": {k: {"tests": n, "added_coverage": self.productive[k]} for k, n in self.mutators.items()},
            "findings": [{"id": f.id, "level": f.level, "symptom": f.outcome["symptom"], "stage": f.outcome["stage"],
                          "pass": f.outcome["pass_name"], "message": f.outcome["message"], "count": f.count,
                          "first_s": round(f.first_s, 2), "size_before": f.size_before,
                          "size_after": f.size_after, "folder": f.folder} for f in self.findings.values()],
            "timeline": self.timeline,
        }

    # ------------------------------------------------------------------ the output folder
    def maybe_save(self) -> None:
        """Bring the output folder up to date when ``save_every_s`` has passed since the last save."""
        if self.opts.out and time.monotonic() - self._last_save >= self.opts.save_every_s:
            self.save()

    def save(self, final: bool = False) -> None:
        """Write what changed since the last save to ``opts.out``: new corpus entries and findings,
        report.json and state.json; ``final`` also rewrites every finding and draws coverage.png."""
        if self.opts.out:
            self.write(self.opts.out, final=final)
        self._last_save = time.monotonic()

    def write(self, out: str | os.PathLike, final: bool = True) -> Path:
        """The output folder: corpus/, findings/<id>/, report.json, state.json and (final) coverage.png;
        each file is written atomically, a finding's folder as a whole."""
        from kiln.fuzz.findings import write_finding
        from kiln.fuzz.report import plot_coverage

        root = Path(out)
        (root / "corpus").mkdir(parents=True, exist_ok=True)
        ours = self.opts.out is not None and root == Path(self.opts.out)
        for lv, entries in self.corpus.items():
            for i in range(self._written.get(lv, 0) if ours else 0, len(entries)):  # entries never change
                e = entries[i]
                _write_json(root / "corpus" / f"{lv}-{i:05d}.json", {"level": lv, "added": e.added, "case": e.case})
            if ours:
                self._written[lv] = len(entries)
        keys = list(self.findings) if final else list(dict.fromkeys(self._new_findings))
        self._new_findings = []
        for key in keys:
            f = self.findings[key]
            f.folder = str(write_finding(root / "findings" / f.id, f))
        _write_json(root / "report.json", self.report())
        _write_json(root / "state.json", self.to_state())
        if final:
            try:
                plot_coverage(self.timeline, root / "coverage.png", title=f"kiln fuzz --level {self.opts.level}"
                              f"{'' if self.opts.feedback else ' --no-feedback'}")
            except Exception:  # noqa: BLE001 - the plot is a picture of report.json; never lose a save to it
                pass
        return root

    # ------------------------------------------------------------------ resume
    def to_state(self) -> dict[str, Any]:
        """Everything :func:`resume_campaign` needs besides the corpus files (JSON only)."""
        return {
            "kind": "kiln-fuzz-campaign", "format": STATE_FORMAT, "state": self.state,
            "options": asdict(self.opts), "spent_s": self.elapsed(), "tests": self.n, "resumed": self.resumed,
            "tests_by_level": dict(self.tests), "busy_s": dict(self.busy_s), "statuses": dict(self.statuses),
            "mutators": dict(self.mutators), "productive": dict(self.productive),
            "rng": self.rng.bit_generator.state, "coverage": self.coverage.to_json(), "timeline": self.timeline,
            "corpus": {lv: len(v) for lv, v in self.corpus.items()},
            "findings": [{"key": list(k), "id": f.id, "level": f.level, "outcome": f.outcome, "case": f.case,
                          "reduced": f.reduced, "count": f.count, "first_s": f.first_s,
                          "size_before": f.size_before, "size_after": f.size_after}
                         for k, f in self.findings.items()],
        }


def _shielded(fn: Callable[[], None]) -> None:
    """Run ``fn`` with SIGINT and SIGTERM held off (a second Ctrl-C must not cut the final save short)."""
    if threading.current_thread() is not threading.main_thread():
        fn()
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        fn()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def prepare_out(out: str | os.PathLike, *, resume: bool = False) -> Path:
    """Check (and create) a campaign's output folder before any fuzzing: FuzzError when it is a file,
    cannot be created or written, or already holds another campaign (unless resuming it)."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FuzzError(f"--out {root}: exists and is not a folder; name a new or empty folder")
    if not resume and root.is_dir():
        held = [n for n in ("state.json", "report.json", "corpus", "findings") if (root / n).exists()]
        if held:
            raise FuzzError(f"--out {root}: already holds a campaign ({', '.join(held)}); continue it with "
                            f"--resume {root}, or name a new or empty folder")
    try:
        for sub in ("corpus", "findings"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kiln-probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FuzzError(f"--out {root}: cannot write there ({e.strerror or e})") from None
    return root


def resume_campaign(folder: str | os.PathLike, *, time_s: float | None = None, iterations: int | None = None,
                    jobs: int | None = None, reduce: bool | None = None, plugins: tuple[str, ...] = (),
                    progress: Callable[[dict[str, Any]], None] | None = None) -> Campaign:
    """A campaign from its folder, ready to :meth:`Campaign.run` on.

    The options, corpus, coverage, counters, findings and random state are the
    saved ones. The budget is what is left of the saved one, or, with
    ``time_s`` / ``iterations``, that much more from now. ``jobs`` and
    ``reduce`` may change; ``plugins`` must name again every module the campaign
    imported (kiln never imports a module because a data file names it).
    Raises FuzzError for a folder that is not a campaign or was damaged.
    """
    root = Path(folder)
    st = _read_state(root)
    saved = st["options"]
    if not isinstance(saved, dict):
        raise FuzzError(f"{root / 'state.json'}: options must be an object")
    missing = [m for m in saved.get("plugins", []) if m not in plugins]
    if missing:
        raise FuzzError(f"--resume {root}: the campaign used --plugin {' --plugin '.join(map(str, missing))}; "
                        f"name them again (kiln does not import modules named in a data file)")
    try:
        opts = FuzzOptions(**_saved_options(saved), plugins=tuple(plugins), out=str(root))
        spent, done = float(st["spent_s"]), int(st["tests"])
        opts = _rebudget(opts, spent, done, time_s, iterations, jobs, reduce)
    except (TypeError, ValueError, KeyError) as e:
        raise FuzzError(f"{root / 'state.json'}: cannot continue from it ({e})") from None
    camp = Campaign(opts, progress)
    _restore(camp, st, root)
    return camp


def _read_state(root: Path) -> dict[str, Any]:
    path = root / "state.json"
    if not root.is_dir():
        raise FuzzError(f"--resume {root}: not a folder")
    try:
        if path.stat().st_size > MAX_STATE:
            raise FuzzError(f"{path}: larger than {MAX_STATE} bytes")
        st = json.loads(path.read_text())
    except FileNotFoundError:
        raise FuzzError(f"--resume {root}: no state.json there (not a campaign folder, or one written "
                        f"before campaigns could be resumed)") from None
    except (OSError, ValueError) as e:
        raise FuzzError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(st, dict) or st.get("kind") != "kiln-fuzz-campaign" or st.get("format") != STATE_FORMAT:
        raise FuzzError(f"{path}: not a kiln fuzz campaign state of format {STATE_FORMAT}")
    return st


_RESUMABLE = ("level", "time_s", "iterations", "seed", "jobs", "feedback", "timeout_s", "pass_pool", "stages",
              "reduce", "reduce_tests", "stale_limit", "max_nodes", "harvest_every", "trace", "models",
              "known_crashes", "reduce_s", "save_every_s")


def _saved_options(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved FuzzOptions fields a resume takes (lists back to tuples); never plugins or out."""
    out: dict[str, Any] = {}
    for k in _RESUMABLE:
        if k in saved:
            v = saved[k]
            out[k] = tuple(str(x) for x in v) if isinstance(v, list) else v
    return out


def _rebudget(opts: FuzzOptions, spent: float, done: int, time_s: float | None, iterations: int | None,
              jobs: int | None, reduce: bool | None) -> FuzzOptions:
    """The resumed options: a new budget counts from the resume; without one, the saved budget's rest."""
    from dataclasses import replace

    changes: dict[str, Any] = {}
    if time_s is not None or iterations is not None:
        changes["time_s"] = spent + time_s if time_s is not None else None
        changes["iterations"] = done + iterations if iterations is not None else None
    if jobs is not None:
        changes["jobs"] = jobs
    if reduce is not None:
        changes["reduce"] = reduce
    return replace(opts, **changes)


def _restore(camp: Campaign, st: dict[str, Any], root: Path) -> None:
    """Counters, coverage, random state, corpus and findings from a saved campaign (cases re-checked)."""
    where = root / "state.json"
    try:
        camp.spent_s = float(st["spent_s"])
        camp.n = int(st["tests"])
        camp.resumed = int(st.get("resumed", 0)) + 1
        for name in ("tests_by_level", "busy_s", "statuses", "mutators", "productive"):
            counts = st.get(name, {})
            target = getattr(camp, "tests" if name == "tests_by_level" else name)
            for k, v in counts.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError(f"{name}[{k!r}] is not a number")
                target[str(k)] = v
        camp.coverage = Coverage.from_json(st["coverage"])
        rng = st["rng"]
        if not isinstance(rng, dict) or rng.get("bit_generator") != type(camp.rng.bit_generator).__name__:
            raise TypeError("rng is not a saved numpy PCG64 state")
        camp.rng.bit_generator.state = rng
        camp.timeline = [dict(t) for t in st.get("timeline", [])
                         if isinstance(t, dict) and all(isinstance(t.get(k), (int, float)) for k in
                                                        ("t", "tests", "coverage", "corpus", "findings"))]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise FuzzError(f"{where}: cannot continue from it ({type(e).__name__}: {e})") from None
    _restore_corpus(camp, root)
    _restore_findings(camp, st.get("findings", []), where)
    camp._seeded = True
    camp._written = {lv: len(v) for lv, v in camp.corpus.items()}


def _corpus_files(root: Path) -> list[tuple[str, int, Path]]:
    out = []
    for path in (root / "corpus").glob("*.json"):
        m = re.fullmatch(r"(graph|tir)-(\d{5,})\.json", path.name)
        if m:
            out.append((m.group(1), int(m.group(2)), path))
    return sorted(out)


def _restore_corpus(camp: Campaign, root: Path) -> None:
    """The saved corpus, in order; an entry that does not check out is left out and counted."""
    from kiln.fuzz.findings import MAX_TEXT

    tir: list[tuple[int, Entry]] = []
    for level, _i, path in _corpus_files(root):
        try:
            if path.stat().st_size > MAX_TEXT:
                raise FuzzError(f"larger than {MAX_TEXT} bytes")
            doc = json.loads(path.read_text())
            case = clean_case(level, doc["case"], str(path))
            added = int(doc.get("added", 0))
            if level == "graph":
                GraphCase.from_json(case).graph()
        except Exception:  # noqa: BLE001 - unreadable, tampered or unparsable: not a corpus entry
            camp.refused[level] = camp.refused.get(level, 0) + 1
            continue
        entry = Entry(level, case, max(added, 0), case["origin"])
        if level == "tir":
            tir.append((len(camp.corpus["tir"]), entry))
        camp.corpus[level].append(entry)
    bad = {i for (i, _), why in zip(tir, check_in_child([e.case["func"] for _, e in tir], camp.opts.timeout_s))
           if why is not None}
    if bad:
        camp.corpus["tir"] = [e for i, e in enumerate(camp.corpus["tir"]) if i not in bad]
        camp.refused["tir"] = camp.refused.get("tir", 0) + len(bad)
    for level in ("graph", "tir"):
        if camp.opts.level in (level, "both") and not camp.corpus[level]:
            raise FuzzError(f"--resume {root}: no usable {level} corpus entries in {root / 'corpus'}")


def _restore_findings(camp: Campaign, saved: Any, where: Path) -> None:
    """The saved findings (their cases checked like the corpus); FuzzError for a malformed one."""
    if not isinstance(saved, list):
        raise FuzzError(f"{where}: findings must be a list")
    tir_funcs: list[str] = []
    for i, d in enumerate(saved):
        try:
            level, fid = d["level"], d["id"]
            if level not in ("graph", "tir") or not isinstance(fid, str) or not _ID.fullmatch(fid):
                raise ValueError(f"level {str(level)[:20]!r} / id {str(fid)[:40]!r}")
            case = clean_case(level, d["case"], f"{where}: finding {i}")
            reduced = clean_case(level, d["reduced"], f"{where}: finding {i}") if d.get("reduced") else None
            outcome = Outcome.from_json(d["outcome"]).to_json()
            f = Finding(fid, level, outcome, case, reduced, int(d.get("count", 1)), float(d.get("first_s", 0)),
                        "", int(d.get("size_before", 0)), int(d.get("size_after", 0)))
            key = tuple(str(k) for k in d["key"])
        except FuzzError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise FuzzError(f"{where}: finding {i} is malformed ({type(e).__name__}: {e})") from None
        if level == "tir":
            tir_funcs += [case["func"]] + ([reduced["func"]] if reduced else [])
        camp.findings[key] = f
    for why in check_in_child(tir_funcs, camp.opts.timeout_s):
        if why is not None:
            raise FuzzError(f"{where}: a saved TIR finding does not load: {why}")


def model_graph(name: str) -> Any:
    """A seed graph from a model: a zoo name, ``light:<name>`` (with seeded random weights) or an .onnx
    path; symbolic dims bound by the zoo's example inputs, else to 1."""
    import warnings

    from kiln.codegen.build import specialize
    from kiln.compiler import bind_symbols, resolve_model

    model: Any = name
    if name.startswith("light:"):
        from kiln.bench import light_models, randomized_weights

        paths = light_models()
        if name[6:] not in paths:
            raise ValueError(f"--models {name}: no light model {name[6:]!r}; there are {', '.join(paths)}")
        import onnx

        model = randomized_weights(onnx.load(paths[name[6:]]))
    res = resolve_model(model)
    example = res.example_inputs
    if example is not None and not isinstance(example, dict):
        example = {v.name: np.asarray(a) for v, a in zip(res.graph.inputs, example)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return specialize(res.graph, bind_symbols(res.graph, example or {}))


def _write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``: a temporary file in the same folder, then renamed over it."""
    text = json.dumps(data, indent=1, default=_json_default)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def run_campaign(opts: FuzzOptions, progress: Callable[[dict[str, Any]], None] | None = None) -> Campaign:
    """Run a campaign to its budget and reduce its findings; with ``opts.out``, the folder is checked
    before anything runs and kept up to date as the campaign goes (see :meth:`Campaign.run`)."""
    camp = Campaign(opts, progress)
    camp.run()
    if opts.out:
        camp.save(final=True)
    return camp


def iter_finding_dirs(path: str | os.PathLike) -> Iterable[Path]:
    """Finding folders under ``path``: the folder itself when it holds finding.json, else its findings."""
    p = Path(path)
    if (p / "finding.json").exists():
        yield p
        return
    for sub in (p / "findings", p):
        if sub.is_dir():
            found = sorted(d for d in sub.iterdir() if (d / "finding.json").exists())
            if found:
                yield from found
                return
