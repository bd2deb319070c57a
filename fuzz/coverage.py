"""Coverage feedback without rebuilding TVM: kiln's own arcs, normalized error sites, a global map.

Tzer rebuilds TVM with trace-pc-guard; kiln cannot (the prebuilt TVM wheel's
Python glue shows the same lines on every build), so the fuzzer's coverage is
the union of cheap signals, each namespaced by its source:

- ``arc``: line-to-line arcs in kiln's own code (ir, passes, frontend, codegen,
  runtime, the ``kiln`` package), recorded by :class:`ArcTracer` with
  ``sys.settrace`` (Python 3.11 has no ``sys.monitoring``);
- ``feat``: structural features of graphs and TIR (other modules);
- ``tvm-pass``: TVM passes that changed the IR;
- ``err``: error sites (:func:`error_site`), so a new way to fail counts too.

An arc is one int, ``file_id << 32 | prev_line << 16 | line`` with ``file_id``
the CRC-32 of the file's module-relative path, so the same arc has the same int
in every worker process (arcs travel through JSON).  ``prev_line`` 0 is the
frame's entry, ``line`` 0 its exit.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from functools import lru_cache
from types import FrameType, TracebackType
from typing import Any

__all__ = ["ArcTracer", "Coverage", "arc_parts", "error_site", "kiln_module", "normalize_message",
           "trace_arcs"]

# Packages whose code is traced; kiln.fuzz is kiln but is excluded (the fuzzer's own loop
# would add the same arcs to every test).  Tests live outside these folders.
TRACED = ("kiln", "kiln.ir", "kiln.passes", "kiln.codegen", "kiln.frontend", "kiln.runtime")
UNTRACED = ("kiln.fuzz",)
LINE_MASK = 0xFFFF

TraceFn = Callable[[FrameType, str, Any], Any]


# ====================================================================== which files are kiln's

@lru_cache(maxsize=1)
def _roots() -> tuple[tuple[str, str, bool], ...]:
    """(folder + os.sep, package, traced) for kiln's packages, longest folder first.

    Found with ``find_spec`` so that nothing heavy (TVM behind ``kiln.codegen``) is imported.
    """
    roots = []
    for pkg, traced in [(p, True) for p in TRACED] + [(p, False) for p in UNTRACED]:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            roots.append((os.path.join(os.path.realpath(folder), ""), pkg, traced))
    return tuple(sorted(roots, key=lambda r: -len(r[0])))


@lru_cache(maxsize=4096)
def kiln_module(filename: str) -> tuple[str, bool] | None:
    """(dotted module, traced) of a kiln source file, or None for a foreign file."""
    if not filename.endswith(".py"):
        return None
    path = os.path.realpath(filename)
    for folder, pkg, traced in _roots():
        if path.startswith(folder):
            rel = path[len(folder):-3].replace(os.sep, ".")
            mod = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
            return mod, traced
    return None


@lru_cache(maxsize=4096)
def _file_id(filename: str) -> int:
    """The stable arc prefix of a traced kiln file; 0 for any other file."""
    mod = kiln_module(filename)
    if mod is None or not mod[1]:
        return 0
    return (zlib.crc32(mod[0].encode()) & 0x7FFFFFFF) or 1


def arc_parts(arc: int) -> tuple[int, int, int]:
    """(file_id, prev_line, line) of an arc int."""
    return arc >> 32, (arc >> 16) & LINE_MASK, arc & LINE_MASK


# ====================================================================== the tracer

class ArcTracer:
    """A ``sys.settrace`` tracer that records arcs in kiln's own code (this thread only).

    The global trace function returns None for frames of foreign files, so Python
    never line-traces numpy, TVM or the standard library; the decision is cached per
    file name (a code object's file decides it, and ``str`` caches its hash while a
    code object's hash is recomputed each time).  Entering saves whatever tracer was
    installed (pytest-cov, a debugger, an outer ArcTracer); leaving restores it.

    While tracing, arcs are kept per file as small ints (``prev << 16 | line``: no
    big-int arithmetic per line, which measured a third faster); :attr:`arcs` joins them.
    """

    def __init__(self) -> None:
        self.files: dict[int, str] = {}  # file id -> module, for reports
        self._by_file: dict[int, set[int]] = {}
        self._previous: TraceFn | None = None
        self._decided: dict[str, set[int] | None] = {}

    @property
    def arcs(self) -> set[int]:
        """Every arc hit so far, as ``file_id << 32 | prev_line << 16 | line``."""
        return {fid << 32 | x for fid, xs in self._by_file.items() for x in xs}

    def _decide(self, filename: str) -> set[int] | None:
        fid = _file_id(filename)
        if not fid:
            return None
        self.files[fid] = kiln_module(filename)[0]  # type: ignore[index]
        return self._by_file.setdefault(fid, set())

    def _global(self, frame: FrameType, event: str, arg: Any) -> TraceFn | None:
        filename = frame.f_code.co_filename
        try:
            arcs = self._decided[filename]
        except KeyError:
            arcs = self._decided[filename] = self._decide(filename)
        return None if arcs is None else _local(arcs.add)

    def __enter__(self) -> ArcTracer:
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)
        self._previous = None


def _local(add: Callable[[int], None]) -> TraceFn:
    """The line tracer of one kiln frame: adds (previous line -> line) arcs, and the exit arc."""
    prev = 0

    def trace(frame: FrameType, event: str, arg: Any) -> TraceFn:
        nonlocal prev
        if event == "line":
            line = frame.f_lineno & LINE_MASK
            add(prev | line)
            prev = line << 16
        elif event == "return":
            add(prev)
        return trace

    return trace


def trace_arcs(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[Any, set[int]]:
    """``fn(*args, **kw)`` under an :class:`ArcTracer`: (its result, or the exception it raised; the arcs)."""
    tracer = ArcTracer()
    try:
        with tracer:
            result: Any = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        result = e
    return result, tracer.arcs


# ====================================================================== error messages and sites

MAX_MESSAGE = 200
_DTYPES = re.compile(r"(?:b?float|u?int|bf|f|i|u|q)(?:4|8|16|32|64)(?:_e\dm\d(?:fnu?z?|fn)?)?|float\d+_e\dm\d\w*")
_TOKEN = re.compile(r"(?<![\w.])(?:0[xX][0-9a-fA-F]+|[A-Za-z_][\w.:]*|[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_CPP_EXT = (".cc", ".cpp", ".cxx", ".h", ".hpp", ".cu")
_CPP_FRAME = re.compile(r'File "([^"]+\.(?:cc|cpp|cxx|h|hpp|cu))", line (\d+)')
_CPP_SITE = re.compile(r"([\w./+-]+\.(?:cc|cpp|cxx|h|hpp|cu)):(\d+):")
_CHECK = re.compile(r"Check failed: (.*?) is false|Check failed: (.*?)\s*(?:: |:?$)", re.M)
_PATH = re.compile(r"(?<![\w.])(?:/[\w.+-]+)+/([\w.+-]+)|(?<![\w/.])(?:[\w.+-]+/)+([\w+-]+\.[A-Za-z]\w*)\b")
_NOISE = re.compile(r"^\s*(?:Traceback \(most recent call last\):|File \".*\", line \d+.*|\^+|~+|"
                    r"\d+: .*|During handling of the above exception.*|The above exception was the direct.*)$")


def _cpp_file(path: str) -> str:
    """A C++ source path as the part after its last ``src/`` (TVM's tree), else its basename."""
    _, sep, tail = path.rpartition("/src/")
    return tail if sep else os.path.basename(path)


def _number_token(m: re.Match[str]) -> str:
    tok = m.group(0)
    if tok[:2].lower() == "0x":
        return "0x#"
    if tok[0].isalpha() or tok[0] == "_":
        return tok if _DTYPES.fullmatch(tok) else re.sub(r"\d+(?=[.:]|$)", "#", tok)
    return "#"


def _normalize_text(text: str) -> str:
    text = _PATH.sub(lambda m: m.group(1) or m.group(2), text)
    return _TOKEN.sub(_number_token, text)


def _check_site(msg: str) -> str | None:
    """``file.cc:LINE: Check failed: cond`` (or the innermost C++ frame and the message's last line)."""
    frames = _CPP_FRAME.findall(msg)
    sites = _CPP_SITE.findall(msg)
    where = frames[-1] if frames else sites[-1] if sites else None
    check = _CHECK.search(msg)
    if where is None and check is None:
        return None
    site = f"{_cpp_file(where[0])}:{where[1]}: " if where else ""
    if check:
        return site + "Check failed: " + _normalize_text((check.group(1) or check.group(2) or "").strip())
    last = [ln for ln in msg.splitlines() if ln.strip() and not _NOISE.match(ln)]
    return site + _normalize_text(last[-1].strip() if last else "")


def normalize_message(msg: str) -> str:
    """One line of at most 200 chars that stays the same across runs of the same bug.

    Hex addresses become ``0x#``; numbers, and digits that end an identifier, become
    ``#`` (``%v12`` -> ``%v#``, ``[3, 4]`` -> ``[#, #]``; dtypes such as ``float32``
    are kept); paths keep their basename; a TVM check failure becomes its site,
    ``file.cc:LINE: Check failed: cond``; traceback frames are dropped.
    """
    site = _check_site(msg)
    if site is not None:
        return site[:MAX_MESSAGE]
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not _NOISE.match(ln)]
    text = " | ".join(lines)
    return re.sub(r"\s+", " ", _normalize_text(text)).strip()[:MAX_MESSAGE]


def _innermost(tb: TracebackType | None) -> tuple[str, str, int] | None:
    """(where, kind, line) of the innermost C++ frame or kiln frame of a traceback."""
    best: tuple[str, str, int] | None = None
    fallback: tuple[str, str, int] | None = None
    while tb is not None:
        code = tb.tb_frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        if code.co_filename.endswith(_CPP_EXT):
            best = (_cpp_file(code.co_filename), "cpp", tb.tb_lineno)
        elif (mod := kiln_module(code.co_filename)) is not None:
            if mod[1]:
                best = (f"{mod[0]}.{name}", "kiln", tb.tb_lineno)
            else:
                fallback = (f"{mod[0]}.{name}", "kiln", tb.tb_lineno)
        tb = tb.tb_next
    return best or fallback


def error_site(exc: BaseException) -> str:
    """``ExcType@module.function:line`` of the innermost kiln (or TVM C++) frame where it was raised.

    A chain of ``raise ... from e`` is followed to its first cause (the pass manager
    wraps a pass's error in PassError: the site is in the pass).  Without a usable
    traceback the TVM check site in the message is used, else ``ExcType@?``.
    """
    root = exc
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    where = _innermost(root.__traceback__)
    if where is not None:
        return f"{type(root).__name__}@{where[0]}:{where[2]}"
    site = _check_site(str(root))
    if site is not None:
        return f"{type(root).__name__}@{site.split(': ', 1)[0].rstrip(':')}"
    return f"{type(root).__name__}@?"


# ====================================================================== the global map

class Coverage:
    """The campaign's coverage map: the features seen so far, one set per source.

    A test "adds coverage" when :meth:`add` returns more than 0.  Features are
    strings or ints (arcs); :meth:`to_json` stores the sets as sorted lists.
    """

    def __init__(self) -> None:
        self._seen: dict[str, set[Hashable]] = {}

    def add(self, features: Iterable[Hashable], source: str) -> int:
        """Record the features; the number that were new."""
        seen = self._seen.setdefault(source, set())
        before = len(seen)
        seen.update(features)
        return len(seen) - before

    def would_add(self, features: Iterable[Hashable], source: str) -> int:
        """How many of the features :meth:`add` would count as new (nothing is recorded)."""
        seen = self._seen.get(source, set())
        return len({f for f in features if f not in seen})

    def __contains__(self, item: tuple[str, Hashable]) -> bool:
        source, feature = item
        return feature in self._seen.get(source, ())

    @property
    def total(self) -> int:
        return sum(len(s) for s in self._seen.values())

    @property
    def by_source(self) -> dict[str, int]:
        return {src: len(s) for src, s in sorted(self._seen.items())}

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_source": self.by_source,
                "features": {src: sorted(s, key=lambda f: (type(f).__name__, f))
                             for src, s in sorted(self._seen.items())}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Coverage:
        cov = cls()
        for src, feats in d.get("features", {}).items():
            cov.add((tuple(f) if isinstance(f, list) else f for f in feats), src)
        return cov
