"""Named passes and the pipeline string that the CLI, the artifact manifest and the fuzzer speak.

A pass is a frozen dataclass with a ``name`` and typed options; a pipeline is
``"canonicalize,fold-conv-bn{mode=deploy},dce"``.  :func:`run_pipeline` runs
the passes in order and verifies the graph after each one, naming the pass
that broke it and the passes that ran before.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from kiln.ir.graph import Graph
from kiln.ir.verify import VerifyError, verify

__all__ = ["DEFAULT_PIPELINE", "Pass", "PassError", "PipelineError", "format_pipeline", "parse_pipeline",
           "register_pass", "registered_passes", "run_pipeline"]

DEFAULT_PIPELINE = "canonicalize,dce"


class PipelineError(ValueError):
    """A pipeline string that does not parse, or names an unknown pass or option."""


class PassError(RuntimeError):
    """A pass that failed or left an invalid graph."""


@dataclass(frozen=True)
class Pass:
    """Base of every pass: subclasses set ``name`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""

    def apply(self, graph: Graph) -> Graph:
        raise NotImplementedError

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


def registered_passes() -> dict[str, type[Pass]]:
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
        passes.append(cls(**kwargs))
        pos = m.end()
    return passes


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(str(p) for p in passes)


def run_pipeline(graph: Graph, pipeline: str | list[Pass],
                 on_pass: Callable[[Pass, Graph], None] | None = None) -> Graph:
    """Run the passes in order, verifying after each; returns the rewritten graph."""
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    done: list[str] = []
    for p in passes:
        try:
            graph = p.apply(graph)
            verify(graph)
        except VerifyError as e:
            raise PassError(f"pass {p} left an invalid graph (after: {', '.join(done) or 'nothing'}): {e}") from e
        except Exception as e:  # noqa: BLE001 - re-raised with the pass named
            raise PassError(f"pass {p} failed (after: {', '.join(done) or 'nothing'}): "
                            f"{type(e).__name__}: {e}") from e
        done.append(str(p))
        if on_pass:
            on_pass(p, graph)
    return graph


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Constant folding, no-op removal and the canonical-op patterns (frontend/canonicalize.py)."""

    name: ClassVar[str] = "canonicalize"

    def apply(self, graph: Graph) -> Graph:
        from kiln.frontend.canonicalize import canonicalize

        return canonicalize(graph)


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes and constants that no output depends on."""

    name: ClassVar[str] = "dce"

    def apply(self, graph: Graph) -> Graph:
        graph.dce()
        return graph
