"""Named passes and the pipeline string that the CLI, the artifact manifest and the fuzzer speak.

A pass is a frozen dataclass with a ``name`` and typed options; a pipeline is
``"canonicalize,fold-conv-bn{mode=deploy},dce"``.  :func:`run_pipeline_report`
runs the passes in order under :class:`Instruments`: verify after each pass,
time and op-count delta per pass, an IR dump per pass (``NNN_<pass>.ir``) and,
on demand, an interpreter check per pass that names the first pass whose
outputs diverge.  A failure names the pass and the passes that ran before it.

Each pass records in its :class:`PassLog` what it rewrote and every candidate
match it refused, with the reason (``kiln opt --explain``).  Most passes are
:class:`RewritePass` subclasses: ``match`` (structure), ``check`` (the reason
to refuse, or None) and ``rewrite``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node
from kiln.ir.verify import VerifyError, verify

from ..runtime.errors import Error

__all__ = ["DEFAULT_PIPELINE", "Instruments", "Pass", "PassError", "PassLog", "PassRecord", "PipelineError",
           "PipelineResult", "Refusal", "RewritePass", "check_order", "format_pipeline", "parse_pipeline", "random_inputs",
           "register_pass", "registered_passes", "run_pipeline", "run_pipeline_report"]

DEFAULT_PIPELINE = "fuse-qlinear,canonicalize,fold-conv-bn,hoist-views,sink-views,dce,fuse-blocks"


class PipelineError(Error, ValueError):
    """A pipeline string that does not parse, or names an unknown pass or option."""


class PassError(Error, RuntimeError):
    """A pass that failed or left an invalid graph."""


@dataclass(frozen=True)
class Pass(ABC):
    """Base of every pass: subclasses set ``name`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    # Whether the pass leaves a fuse-blocks partition valid; only such passes may follow fuse-blocks.
    keeps_blocks: ClassVar[bool] = False
    # False for passes that change the numbers by design (quantization): the per-pass numeric check and the
    # fuzzer take such a pass's output as the new reference instead of comparing it with the old one.
    exact: ClassVar[bool] = True

    @abstractmethod
    def apply(self, graph: Graph, log: PassLog) -> Graph:
        """Rewrite ``graph`` (in place or anew) and return it; record rewrites and refusals in ``log``."""

    def __str__(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in _PASSES:
        raise ValueError(f"pass {cls.__name__}: name {cls.name!r} is empty or taken")
    _PASSES[cls.name] = cls
    return cls


PASS_MODULES = ("kiln.passes.conv_bn", "kiln.passes.views", "kiln.passes.norm", "kiln.passes.fusion", "kiln.passes.qdq",
               "kiln.passes.reparam", "kiln.passes.weight_only", "kiln.passes.qlinear")


def _load_pass_modules() -> None:
    """Import every pass family once, so its passes register themselves."""
    import importlib

    for mod in PASS_MODULES:
        importlib.import_module(mod)


def registered_passes() -> dict[str, type[Pass]]:
    _load_pass_modules()
    return dict(_PASSES)


_ITEM = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _convert(cls: type[Pass], key: str, raw: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise PipelineError(f"pass {cls.name!r} has no option {key!r}; options: {sorted(fields) or 'none'}")
    kind = type(fields[key].default) if fields[key].default is not dataclasses.MISSING else str
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        return kind(raw)
    except ValueError:
        raise PipelineError(f"pass {cls.name!r} option {key!r}: expected {kind.__name__}, got {raw!r}") from None


def parse_pipeline(text: str) -> list[Pass]:
    """``"a,b{k=v}"`` -> pass instances; unknown names and options are errors that list what exists."""
    _load_pass_modules()
    passes: list[Pass] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"pipeline {text!r}: cannot parse at column {pos}: {text[pos:]!r}")
        name, opts = m.group(1), m.group(2)
        if name not in _PASSES:
            raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_PASSES))}")
        cls = _PASSES[name]
        kwargs = {}
        for item in filter(None, (s.strip() for s in (opts or "").split(","))):
            key, sep, raw = item.partition("=")
            if not sep:
                raise PipelineError(f"pass {name!r}: option {item!r} must be key=value")
            kwargs[key.strip()] = _convert(cls, key.strip(), raw.strip())
        try:
            passes.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise PipelineError(f"pass {name!r}: {e}") from None
        pos = m.end()
    check_order(passes)
    return passes


def check_order(passes: list[Pass]) -> None:
    """PipelineError when a pass that rewrites the graph follows fuse-blocks (it would break the partition
    codegen compiles; found by the fuzzer as a verifier failure after such a pass)."""
    fused = False
    for p in passes:
        if fused and not p.keeps_blocks:
            raise PipelineError(
                f"pass {str(p)!r} comes after fuse-blocks: fuse-blocks partitions the final graph into "
                f"kernels and a rewrite after it would break that partition; put fuse-blocks last "
                f"(only {', '.join(sorted(n for n, c in _PASSES.items() if c.keeps_blocks))} may follow it)")
        fused = fused or p.name == "fuse-blocks"


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(str(p) for p in passes)


@dataclass(frozen=True)
class Refusal:
    """A candidate match a pass refused: the pass, where (a value or node name) and why."""

    pass_name: str
    at: str
    reason: str

    def __str__(self) -> str:
        return f"{self.pass_name} at %{self.at}: {self.reason}"


@dataclass
class PassLog:
    """What one pass did: each rewrite (where, what) and each refused match (where, why)."""

    pass_name: str
    rewrites: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    def rewrote(self, at: str, what: str) -> None:
        self.rewrites.append((at, what))

    def refuse(self, at: str, reason: str) -> None:
        r = Refusal(self.pass_name, at, reason)
        if r not in self.refusals:
            self.refusals.append(r)


@dataclass(frozen=True)
class RewritePass(Pass):
    """A pass written as pattern + check + rewrite, applied once to every node that matches.

    ``match`` looks at structure only and returns a match object (or None);
    ``check`` returns None or the reason the match is refused (seen with
    ``--explain``); ``rewrite`` changes the graph and says what it did.  Nodes
    removed by an earlier rewrite are skipped.
    """

    @abstractmethod
    def match(self, graph: Graph, node: Node) -> Any | None:
        """The match object for ``node`` (structure only), or None."""

    def check(self, graph: Graph, m: Any) -> str | None:
        return None

    @abstractmethod
    def rewrite(self, graph: Graph, m: Any) -> str:
        """Change the graph for an accepted match and say what was done."""

    def where(self, m: Any) -> str:
        node = m if isinstance(m, Node) else getattr(m, "node", None)
        return node.outputs[0].name if node is not None and node.outputs else "?"

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue
            m = self.match(graph, node)
            if m is None:
                continue
            at = self.where(m)
            reason = self.check(graph, m)
            if reason is not None:
                log.refuse(at, reason)
            else:
                log.rewrote(at, self.rewrite(graph, m))
        return graph


@dataclass
class PassRecord:
    """One row of the per-pass table: timing, node counts, op-count delta, the log, the numeric check."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]
    log: PassLog
    max_error: float | None = None

    @property
    def delta_text(self) -> str:
        return " ".join(f"{op}{n:+d}" for op, n in sorted(self.op_delta.items())) or "-"


@dataclass(frozen=True)
class Instruments:
    """What the pass manager does around every pass (all on in tests; dump and check on demand).

    ``check_each_pass`` runs the interpreter on ``check_inputs`` (seeded random
    inputs when None) before the first pass and after every pass, and fails at
    the first pass whose outputs leave ``check_tolerance`` (per output dtype
    from :mod:`kiln.codegen.tolerance` when None).
    """

    verify: bool = True
    dump_ir: Path | None = None
    check_each_pass: bool = False
    check_inputs: Mapping[str, np.ndarray] | None = None
    check_tolerance: Any = None
    seed: int = 0


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord]

    @property
    def refusals(self) -> list[Refusal]:
        return [r for rec in self.records for r in rec.log.refusals]


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input: standard normal floats, integers in [0, 8), random bools."""
    from kiln.ir.types import is_static_dim

    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.inputs:
        shape = [d if is_static_dim(d) else 1 for d in v.type.shape]
        dt = v.type.np_dtype
        if dt.kind == "b":
            feeds[v.name] = rng.integers(0, 2, shape).astype(dt)
        elif dt.kind in "iu":
            feeds[v.name] = rng.integers(0, 8, shape).astype(dt)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def _max_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], tolerance: Any) -> tuple[float, str | None]:
    """The largest error relative to each output's magnitude, and the first output outside tolerance."""
    from kiln.codegen.tolerance import for_dtype

    worst, bad = 0.0, None
    for (name, w), g in zip(want.items(), got.values()):
        w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
        if w64.shape != g64.shape:
            return float("inf"), f"output {name!r} changed shape {list(w64.shape)} -> {list(g64.shape)}"
        finite = np.isfinite(w64)
        if not np.array_equal(finite, np.isfinite(g64)):
            return float("inf"), f"output {name!r} gained or lost NaN/Inf"
        if not finite.any():
            continue
        scale = max(float(np.abs(w64[finite]).max()), 1e-30)
        err = float(np.abs(g64[finite] - w64[finite]).max()) / scale
        worst = max(worst, err)
        tol = tolerance or for_dtype(np.asarray(w).dtype)
        if bad is None and not np.allclose(g64[finite], w64[finite], rtol=tol.rtol, atol=tol.atol + tol.rtol * scale):
            bad = f"output {name!r} differs by {err:.3g} of its magnitude (rtol {tol.rtol:g}, atol {tol.atol:g})"
    return worst, bad


def _outputs(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from kiln.ir.interpret import interpret

    res = interpret(graph, dict(feeds))
    return {v.name: res[v.name] for v in graph.outputs}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {op: after.get(op, 0) - before.get(op, 0) for op in before.keys() | after.keys()
            if after.get(op, 0) != before.get(op, 0)}


def _dump(directory: Path, index: int, name: str, graph: Graph) -> None:
    from kiln.ir.text import print_graph

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{index:03d}_{name}.ir"
    tmp = path.with_suffix(".ir.tmp")
    tmp.write_text(print_graph(graph))
    os.replace(tmp, path)


def run_pipeline_report(graph: Graph, pipeline: str | list[Pass], instruments: Instruments | None = None,
                        on_pass: Callable[[Pass, Graph], None] | None = None) -> PipelineResult:
    """Run the passes in order under ``instruments``; returns the graph and one record per pass.

    A pass that raises, leaves an invalid graph or (with ``check_each_pass``)
    changes the outputs is reported as :class:`PassError` naming it and the
    passes that ran before it.
    """
    ins = instruments or Instruments()
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    check_order(passes)
    feeds = want = None
    if ins.check_each_pass:
        feeds = dict(ins.check_inputs) if ins.check_inputs is not None else random_inputs(graph, ins.seed)
        want = _outputs(graph, feeds)
    if ins.dump_ir is not None:
        _dump(Path(ins.dump_ir), 0, "input", graph)
    done: list[str] = []
    records: list[PassRecord] = []
    for i, p in enumerate(passes, 1):
        after = ", ".join(done) or "nothing"
        before, n_before = graph.op_counts(), len(graph.nodes)
        log = PassLog(p.name)
        t0 = time.perf_counter()
        try:
            graph = p.apply(graph, log)
            if ins.verify:
                verify(graph)
        except VerifyError as e:
            raise PassError(f"pass {p} left an invalid graph (after: {after}): {e}") from e
        except Exception as e:  # noqa: BLE001 - re-raised with the pass named
            raise PassError(f"pass {p} failed (after: {after}): {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t0
        rec = PassRecord(str(p), seconds, n_before, len(graph.nodes), _delta(before, graph.op_counts()), log)
        if ins.dump_ir is not None:
            _dump(Path(ins.dump_ir), i, p.name, graph)
        if feeds is not None and want is not None:
            try:
                got = _outputs(graph, feeds)
            except Exception as e:  # noqa: BLE001
                raise PassError(f"pass {p} left a graph the interpreter cannot run (after: {after}): "
                                f"{type(e).__name__}: {e}") from e
            rec.max_error, bad = _max_error(got, want, ins.check_tolerance)
            if not p.exact:
                want = got
            elif bad:
                raise PassError(f"pass {p} changed the model's outputs (after: {after}): {bad}")
        records.append(rec)
        done.append(str(p))
        if on_pass:
            on_pass(p, graph)
    return PipelineResult(graph, records)


def run_pipeline(graph: Graph, pipeline: str | list[Pass], instruments: Instruments | None = None,
                 on_pass: Callable[[Pass, Graph], None] | None = None) -> Graph:
    """Run the passes in order, verifying after each; returns the rewritten graph."""
    return run_pipeline_report(graph, pipeline, instruments, on_pass).graph


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Constant folding, no-op removal and the canonical-op patterns (frontend/canonicalize.py)."""

    name: ClassVar[str] = "canonicalize"

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        from kiln.frontend.canonicalize import canonicalize_with_report

        graph, report = canonicalize_with_report(graph)
        for name, n in sorted(report.rewrites.items()):
            log.rewrote(name, f"{n} match(es)")
        for r in report.refusals:
            log.refuse(r.at, f"{r.pattern}: {r.reason}")
        return graph


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes and constants that no output depends on."""

    name: ClassVar[str] = "dce"
    keeps_blocks: ClassVar[bool] = True  # a dead block's members are dead too, so blocks stay whole

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        removed = graph.dce()
        if removed:
            log.rewrote("graph", f"removed {removed} dead nodes/constants")
        return graph
