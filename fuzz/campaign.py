"""The fuzzing campaign: Tzer's joint loop over graphs, pipelines and TIR, with coverage feedback.

Each worker slot follows one corpus entry: it mutates the entry's graph (or
TIR function) while mutants keep adding coverage (a mutant that does becomes
the slot's entry and joins the corpus), then, after ``stale_limit`` mutants
without new coverage, mutates the entry's pass pipeline the same way, then
picks another entry.  With ``feedback=False`` the same loop runs but coverage
never counts as new: mutants never join the corpus (the ablation baseline).
Findings are deduplicated by (symptom, stage, pass, normalized message),
reduced, and written one folder each with a one-command reproducer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from kiln.fuzz.coverage import Coverage
from kiln.fuzz.oracle import STAGES, GraphCase, Outcome
from kiln.fuzz.worker import Task, Worker, execute, wait_any

__all__ = ["Campaign", "Finding", "FuzzOptions", "parse_duration", "run_campaign"]

LEVELS = ("graph", "tir", "both")
# Bigger cases always reach more arcs, so unchecked feedback grows them (and slows every test):
# mutants above these sizes are tested but never kept (AFL trims for the same reason).
MAX_GRAPH_NODES = 24
MAX_TIR_LINES = 200


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1h"`` -> seconds."""
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise ValueError(f"duration {text!r}: expected a number with an optional s, m or h suffix") from None


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

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"--level {self.level!r}: expected one of {', '.join(LEVELS)}")
        if self.time_s is None and self.iterations is None:
            raise ValueError("a campaign needs --time or --iterations")
        if self.jobs < 0:
            raise ValueError(f"--jobs {self.jobs}: expected 0 (in-process) or more")


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
    """Reproducer size: graph nodes plus passes, or TIR statements plus passes."""
    if level == "graph":
        return len(GraphCase.from_json(case).graph().nodes) + len(case["passes"])
    return sum(1 for line in case["script"].splitlines() if line.strip()) + len(case["passes"])


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

    # ------------------------------------------------------------------ seeds
    def seed_corpus(self) -> None:
        """Seeds: generated graphs and the pattern graphs with random pipelines; kiln's kernels as TIR."""
        from kiln.fuzz.generate import seed_graphs
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
        from kiln.fuzz.tir import (
            TirCase,
            crossover_passes,
            mutate_func,
            mutate_passes,
            parse_func,
            pass_pool,
        )

        assert slot.entry is not None
        tc = TirCase(**slot.entry.case)
        if slot.phase == "graph":
            new, how = mutate_func(parse_func(tc.script), self.rng)
            out = TirCase(new.script(), list(tc.passes), int(self.rng.integers(1 << 30)), f"{tc.origin}|{how}")
        else:
            if self.rng.random() < 0.25 and len(self.corpus["tir"]) > 1:
                other = TirCase(**self._pick("tir").case)
                passes, how = crossover_passes(tc.passes, other.passes, self.rng), "passes-crossover"
            else:
                passes, how = mutate_passes(tc.passes, self.rng, pass_pool(self.opts.known_crashes)), "passes-mutate"
            out = TirCase(tc.script, passes, tc.seed, f"{tc.origin}|{how}")
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
            except Exception:  # noqa: BLE001 - MutationFailed, or a mutant TVM cannot print/parse
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
        self.timeline.append({"t": round(self.elapsed(), 3), "tests": self.n, "coverage": self.coverage.total,
                              "corpus": sum(len(v) for v in self.corpus.values()), "findings": len(self.findings)})
        if self.progress:
            self.progress(self.status())

    def _finding(self, level: str, case: dict[str, Any], out: Outcome) -> None:
        key = (level, *out.key)
        if key in self.findings:
            self.findings[key].count += 1
            return
        self.findings[key] = Finding(f"{out.symptom}-{out.stage}-{out.key_id}", level, out.to_json(), case,
                                     first_s=self.elapsed(), size_before=_size(level, case))

    # ------------------------------------------------------------------ loop
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

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
        """The loop: keep every worker busy until the budget is spent; then reduce and write findings."""
        self.seed_corpus()
        if self.opts.jobs == 0:
            self._run_inline()
        else:
            self._run_workers()
        self.seconds = self.elapsed()
        if self.opts.reduce:
            self.reduce_findings()

    def _run_inline(self) -> None:
        slots: dict[str, Slot] = {}
        while not self.done():
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
            self.t0 = time.monotonic()  # the budget counts tests, not worker start-up
            while True:
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
                f.size_before = _size(f.level, f.case)
                if f.outcome["symptom"] == "hang":  # each test would cost the timeout
                    f.reduced, f.size_after = f.case, f.size_before
                    continue
                f.reduced = reduce_finding(f.level, f.case, f.outcome, self.opts, worker)
                f.size_after = _size(f.level, f.reduced)
        finally:
            if worker:
                worker.close()

    def report(self) -> dict[str, Any]:
        per_level = {lv: {"tests": self.tests[lv], "busy_s": round(self.busy_s[lv], 2),
                          "tests_per_s": self.tests[lv] / self.busy_s[lv] if self.busy_s[lv] else 0.0}
                     for lv in ("graph", "tir") if self.tests[lv]}
        return {
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

    def write(self, out: str | os.PathLike) -> Path:
        """The output folder: corpus/, findings/<id>/, report.json, coverage.png (each file written atomically)."""
        from kiln.fuzz.findings import write_finding
        from kiln.fuzz.report import plot_coverage

        root = Path(out)
        (root / "corpus").mkdir(parents=True, exist_ok=True)
        for lv, entries in self.corpus.items():
            for i, e in enumerate(entries):
                _write_json(root / "corpus" / f"{lv}-{i:05d}.json", {"level": lv, "added": e.added, "case": e.case})
        fdir = root / "findings"
        if fdir.exists():
            shutil.rmtree(fdir)
        for f in self.findings.values():
            f.folder = str(write_finding(fdir / f.id, f))
        _write_json(root / "report.json", self.report())
        plot_coverage(self.timeline, root / "coverage.png",
                      title=f"kiln fuzz --level {self.opts.level}{'' if self.opts.feedback else ' --no-feedback'}")
        return root


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def run_campaign(opts: FuzzOptions, progress: Callable[[dict[str, Any]], None] | None = None) -> Campaign:
    """Run a campaign to its budget, reduce its findings and (with ``opts.out``) write its folder."""
    camp = Campaign(opts, progress)
    camp.run()
    if opts.out:
        camp.write(opts.out)
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
