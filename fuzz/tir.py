"""The TIR level of kiln's Tzer-style fuzzer: PrimFunc mutators, TVM pass sequences and the TIR oracle.

A case is a PrimFunc plus a sequence of TVM TIR passes run before the
mandatory lowering tail.  The PrimFunc travels and is saved as TVM's
structured serialization (``tvm.ir.save_json``), never as TVMScript: parsing
TVMScript (``tvm.script.from_source``) evaluates Python, so a corpus entry or a
finding read from disk could run code.  :func:`load_func` reads the JSON after
:func:`check_func_json` has refused anything but a PrimFunc made of TIR nodes
whose calls are pure math intrinsics (no ``call_extern``, packed calls, LLVM
intrinsics or raw pointers); the TVMScript beside a finding is a copy for
people and is never read back.  TVM's JSON loader can crash on a damaged file,
so data read from disk is first loaded in a worker process (:func:`kiln.fuzz.
worker.check_in_child`).

Seeds are the PrimFuncs kiln's codegen emits; :func:`mutate_func` applies one
Tzer mutation (insert, delete, flip, wrap in loops / conditions / allocations
/ attributes / asserts, wrap an expression in a select, load from a buffer in
scope) at a site picked with weight by subtree size; :func:`mutate_passes` and
:func:`crossover_passes` evolve the pass sequence.  :func:`run_case` is the
oracle: reference build (TVM's default CPU pipeline) against the mutated
pipeline on seeded random inputs, in sentinel-guarded oversized buffers
(out-of-bounds writes), with a determinism check (reads of uninitialized
memory are invalid tests, not bugs).  :func:`reduce_case` shrinks a failing
case by delta debugging.

TVM 0.27 exposes no Python IR functor, so the walker here is a small table of
node types: their child fields and how to rebuild them.
"""

from __future__ import annotations

import json
import os
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import PrimType
from tvm.ir.expr import Call, StringImm, TensorLoad

from kiln.fuzz.worker import set_stage
from kiln.runtime.errors import Error

__all__ = [
    "case_inputs",
    "pass_pool",
    "CRASHING_PASSES", "MUTATORS", "PASS_POOL", "SAFE_OPS", "SAFE_PASS_POOL", "MutationFailed", "TirCase",
    "TirOutcome", "UnsafeTir", "case_from_kernel", "check_func_json", "crossover_passes", "dump_func",
    "load_func", "make_pass", "mutate_case", "mutate_func", "mutate_passes", "reduce_case", "run_case",
    "seed_cases", "tir_features", "uninitialized_reads",
]

MAX_PASSES = 20
GUARD = 64  # guard elements on each side of every buffer
_ALIGN = 128  # byte alignment of the real window (TVM assumes aligned buffers)
MAX_FUNC_JSON = 8 << 20  # bytes: kiln's largest seed kernel is ~60 KB of JSON

# --------------------------------------------------------------------------- cases


class UnsafeTir(Error, ValueError):
    """A saved TIR function that kiln refuses to load: not TVM JSON of a PrimFunc, or it calls out."""


@dataclass
class TirCase:
    """Everything needed to reproduce a TIR test: the PrimFunc as TVM JSON, the pass names, the input seed."""

    func: str
    passes: list[str] = field(default_factory=list)
    seed: int = 0
    origin: str = ""

    @classmethod
    def of(cls, func: tirx.PrimFunc, passes: Sequence[str] = (), seed: int = 0, origin: str = "") -> TirCase:
        return cls(dump_func(func), list(passes), int(seed), origin)

    def prim_func(self) -> tirx.PrimFunc:
        return load_func(self.func)

    @cached_property
    def script(self) -> str:
        """TVMScript for people (findings, reports); never parsed back."""
        return self.prim_func().script()


@dataclass
class TirOutcome:
    """What :func:`run_case` saw: a status, a normalized message and site, and the coverage signals."""

    status: str
    message: str = ""
    error_site: str = ""
    changed_passes: set[str] = field(default_factory=set)
    features: set[str] = field(default_factory=set)
    detail: dict[str, Any] = field(default_factory=dict)


class MutationFailed(Exception):
    """No site fits the chosen mutator (or every attempt produced an unprintable function)."""


# Calls a saved function may make: TVM's pure math and bit intrinsics and loop control. Everything
# else (call_extern, call_pure_extern, packed calls, LLVM/SPIR-V intrinsics, address_of, raw
# pointer arithmetic, profiling hooks, GPU builtins) could reach outside the function when built.
SAFE_OPS: frozenset[str] = frozenset((
    "prim.ceil", "prim.clz", "prim.if_then_else", "prim.likely", "prim.log2", "tirx.acos", "tirx.acosh",
    "tirx.asin", "tirx.asinh", "tirx.assume", "tirx.atan", "tirx.atan2", "tirx.atanh", "tirx.break_loop",
    "tirx.continue_loop", "tirx.copysign", "tirx.cos", "tirx.cosh", "tirx.erf", "tirx.exp", "tirx.exp10",
    "tirx.exp2", "tirx.fabs", "tirx.floor", "tirx.fma", "tirx.fmod", "tirx.hypot", "tirx.ignore_loop_partition",
    "tirx.isfinite", "tirx.isinf", "tirx.isnan", "tirx.ldexp", "tirx.log", "tirx.log10", "tirx.log1p",
    "tirx.nearbyint", "tirx.nextafter", "tirx.popcount", "tirx.pow", "tirx.q_multiply_shift",
    "tirx.q_multiply_shift_per_axis", "tirx.reinterpret", "tirx.round", "tirx.rsqrt", "tirx.sigmoid",
    "tirx.sin", "tirx.sinh", "tirx.sqrt", "tirx.tan", "tirx.tanh", "tirx.trunc",
))
_PLAIN_TYPES = frozenset(("None", "bool", "int", "float", "ffi.Array", "ffi.Map", "ffi.String", "ffi.Shape"))
_NODE_NAMESPACES = ("ir.", "prim.", "tirx.", "s_tir.")
_DENIED_TYPES = frozenset(("ir.GlobalVar", "ir.IRModule", "ir.Op"))  # ir.Op is checked by name below


def _type_allowed(t: str) -> bool:
    if t in _PLAIN_TYPES:
        return True
    if t.startswith("relax."):  # only the type annotations TVM 0.27 attaches to TIR buffers and params
        return t.endswith("Type") or t == "relax.expr.ShapeExpr"
    return t.startswith(_NODE_NAMESPACES) and t not in _DENIED_TYPES


def check_func_json(text: str, what: str = "TIR function") -> None:
    """Refuse (:class:`UnsafeTir`) TVM JSON that is not one PrimFunc of TIR nodes calling only SAFE_OPS.

    Reads the JSON with Python's json module and builds no TVM object, so a
    hostile file cannot get past it to TVM's loader or, later, to LLVM.
    """
    if len(text) > MAX_FUNC_JSON:
        raise UnsafeTir(f"{what}: {len(text)} bytes of JSON; the limit is {MAX_FUNC_JSON}")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UnsafeTir(f"{what}: not JSON ({e})") from None
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    root = doc.get("root_index") if isinstance(doc, dict) else None
    if not isinstance(nodes, list) or not isinstance(root, int) or not 0 <= root < len(nodes):
        raise UnsafeTir(f"{what}: expected TVM JSON (root_index, nodes), got {type(doc).__name__} "
                        f"without them")
    types: list[str] = []
    for i, node in enumerate(nodes):
        t = node.get("type") if isinstance(node, dict) else None
        if not isinstance(t, str):
            raise UnsafeTir(f"{what}: node {i} has no type")
        if t == "ir.Op":
            if node.get("data") not in SAFE_OPS:
                raise UnsafeTir(f"{what}: node {i} calls {str(node.get('data'))[:80]!r}, which a fuzz case "
                                f"may not call (allowed: TVM's pure math intrinsics)")
        elif not _type_allowed(t):
            raise UnsafeTir(f"{what}: node {i} is a {t[:80]!r}, which is not a TIR node")
        types.append(t)
    if types[root] != "tirx.PrimFunc":
        raise UnsafeTir(f"{what}: expected a tirx.PrimFunc at the root, got {types[root][:80]!r}")
    for i, (t, node) in enumerate(zip(types, nodes)):
        if t == "ir.Call":
            op = node.get("data", {}).get("op") if isinstance(node.get("data"), dict) else None
            if not isinstance(op, int) or not 0 <= op < len(nodes) or types[op] != "ir.Op":
                raise UnsafeTir(f"{what}: call node {i} does not call a TVM intrinsic")


def dump_func(func: tirx.PrimFunc) -> str:
    """A PrimFunc as TVM's JSON (the form cases travel and are saved in)."""
    return tvm.ir.save_json(func)


def load_func(text: str) -> tirx.PrimFunc:
    """TVM JSON -> the PrimFunc, after :func:`check_func_json` (never evaluates Python).

    Cached by text (TVM IR is immutable): pass-sequence mutants and reductions reuse the same function.
    """
    return _load(text)


@lru_cache(maxsize=128)
def _load(text: str) -> tirx.PrimFunc:
    check_func_json(text)
    obj = tvm.ir.load_json(text)
    if not isinstance(obj, tirx.PrimFunc):
        raise UnsafeTir(f"TIR function: TVM loaded a {type(obj).__name__}, not a PrimFunc")
    return obj


def _from_trusted_source(script: str) -> tirx.PrimFunc:
    """TVMScript -> PrimFunc, for the literals in this module only: parsing TVMScript runs Python."""
    obj = tvm.script.from_source(script)
    if isinstance(obj, tvm.IRModule):
        obj = obj[obj.get_global_vars()[0]]
    return obj


def _func_name(func: tirx.PrimFunc) -> str:
    attrs = func.attrs
    name = attrs.get("global_symbol") if attrs is not None else None
    return str(name) if name else "main"


# --------------------------------------------------------------------------- pass pool

# name -> candidate argument strings ("" = the pass takes no argument)
_PASS_ARGS: dict[str, tuple[str, ...]] = {
    "tirx.NarrowDataType": ("32", "16", "64"),
    "tirx.VectorizeLoop": ("1", "0"),
    "tirx.FP8ComputeLegalize": ("float32", "float16"),
    "s_tir.CompactBufferAllocation": ("1", "0"),
    "s_tir.HoistIfThenElse": ("", "basic"),
    "s_tir.ThreadSync": ("shared", "global", "warp"),
}

PASS_POOL: tuple[str, ...] = tuple(
    [f"tirx.{n}" for n in (
        "AnnotateEntryFunc", "BF16ComputeLegalize", "BF16StorageLegalize", "CommonSubexprElim", "ConvertSSA",
        "FP8ComputeLegalize", "FP8StorageLegalize", "FlattenBuffer", "ForceNarrowIndexToInt32",
        "InlinePrivateFunctions", "LowerIntrin", "NarrowDataType", "PointerValueTypeRewrite", "RemoveAssume",
        "RemoveNoOp", "SkipAssert", "StmtSimplify", "StorageRewrite", "UnrollLoop", "VectorizeLoop",
        "VerifyMemory")]
    + [f"s_tir.{n}" for n in (
        "AnnotateIrregularLoop", "CanonicalizeLoop", "CompactBufferAllocation", "ConvertBlocksToOpaque",
        "ConvertSSA", "HoistExpression", "HoistIfThenElse", "InjectDoubleBuffer", "InjectPermutedLayout",
        "InjectSoftwarePipeline", "InjectVirtualThread", "InstrumentBoundCheckers", "LiftThreadBinding",
        "LoopPartition", "LowerAutoCopy", "LowerCrossThreadReduction", "LowerInitBlock", "LowerMatchBuffer",
        "LowerOpaqueBlock", "ManifestSharedMemoryLocalStage", "MergeSharedMemoryAllocations",
        "PlanAndUpdateBufferAllocationLocation", "RemoveStoreUndef", "RemoveWeightLayoutRewriteBlock",
        "RenormalizeSplitPattern", "RewriteUnsafeSelect", "StmtSimplify", "ThreadSync", "TransformMmaBufferLayout",
        "UnifyThreadBinding", "UseAssumeToReduceBranches", "VerifyVTCMLimit")]
)


# Passes seen to segfault the process in TVM 0.27 (findings, kept in PASS_POOL for the campaign's
# crash-isolating workers); SAFE_PASS_POOL leaves them out for in-process use such as tests.
CRASHING_PASSES: dict[str, str] = {
    "tirx.NarrowDataType": "segfaults (tvm::ObjectVisitor) on un-lowered SBlock TIR, e.g. kiln's scheduled matmul",
}
SAFE_PASS_POOL: tuple[str, ...] = tuple(p for p in PASS_POOL if p not in CRASHING_PASSES)


def pass_pool(known_crashes: bool = False) -> tuple[str, ...]:
    """The passes a campaign draws from: without the known-crashing ones (fuzz/FINDINGS.md) unless asked,
    so a known TVM bug does not eat the campaign's time in worker restarts."""
    return PASS_POOL if known_crashes else SAFE_PASS_POOL


def make_pass(spec: str) -> tvm.transform.Pass:
    """``"ns.Name"`` or ``"ns.Name:arg"`` -> the TVM pass object (arguments parsed per pass)."""
    name, _, arg = spec.partition(":")
    ns, _, short = name.partition(".")
    module = {"tirx": tirx.transform, "s_tir": s_tir.transform}.get(ns)
    if module is None or not short or not hasattr(module, short):
        raise ValueError(f"unknown pass {spec!r}")
    ctor = getattr(module, short)
    if name == "tirx.NarrowDataType":
        return ctor(int(arg or 32))
    if name in ("tirx.VectorizeLoop", "s_tir.CompactBufferAllocation"):
        return ctor(arg != "0")
    if name == "tirx.FP8ComputeLegalize":
        return ctor(arg or "float32")
    if name == "s_tir.HoistIfThenElse":
        return ctor(arg or None)
    if name == "s_tir.ThreadSync":
        return ctor(arg or "shared")
    return ctor()


def _random_pass(rng: np.random.Generator, pool: Sequence[str] = PASS_POOL) -> str:
    name = pool[int(rng.integers(len(pool)))]
    args = _PASS_ARGS.get(name)
    if not args:
        return name
    arg = args[int(rng.integers(len(args)))]
    return f"{name}:{arg}" if arg else name


def mutate_passes(passes: list[str], rng: np.random.Generator, pool: Sequence[str] = PASS_POOL) -> list[str]:
    """One evolutionary edit of a pass sequence: add, delete, replace, swap, duplicate a run or re-draw one."""
    out = list(passes)
    ops = ["add", "add", "replace", "swap", "delete", "dup-run", "fresh"] if out else ["add", "fresh"]
    op = ops[int(rng.integers(len(ops)))]
    if op == "add":
        out.insert(int(rng.integers(len(out) + 1)), _random_pass(rng, pool))
    elif op == "replace":
        out[int(rng.integers(len(out)))] = _random_pass(rng, pool)
    elif op == "swap" and len(out) > 1:
        i, j = rng.choice(len(out), 2, replace=False)
        out[i], out[j] = out[j], out[i]
    elif op == "delete":
        i = int(rng.integers(len(out)))
        del out[i:i + int(rng.integers(1, 3))]
    elif op == "dup-run":
        i = int(rng.integers(len(out)))
        j = min(len(out), i + int(rng.integers(1, 4)))
        out[j:j] = out[i:j]
    else:
        out = [_random_pass(rng, pool) for _ in range(int(rng.integers(1, 6)))]
    if out == passes:
        out.insert(int(rng.integers(len(out) + 1)), _random_pass(rng, pool))
    return out[:MAX_PASSES]


def crossover_passes(a: list[str], b: list[str], rng: np.random.Generator) -> list[str]:
    """One-point, two-point or uniform crossover of two pass sequences (length ≤ MAX_PASSES)."""
    if not a or not b:
        return list(a or b)[:MAX_PASSES]
    kind = int(rng.integers(3))
    if kind == 0:
        out = a[:int(rng.integers(len(a) + 1))] + b[int(rng.integers(len(b) + 1)):]
    elif kind == 1:
        i, j = sorted(int(x) for x in rng.integers(0, len(a) + 1, 2))
        k = int(rng.integers(len(b) + 1))
        out = a[:i] + b[k:k + (j - i)] + a[j:]
    else:
        n = max(len(a), len(b))
        out = [(a if rng.random() < 0.5 else b)[i] for i in range(n) if i < len(a) and i < len(b)]
        out += (a if len(a) > len(b) else b)[len(out):]
    return out[:MAX_PASSES]


# --------------------------------------------------------------------------- the IR walker

_ARITH = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Mod, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max)
_CMP = (tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE)
_LOGIC = (tirx.And, tirx.Or)
_BITS = (tirx.BitwiseAnd, tirx.BitwiseOr, tirx.BitwiseXor, tirx.LShift, tirx.RShift)
_BINARY = _ARITH + _CMP + _LOGIC + _BITS
_SBlock, _SBlockRealize = s_tir.SBlock, s_tir.SBlockRealize


def _bin(n: Any, g: Callable[[str], Any]) -> Any:
    return type(n)(g("a"), g("b"))


def _for(n: Any, g: Callable[[str], Any]) -> Any:
    return tirx.For(n.loop_var, g("min"), g("extent"), n.kind, g("body"), n.thread_binding, n.annotations, n.step)


def _sblock(n: Any, g: Callable[[str], Any]) -> Any:
    return _SBlock(list(n.iter_vars), list(n.reads), list(n.writes), n.name_hint, g("body"), g("init"),
                   list(n.alloc_buffers), list(n.match_buffers), n.annotations)


def _assert(cond: Any, kind: Any, parts: list[Any]) -> Any:
    """An AssertStmt (0.27's Python wrapper passes its arguments to the FFI constructor in the wrong order)."""
    return tirx._ffi_api.AssertStmt(cond, kind, parts, None)


# type -> (child fields, rebuild(node, get_field))
_SPECS: dict[type, tuple[tuple[str, ...], Callable[[Any, Callable[[str], Any]], Any]]] = {
    **{c: (("a", "b"), _bin) for c in _BINARY},
    tirx.Not: (("a",), lambda n, g: tirx.Not(g("a"))),
    tirx.Cast: (("value",), lambda n, g: tirx.Cast(n.ty, g("value"))),
    tirx.Select: (("condition", "true_value", "false_value"),
                  lambda n, g: tirx.Select(g("condition"), g("true_value"), g("false_value"))),
    TensorLoad: (("indices",), lambda n, g: tirx.BufferLoad(n.source, list(g("indices")))),
    Call: (("args",), lambda n, g: Call(n.op, list(g("args")), n.attrs, n.ty_args, ret_ty=n.ty)),
    tirx.Ramp: (("base", "stride"), lambda n, g: tirx.Ramp(g("base"), g("stride"), n.lanes)),
    tirx.Broadcast: (("value",), lambda n, g: tirx.Broadcast(g("value"), n.lanes)),
    tirx.Let: (("value", "body"), lambda n, g: tirx.Let(n.var, g("value"), g("body"))),
    tirx.SeqStmt: (("seq",), lambda n, g: tirx.SeqStmt(list(g("seq")))),
    tirx.For: (("min", "extent", "body"), _for),
    tirx.IfThenElse: (("condition", "then_case", "else_case"),
                      lambda n, g: tirx.IfThenElse(g("condition"), g("then_case"), g("else_case"))),
    tirx.BufferStore: (("value", "indices"), lambda n, g: tirx.BufferStore(n.buffer, g("value"), list(g("indices")))),
    tirx.Evaluate: (("value",), lambda n, g: tirx.Evaluate(g("value"))),
    tirx.AttrStmt: (("value", "body"), lambda n, g: tirx.AttrStmt(n.node, n.attr_key, g("value"), g("body"))),
    tirx.AssertStmt: (("condition",), lambda n, g: _assert(g("condition"), n.error_kind, list(n.message_parts))),
    tirx.Bind: (("value",), lambda n, g: tirx.Bind(n.var, g("value"))),
    tirx.While: (("condition", "body"), lambda n, g: tirx.While(g("condition"), g("body"))),
    _SBlockRealize: (("iter_values", "predicate", "block"),
                     lambda n, g: _SBlockRealize(list(g("iter_values")), g("predicate"), g("block"))),
    _SBlock: (("body", "init"), _sblock),
}


def _is_node(x: Any) -> bool:
    return isinstance(x, (tvm.ir.expr.Expr, tirx.Stmt))


def _is_seq(x: Any) -> bool:
    return not _is_node(x) and not isinstance(x, (str, bytes)) and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def _children(node: Any) -> Iterator[tuple[tuple[str, int | None], Any]]:
    """(slot, child) for every IR child of ``node``; a slot is (field, index in a list field or None)."""
    spec = _SPECS.get(type(node))
    if spec is None:
        return
    for name in spec[0]:
        val = getattr(node, name)
        if val is None:
            continue
        if _is_seq(val):
            for i, c in enumerate(val):
                if _is_node(c):
                    yield (name, i), c
        elif _is_node(val):
            yield (name, None), val


def _with_child(node: Any, slot: tuple[str, int | None], new: Any) -> Any:
    """``node`` rebuilt with the child at ``slot`` replaced by ``new`` (None drops a list element)."""
    fields, build = _SPECS[type(node)]
    name, idx = slot

    def get(f: str) -> Any:
        val = getattr(node, f)
        if f != name:
            return val
        if idx is None:
            return new
        items = list(val)
        if new is None:
            del items[idx]
        else:
            items[idx] = new
        return items

    return build(node, get)


Path = tuple[tuple[str, int | None], ...]


@dataclass
class _Site:
    path: Path
    node: Any
    size: int
    scope: tuple[Any, ...]  # loop / block iteration vars in scope (innermost last)


def _sites(root: Any) -> list[_Site]:
    """Every node under ``root`` in pre-order, with its path, subtree size and the loop vars in scope."""
    out: list[_Site] = []

    def visit(node: Any, path: Path, scope: tuple[Any, ...]) -> int:
        site = _Site(path, node, 1, scope)
        out.append(site)
        inner = scope
        if isinstance(node, tirx.For):
            inner = scope + (node.loop_var,)
        elif isinstance(node, _SBlock):  # a non-opaque block sees only its own iteration vars
            inner = tuple(iv.var for iv in node.iter_vars)
        size = 1
        for slot, child in _children(node):
            size += visit(child, path + (slot,), inner if slot[0] in ("body", "init", "block") else scope)
        site.size = size
        return size

    visit(root, (), ())
    return out


def _get(root: Any, path: Path) -> Any:
    node = root
    for name, idx in path:
        node = getattr(node, name)
        if idx is not None:
            node = node[idx]
    return node


def _replace(root: Any, path: Path, new: Any) -> Any:
    """``root`` with the node at ``path`` replaced by ``new`` (ancestors rebuilt)."""
    if not path:
        return new
    child = _get(root, path[:1])
    return _with_child(root, path[0], _replace(child, path[1:], new))


def _dtype(node: Any) -> str | None:
    ty = getattr(node, "ty", None)
    if isinstance(ty, PrimType):
        return str(ty.dtype)
    return None


def _is_expr(node: Any) -> bool:
    return isinstance(node, tvm.ir.expr.Expr) and _dtype(node) is not None


def _scalar(dtype: str | None) -> bool:
    return dtype is not None and "x" not in dtype and dtype not in ("handle", "void")


# --------------------------------------------------------------------------- features

def tir_features(func: tirx.PrimFunc) -> set[str]:
    """Structural features: parent→child node-type edges with the child's dtype, loop kinds, intrinsics, scopes."""
    feats: set[str] = set()
    for site in _sites(func.body):
        node = site.node
        pname = type(node).__name__
        for _slot, child in _children(node):
            feats.add(f"edge:{pname}>{type(child).__name__}:{_dtype(child) or '-'}")
        if isinstance(node, tirx.For):
            feats.add(f"for:{tirx.ForKind(int(node.kind)).name.lower()}")
            if node.annotations:
                feats.update(f"for-ann:{k}" for k in node.annotations)
        elif isinstance(node, Call):
            feats.add(f"call:{getattr(node.op, 'name', type(node.op).__name__)}")
        elif isinstance(node, tirx.AttrStmt):
            feats.add(f"attr:{node.attr_key}")
        elif isinstance(node, (tirx.AllocBuffer, tirx.DeclBuffer)):
            feats.add(f"{pname}:{node.buffer.dtype}:{node.buffer.scope()}")
        elif isinstance(node, _SBlock):
            feats.update(f"sblock-alloc:{b.scope()}" for b in node.alloc_buffers)
            feats.add(f"sblock:iters{min(len(node.iter_vars), 4)}:init{int(node.init is not None)}")
    return feats


# --------------------------------------------------------------------------- IR mutators

def _pick(sites: Sequence[_Site], rng: np.random.Generator) -> _Site:
    """Tzer's site choice: weight by subtree size."""
    if not sites:
        raise MutationFailed("no site fits")
    w = np.array([s.size for s in sites], dtype=float)
    return sites[int(rng.choice(len(sites), p=w / w.sum()))]


def _const(dtype: str, rng: np.random.Generator) -> Any:
    if dtype == "bool":
        return tirx.IntImm("bool", int(rng.integers(2)))
    if dtype.startswith(("int", "uint")):
        return tirx.IntImm(dtype, int(rng.integers(0 if dtype.startswith("u") else -3, 8)))
    return tirx.FloatImm(dtype, float(rng.choice([0.0, 1.0, -1.0, 0.5, 2.0, 3.0, -0.25])))


def _cond(scope: Sequence[Any], rng: np.random.Generator) -> Any:
    """A random boolean: a comparison of an in-scope int var with a small constant, or a constant."""
    ivars = [v for v in scope if _dtype(v) and _dtype(v).startswith("int")]
    if ivars and rng.random() < 0.8:
        v = ivars[int(rng.integers(len(ivars)))]
        cmp = _CMP[int(rng.integers(len(_CMP)))]
        return cmp(v, tirx.IntImm(_dtype(v), int(rng.integers(0, 6))))
    return tirx.IntImm("bool", int(rng.random() < 0.7))


def _rand_expr(dtype: str, leaves: Sequence[Any], rng: np.random.Generator, depth: int = 2) -> Any:
    """Tzer's Insertor: a random type-correct expression from ``leaves`` (same dtype) and constants."""
    if depth == 0 or rng.random() < 0.3:
        same = [x for x in leaves if _dtype(x) == dtype]
        return same[int(rng.integers(len(same)))] if same and rng.random() < 0.6 else _const(dtype, rng)
    if dtype == "bool":
        ops: tuple[Any, ...] = _LOGIC
    elif dtype.startswith("float"):
        ops = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Min, tirx.Max)
    else:
        ops = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Min, tirx.Max, tirx.FloorDiv, tirx.FloorMod)
    op = ops[int(rng.integers(len(ops)))]
    return op(_rand_expr(dtype, leaves, rng, depth - 1), _rand_expr(dtype, leaves, rng, depth - 1))


def _expr_sites(body: Any, pred: Callable[[_Site], bool] = lambda s: True) -> list[_Site]:
    return [s for s in _sites(body) if _is_expr(s.node) and _scalar(_dtype(s.node)) and pred(s)]


_STMT_SKIP = (tirx.Bind, tirx.AllocBuffer, tirx.DeclBuffer, tirx.AssertStmt)


def _stmt_sites(body: Any) -> list[_Site]:
    """Statements a wrapper may enclose (not flat binders, whose scope wrapping would end)."""
    return [s for s in _sites(body) if isinstance(s.node, tirx.Stmt) and not isinstance(s.node, _STMT_SKIP)
            and not isinstance(s.node, _SBlock)]


def _subvars(node: Any) -> list[Any]:
    return [s.node for s in _sites(node) if isinstance(s.node, tirx.Var) and _scalar(_dtype(s.node))]


def _substitute(node: Any, var: Any, value: Any) -> Any:
    """``node`` with every use of ``var`` replaced by ``value`` (TVM 0.27 has no Python Substitute)."""
    uses = [s.path for s in _sites(node) if isinstance(s.node, tirx.Var) and s.node.same_as(var)]
    for path in reversed(uses):
        node = _replace(node, path, value)
    return node


def _m_insert(body: Any, rng: np.random.Generator) -> Any:
    site = _pick(_expr_sites(body), rng)
    dt = _dtype(site.node)
    extra = _rand_expr(dt, _subvars(site.node) + list(site.scope), rng)
    if dt == "bool":
        new = _LOGIC[int(rng.integers(2))](site.node, extra)
    else:
        ops = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Max, tirx.Min)
        new = ops[int(rng.integers(len(ops)))](site.node, extra)
    return _replace(body, site.path, new)


def _m_delete(body: Any, rng: np.random.Generator) -> Any:
    """Deletor: replace a node with a compatible child (same dtype for exprs; a body for statements)."""
    cands: list[tuple[_Site, Any]] = []
    for s in _sites(body):
        node = s.node
        if _is_expr(node):
            cands += [(s, c) for _slot, c in _children(node) if _dtype(c) == _dtype(node)]
        elif isinstance(node, tirx.SeqStmt) and len(node.seq) > 1:
            keep = list(node.seq)
            i = int(rng.integers(len(keep)))
            rest = keep[:i] + keep[i + 1:]
            cands.append((s, rest[0] if len(rest) == 1 else tirx.SeqStmt(rest)))
        elif isinstance(node, tirx.For):
            cands.append((s, _substitute(node.body, node.loop_var, node.min)))
        elif isinstance(node, (tirx.AttrStmt, tirx.While)):
            cands.append((s, node.body))
        elif isinstance(node, tirx.IfThenElse):
            cands.append((s, node.then_case))
            if node.else_case is not None:
                cands.append((s, node.else_case))
    if not cands:
        raise MutationFailed("delete: no node with a compatible child")
    w = np.array([s.size for s, _ in cands], dtype=float)
    site, child = cands[int(rng.choice(len(cands), p=w / w.sum()))]
    return _replace(body, site.path, child)


def _m_flip_const(body: Any, rng: np.random.Generator) -> Any:
    site = _pick([s for s in _sites(body) if isinstance(s.node, (tirx.IntImm, tirx.FloatImm))], rng)
    node, dt = site.node, _dtype(site.node)
    if dt == "bool":
        new = tirx.IntImm("bool", 1 - int(node.value))
    elif isinstance(node, tirx.IntImm):
        v = int(node.value)
        v = [v + 1, v - 1, -v][int(rng.integers(3))]
        if dt.startswith("uint"):
            v = abs(v)
        new = tirx.IntImm(dt, v)
    else:
        v = float(node.value)
        new = tirx.FloatImm(dt, [v + 1.0, v - 1.0, -v, v * 0.5][int(rng.integers(4))])
    if tvm_ffi.structural_equal(new, node):
        raise MutationFailed("flip-const: no change")
    return _replace(body, site.path, new)


def _m_swap_binop(body: Any, rng: np.random.Generator) -> Any:
    site = _pick([s for s in _sites(body) if type(s.node) in _BINARY], rng)
    group = next(g for g in (_ARITH, _CMP, _LOGIC, _BITS) if type(site.node) in g)
    others = [c for c in group if c is not type(site.node)]
    dt = _dtype(site.node.a)
    if dt and dt.startswith("float"):
        others = [c for c in others if c not in (tirx.Mod, tirx.FloorDiv, tirx.FloorMod) + _BITS]
    new = others[int(rng.integers(len(others)))](site.node.a, site.node.b)
    return _replace(body, site.path, new)




def _registered(names: Sequence[str]) -> tuple[str, ...]:
    """The names whose ``tirx.<name>`` operator exists in this TVM build."""
    ok = []
    for n in names:
        try:
            tvm.ir.Op.get("tirx." + n)
        except Exception:  # noqa: BLE001 - not registered in this build
            continue
        ok.append(n)
    return tuple(ok)


_UNARY = _registered(("exp", "log", "sqrt", "tanh", "sin", "cos", "fabs", "floor", "ceil", "round", "trunc", "erf",
                      "exp2", "log2", "rsqrt", "sigmoid", "nearbyint", "log1p", "atan", "exp10", "log10", "sinh",
                      "cosh", "asin", "acos", "tan"))
_BINARY_INTRIN = _registered(("pow", "fmod", "atan2", "hypot", "copysign", "nextafter"))


def _intrin_name(node: Any) -> str:
    name = getattr(getattr(node, "op", None), "name", "")
    return name[5:] if name.startswith("tirx.") else ""


def _m_swap_intrin(body: Any, rng: np.random.Generator) -> Any:
    sites = [s for s in _sites(body) if isinstance(s.node, Call) and _intrin_name(s.node) in _UNARY + _BINARY_INTRIN]
    if not sites:
        # no intrinsic yet: wrap a float expression in one (an insertion of a call)
        fsites = _expr_sites(body, lambda s: _dtype(s.node).startswith("float"))
        site = _pick(fsites, rng)
        op = tvm.ir.Op.get("tirx." + _UNARY[int(rng.integers(len(_UNARY)))])
        return _replace(body, site.path, Call(op, [site.node], ret_ty=site.node.ty))
    site = _pick(sites, rng)
    pool = _UNARY if _intrin_name(site.node) in _UNARY else _BINARY_INTRIN
    name = pool[int(rng.integers(len(pool)))]
    if name == _intrin_name(site.node):
        name = pool[(pool.index(name) + 1) % len(pool)]
    new = Call(tvm.ir.Op.get("tirx." + name), list(site.node.args), ret_ty=site.node.ty)
    return _replace(body, site.path, new)


def _m_permute(body: Any, rng: np.random.Generator) -> Any:
    """Flipper: swap the operands of a binary op, the branches of a select, or two call arguments."""
    sites = [s for s in _sites(body) if type(s.node) in _BINARY or isinstance(s.node, tirx.Select)
             or (isinstance(s.node, Call) and len(s.node.args) >= 2
                 and len({_dtype(a) for a in s.node.args}) == 1 and _intrin_name(s.node))]
    site = _pick(sites, rng)
    n = site.node
    if type(n) in _BINARY:
        new = type(n)(n.b, n.a)
    elif isinstance(n, tirx.Select):
        new = tirx.Select(n.condition, n.false_value, n.true_value)
    else:
        args = list(n.args)
        args[0], args[1] = args[1], args[0]
        new = Call(n.op, args, n.attrs, n.ty_args, ret_ty=n.ty)
    return _replace(body, site.path, new)


_KINDS = (tirx.ForKind.SERIAL, tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED, tirx.ForKind.UNROLLED)


def _m_flip_loop(body: Any, rng: np.random.Generator) -> Any:
    """Flipper on loops: another loop kind (serial, parallel, vectorized, unrolled)."""
    site = _pick([s for s in _sites(body) if isinstance(s.node, tirx.For) and s.node.thread_binding is None], rng)
    n = site.node
    kinds = [k for k in _KINDS if int(k) != int(n.kind)]
    kind = kinds[int(rng.integers(len(kinds)))]
    new = tirx.For(n.loop_var, n.min, n.extent, kind, n.body, None, n.annotations, n.step)
    return _replace(body, site.path, new)


_counter = [0]


def _fresh(prefix: str) -> str:
    _counter[0] += 1
    return f"{prefix}{_counter[0]}"


def _m_wrap_for(body: Any, rng: np.random.Generator) -> Any:
    """Wrap a statement in 1–3 nested loops of random kinds (and sometimes an unroll pragma)."""
    site = _pick(_stmt_sites(body), rng)
    stmt = site.node
    for _ in range(int(rng.integers(1, 4))):
        v = tirx.Var(_fresh("fz_i"), "int32")
        kind = _KINDS[int(rng.integers(len(_KINDS)))]
        ext = int(rng.choice([1, 2, 3, 4, 8]))
        ann = {"pragma_auto_unroll_max_step": tirx.IntImm("int32", 16)} if rng.random() < 0.2 else None
        stmt = tirx.For(v, tirx.IntImm("int32", 0), tirx.IntImm("int32", ext), kind, stmt, None, ann)
    return _replace(body, site.path, stmt)


def _m_wrap_if(body: Any, rng: np.random.Generator) -> Any:
    site = _pick(_stmt_sites(body), rng)
    cond = _cond(site.scope, rng)
    other = site.node if rng.random() < 0.3 else None
    return _replace(body, site.path, tirx.IfThenElse(cond, site.node, other))


def _m_wrap_alloc(body: Any, rng: np.random.Generator) -> Any:
    """Wrap a statement in a fresh allocation with a store into it (Tzer's allocation wrapper)."""
    site = _pick(_stmt_sites(body), rng)
    dtype = str(rng.choice(["float32", "int32", "float32"]))
    n = int(rng.choice([1, 4, 16]))
    buf = tirx.decl_buffer((n,), dtype, _fresh("fz_buf"), scope=str(rng.choice(["global", "local"])))
    idx = tirx.IntImm("int32", int(rng.integers(n)))
    stores = [tirx.AllocBuffer(buf), tirx.BufferStore(buf, _const(dtype, rng), [idx]), site.node]
    if rng.random() < 0.5:  # and read it back after the statement (keeps the buffer alive)
        stores.append(tirx.Evaluate(tirx.BufferLoad(buf, [idx])))
    return _replace(body, site.path, tirx.SeqStmt(stores))


def _m_wrap_attr(body: Any, rng: np.random.Generator) -> Any:
    site = _pick(_stmt_sites(body), rng)
    key = str(rng.choice(["pragma_unroll_explicit", "pragma_auto_unroll_max_step", "pragma_fuzz", "storage_alignment"]))
    node = site.scope[-1] if site.scope and rng.random() < 0.5 else StringImm("fuzz")
    new = tirx.AttrStmt(node, key, tirx.IntImm("int32", int(rng.integers(0, 17))), site.node)
    return _replace(body, site.path, new)


def _m_wrap_assert(body: Any, rng: np.random.Generator) -> Any:
    """Put an assert (true on every path, so the run survives) before a statement."""
    site = _pick(_stmt_sites(body), rng)
    ivars = [v for v in site.scope if _dtype(v) == "int32"]
    cond = (tirx.GE(ivars[-1], tirx.IntImm("int32", 0)) if ivars and rng.random() < 0.7
            else tirx.IntImm("bool", 1))
    check = _assert(cond, StringImm("RuntimeError"), [StringImm("kiln fuzz assert")])
    return _replace(body, site.path, tirx.SeqStmt([check, site.node]))


def _m_wrap_select(body: Any, rng: np.random.Generator) -> Any:
    site = _pick(_expr_sites(body, lambda s: not isinstance(s.node, (tirx.Var, tirx.IntImm))), rng)
    dt = _dtype(site.node)
    other = _rand_expr(dt, _subvars(site.node) + [site.node], rng, 1)
    cond = _cond(site.scope, rng)
    new = tirx.Select(cond, site.node, other) if rng.random() < 0.5 else tirx.Select(cond, other, site.node)
    return _replace(body, site.path, new)


def _m_load(func: tirx.PrimFunc, body: Any, rng: np.random.Generator) -> Any:
    """Replace a value expression with an in-bounds load from a parameter buffer of the same dtype."""
    params = [p for p in func.params if hasattr(p, "shape") and hasattr(p, "dtype")]
    by_dtype: dict[str, list[Any]] = {}
    for b in params:
        by_dtype.setdefault(str(b.dtype), []).append(b)
    site = _pick(_expr_sites(body, lambda s: _dtype(s.node) in by_dtype and not isinstance(s.node, tirx.Var)), rng)
    cands = by_dtype[_dtype(site.node)]
    buf = cands[int(rng.integers(len(cands)))]
    ivars = [v for v in site.scope if _dtype(v) == "int32"]
    idx = []
    for d in buf.shape:
        ext = int(d) if isinstance(d, tirx.IntImm) else 1
        if ivars and rng.random() < 0.6:
            idx.append(tirx.FloorMod(ivars[int(rng.integers(len(ivars)))], tirx.IntImm("int32", ext)))
        else:
            idx.append(tirx.IntImm("int32", int(rng.integers(ext))))
    return _replace(body, site.path, tirx.BufferLoad(buf, idx))


_BODY_MUTATORS: dict[str, Callable[[Any, np.random.Generator], Any]] = {
    "ir-insert": _m_insert,
    "ir-delete": _m_delete,
    "ir-flip-const": _m_flip_const,
    "ir-swap-binop": _m_swap_binop,
    "ir-swap-intrin": _m_swap_intrin,
    "ir-permute": _m_permute,
    "ir-flip-loop": _m_flip_loop,
    "ir-wrap-for": _m_wrap_for,
    "ir-wrap-if": _m_wrap_if,
    "ir-wrap-alloc": _m_wrap_alloc,
    "ir-wrap-attr": _m_wrap_attr,
    "ir-wrap-assert": _m_wrap_assert,
    "ir-wrap-select": _m_wrap_select,
}
MUTATORS: tuple[str, ...] = (*_BODY_MUTATORS, "ir-load")


def _apply(name: str, func: tirx.PrimFunc, rng: np.random.Generator) -> tirx.PrimFunc:
    body = _m_load(func, func.body, rng) if name == "ir-load" else _BODY_MUTATORS[name](func.body, rng)
    return func.with_body(body)


def mutate_func(func: tirx.PrimFunc, rng: np.random.Generator, tries: int = 12) -> tuple[tirx.PrimFunc, str]:
    """One Tzer IR mutation of ``func``: a new function that differs, prints and round-trips through JSON.

    Mutators that find no site, build an ill-typed node (TVM's constructors
    check), or make a function :func:`check_func_json` refuses or TVM cannot
    print are retried with others, so every corpus entry can be saved and read back.
    """
    last = ""
    for _ in range(tries):
        name = MUTATORS[int(rng.integers(len(MUTATORS)))]
        try:
            new = _apply(name, func, rng)
            if tvm_ffi.structural_equal(new, func):
                raise MutationFailed("no change")
            back = load_func(dump_func(new))
            back.script()  # a finding keeps a TVMScript copy for people
        except Exception as e:  # noqa: BLE001 - a mutator that does not fit this function: try another
            last = f"{name}: {type(e).__name__}: {_one_line(str(e))}"
            continue
        return back, name
    raise MutationFailed(f"no mutator fit after {tries} tries (last: {last})")


def mutate_case(case: TirCase, rng: np.random.Generator, pool: Sequence[str] = PASS_POOL) -> tuple[TirCase, str]:
    """One joint mutation: the function (70%) or the pass sequence (30%); origin records the mutator."""
    if rng.random() < 0.3:
        passes, how = mutate_passes(list(case.passes), rng, pool), "passes-mutate"
        return TirCase(case.func, passes, case.seed, f"{case.origin}|{how}"), how
    func, how = mutate_func(case.prim_func(), rng)
    return TirCase.of(func, case.passes, int(rng.integers(1 << 30)), f"{case.origin}|{how}"), how


# --------------------------------------------------------------------------- seeds

_SEED_GRAPHS: dict[str, str] = {
    "matmul": """graph @g(%a: f32[4,8], %b: f32[8,6]) -> (%y) {
      %y = matmul(%a, %b) : f32[4,6]
    }""",
    "matmul_bias_relu": """graph @g(%a: f32[4,8], %b: f32[8,6], %c: f32[6]) -> (%y) {
      %m = matmul(%a, %b) : f32[4,6]
      %s = add(%m, %c) : f32[4,6]
      %y = relu(%s) : f32[4,6]
    }""",
    "conv": """graph @g(%x: f32[1,2,6,6], %w: f32[3,2,3,3]) -> (%y) {
      %y = conv(%x, %w) {pads=[1, 1, 1, 1]} : f32[1,3,6,6]
    }""",
    "softmax": """graph @g(%x: f32[2,4,8]) -> (%y) {
      %y = softmax(%x) {axis=-1} : f32[2,4,8]
    }""",
    "layer_norm": """graph @g(%x: f32[2,3,8], %s: f32[8], %b: f32[8]) -> (%y) {
      %y = layer_norm(%x, %s, %b) {axis=-1, epsilon=1e-5} : f32[2,3,8]
    }""",
    "ewise_chain": """graph @g(%x: f32[4,8], %z: f32[4,8]) -> (%y) {
      %a = add(%x, %z) : f32[4,8]
      %m = mul(%a, %x) : f32[4,8]
      %y = tanh(%m) : f32[4,8]
    }""",
    "reduce_mean": """graph @g(%x: f32[4,6,5]) -> (%y) {
      %y = reduce_mean(%x) {axes=[2], keepdims=1} : f32[4,6,1]
    }""",
}

_TRIVIAL = '''# from tvm.script import tirx as T

@T.prim_func
def trivial(A: T.Buffer((4,), "float32"), B: T.Buffer((4,), "float32")):
    for i in range(4):
        B[i] = A[i]
'''


def case_from_kernel(kernel: Any, seed: int = 0) -> TirCase:
    """Any kiln Kernel -> a case with its PrimFunc and an empty pass sequence."""
    return TirCase.of(kernel.func, [], int(seed), f"kernel:{kernel.name}")


@lru_cache(maxsize=1)
def _seed_scripts() -> tuple[tuple[str, str], ...]:
    from kiln.codegen.kernel import lower_block
    from kiln.ir.text import parse

    out: list[tuple[str, str]] = []
    for name, text in _SEED_GRAPHS.items():
        g = parse(text)
        for scheduled in (True, False):
            try:
                k = lower_block(g.nodes, _target(), name=f"k_{name}", schedule=scheduled)
            except Exception:  # noqa: BLE001 - a seed kiln cannot lower is skipped, not fatal
                continue
            out.append((f"kernel:{name}" + ("" if scheduled else ":unscheduled"), dump_func(k.func)))
    out.append(("kernel:trivial", dump_func(_from_trusted_source(_TRIVIAL))))
    return tuple(out)


def seed_cases(rng: np.random.Generator | int = 0) -> list[TirCase]:
    """PrimFuncs from kiln's codegen of small graphs (scheduled and not) plus a trivial func; no passes."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return [TirCase(func, [], int(gen.integers(1 << 30)), origin) for origin, func in _seed_scripts()]


# --------------------------------------------------------------------------- errors

_ADDR = re.compile(r"0x[0-9a-fA-F]+")
_NUMVAR = re.compile(r"\b([A-Za-z_]+?)_?\d+\b")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in (\S+))?')


def _one_line(text: str, limit: int = 300) -> str:
    text = _ADDR.sub("0x?", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "at "))] or lines
    msg = next((ln for ln in lines if "Check failed" in ln or "Error" in ln), lines[-1] if lines else "")
    return msg[:limit]


def _norm(text: str) -> str:
    return _NUMVAR.sub(r"\1_N", _ADDR.sub("0x?", text))


def _error(e: BaseException, stage: str) -> tuple[str, str]:
    """(normalized one-line message, error site) of a TVM / Python error."""
    kind = type(e).__name__
    text = str(e)
    msg = _norm(_one_line(f"{kind}: {text}"))
    frames = [(f.filename, f.name) for f in traceback.extract_tb(e.__traceback__)]
    frames += [(m.group(1), m.group(3) or "") for m in _FRAME.finditer(text)]
    frames = [f for f in frames if f[0].endswith((".cc", ".h", ".cpp"))]
    check = re.search(r"Check failed: \(?(.*?)\)? is false", text)
    where = ""
    if frames:
        file, func = frames[-1]
        where = f"{os.path.basename(file)}:{func.split('(')[0].split()[-1] if func else ''}"
    detail = _norm(check.group(1))[:80] if check else re.sub(r"\d+", "N", _norm(_one_line(text)))[:80]
    return msg, f"{stage}:{kind}@{where}:{detail}"


# --------------------------------------------------------------------------- building

@lru_cache(maxsize=1)
def _target() -> tvm.target.Target:
    from kiln.codegen.target import host_target

    return host_target()


@tvm.instrument.pass_instrument
class _Changed:
    """Records the names of passes whose output differs structurally from their input."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.changed: set[str] = set()
        self._stack: list[int] = []

    def run_before_pass(self, mod: tvm.IRModule, info: Any) -> None:
        set_stage("tir-pipeline" if self.prefix else "tir-build", self.prefix + str(info.name))
        self._stack.append(tvm_ffi.structural_hash(mod))

    def run_after_pass(self, mod: tvm.IRModule, info: Any) -> None:
        before = self._stack.pop() if self._stack else None
        name = str(info.name)
        if name in ("sequential", "_pipeline"):
            return
        if before != tvm_ffi.structural_hash(mod):
            self.changed.add(self.prefix + name)


def _build(func: tirx.PrimFunc, passes: Sequence[str], target: Any, inst: _Changed | None) -> Any:
    """Bind the target, run ``passes`` then the default pipeline (its lowering tail intact) and compile."""
    mod = tvm.IRModule({_func_name(func): func})
    instruments = [inst] if inst is not None else []
    with tvm.transform.PassContext(opt_level=3, instruments=instruments):
        if passes:
            mod = tirx.transform.BindTarget(tvm.target.Target(target).with_host(target))(mod)
            if inst is not None:
                inst.prefix = "pre:"
            mod = tvm.transform.Sequential([make_pass(p) for p in passes])(mod)
            if inst is not None:
                inst.prefix = ""
        return tvm.compile(mod, target=target)


class _PassError(Exception):
    """Wraps an exception raised by the mutated pass prefix (not by the tail)."""


# --------------------------------------------------------------------------- buffers and runs

_FILL = (0xA5, 0x5A)  # sentinel byte of the guards (and prefill of written buffers), per run


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]
    dtype: str
    written: bool


def _params(func: tirx.PrimFunc) -> list[_Param]:
    """The buffer parameters; ``written``: outputs (stored to before any load), which start from a fill."""
    written = set()
    for s in _sites(func.body):
        if isinstance(s.node, tirx.BufferStore):
            written.add(s.node.buffer.name)
        elif isinstance(s.node, _SBlock):
            written.update(r.buffer.name for r in s.node.writes if hasattr(r, "buffer"))
    written -= set(_reads_before_write(func, {str(p.name) for p in func.params}))
    out = []
    for p in func.params:
        if not hasattr(p, "shape"):
            raise TypeError(f"parameter {p} is not a buffer")
        shape = tuple(int(d) for d in p.shape)
        out.append(_Param(str(p.name), shape, str(p.dtype), str(p.name) in written))
    return out


def case_inputs(func: str, seed: int) -> dict[str, np.ndarray]:
    """The arrays a case's buffer parameters start from (saved beside a finding's reproducer)."""
    params = _params(load_func(func))
    return {p.name: a for p, a in zip(params, _inputs(params, seed))}


def _inputs(params: Sequence[_Param], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for p in params:
        dt = np.dtype(p.dtype)
        if dt.kind == "f":
            a = rng.standard_normal(p.shape).astype(dt)
        elif dt.kind == "b":
            a = rng.random(p.shape) < 0.5
        elif dt.kind == "u":
            a = rng.integers(0, 8, p.shape).astype(dt)
        else:
            a = rng.integers(-8, 8, p.shape).astype(dt)
        out.append(a)
    return out


def _guarded(p: _Param, data: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """(oversized aligned byte array filled with ``fill``, the real window as a typed view with ``data``)."""
    dt = np.dtype(p.dtype)
    n = int(np.prod(p.shape, dtype=np.int64))
    pad = GUARD * dt.itemsize
    pad += (-pad) % _ALIGN
    nbytes = n * dt.itemsize
    raw = np.empty(pad * 2 + nbytes + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    big = raw[off:off + pad * 2 + nbytes]
    big[:] = fill
    window = big[pad:pad + nbytes].view(dt).reshape(p.shape)
    if not p.written:
        window[...] = data
    return big, window


def _run(ex: Any, name: str, params: Sequence[_Param], inputs: Sequence[np.ndarray], fill: int
         ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Run once in guarded buffers: (every buffer's final contents, guard hits)."""
    bigs, wins = zip(*(_guarded(p, d, fill) for p, d in zip(params, inputs))) if params else ((), ())
    args = [tvm.runtime.from_dlpack(w) for w in wins]
    ex[name](*args)
    hits = []
    for p, big, w in zip(params, bigs, wins):
        pad = (len(big) - w.nbytes) // 2
        bad = np.flatnonzero(np.concatenate([big[:pad], big[pad + w.nbytes:]]) != fill)
        if bad.size:
            first = int(bad[0])
            side = "before" if first < pad else "after"
            hits.append({"buffer": p.name, "side": side, "byte": first - pad, "count": int(bad.size)})
    return [np.array(w, copy=True) for w in wins], hits


def _same_bits(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def _compare(params: Sequence[_Param], ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, Any] | None:
    """None when equal (ints exactly, floats within rtol 1e-4 / atol 1e-5 with NaNs in the same places)."""
    for p, r, g in zip(params, ref, got):
        if r.dtype.kind == "f":
            rn, gn = np.isnan(r), np.isnan(g)
            ok = np.array_equal(rn, gn) and np.allclose(np.where(rn, 0, r), np.where(gn, 0, g), rtol=1e-4, atol=1e-5)
            if not ok:
                with np.errstate(all="ignore"):
                    diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
                diff = np.where(np.isnan(diff), np.inf, diff)
                idx = np.unravel_index(int(np.argmax(diff)), r.shape) if r.size else ()
                return {"buffer": p.name, "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                        "index": [int(i) for i in idx], "expected": float(r[idx]), "actual": float(g[idx])}
        elif not np.array_equal(r, g):
            idx = np.argwhere(r != g)[0]
            return {"buffer": p.name, "index": [int(i) for i in idx], "expected": r[tuple(idx)].item(),
                    "actual": g[tuple(idx)].item()}
    return None


@lru_cache(maxsize=1)
def _scrubber() -> Any:
    """A tiny built function that fills stack and workspace memory with data (between determinism runs)."""
    src = '''# from tvm.script import tirx as T

@T.prim_func
def scrub(A: T.Buffer((64,), "float32"), B: T.Buffer((2,), "float32")):
    S = T.alloc_buffer((240,), "float32", scope="local")
    W = T.alloc_buffer((8192,), "float32")
    for i in range(240):
        S[i] = A[i % 64]
    for i in range(8192):
        W[i] = A[i % 64]
    B[0] = S[T.Cast("int32", B[1])]
    B[1] = W[T.Cast("int32", B[0]) % 64]
'''
    func = _from_trusted_source(src)
    return tvm.compile(tvm.IRModule({"scrub": func}), target=_target())


def _scrub(value: float) -> None:
    try:
        a = tvm.runtime.tensor(np.full(64, value, np.float32))
        b = tvm.runtime.tensor(np.zeros(2, np.float32))
        _scrubber()["scrub"](a, b)
    except Exception:  # noqa: BLE001 - the scrubber only makes nondeterminism visible; never fatal
        pass


def _reads_before_write(func: tirx.PrimFunc, tracked: set[str]) -> list[str]:
    """Buffers (allocations, plus the names in ``tracked``) loaded before any store to them, in program order."""
    allocated = set(tracked)
    stored: set[str] = set()
    bad: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tirx.AllocBuffer):
            allocated.add(str(node.buffer.name))
        elif isinstance(node, _SBlock):
            allocated.update(str(b.name) for b in node.alloc_buffers)
            if node.init is not None:
                visit(node.init)
            visit(node.body)
            return
        elif isinstance(node, TensorLoad):
            name = str(node.source.name)
            if name in allocated and name not in stored and name not in bad:
                bad.append(name)
        for _slot, child in _children(node):
            visit(child)
        if isinstance(node, tirx.BufferStore):
            stored.add(str(node.buffer.name))

    visit(func.body)
    return bad


def uninitialized_reads(func: tirx.PrimFunc) -> list[str]:
    """Allocated buffers loaded before any store to them, in program order (a static, approximate check).

    Garbage in a fresh allocation is often the same on every run (stack slots,
    LLVM ``undef``), so the determinism check alone misses such reads.
    """
    return _reads_before_write(func, set())


def _func_mutated(origin: str) -> bool:
    parts = origin.split("|")
    return parts[0].startswith("mutated") or any(p.startswith("ir-") for p in parts[1:])


# --------------------------------------------------------------------------- the oracle

def run_case(case: TirCase, target: Any = None, timeout_hint_s: float = 10.0) -> TirOutcome:
    """Build the reference and the mutated pipeline, run both on seeded inputs in guarded buffers, compare.

    Never raises: every failure becomes a status (see :class:`TirOutcome`).
    """
    try:
        return _run_case(case, target or _target())
    except Exception as e:  # noqa: BLE001 - the oracle's contract is to never raise
        msg, site = _error(e, "oracle")
        return TirOutcome("invalid", msg, site, detail={"stage": "oracle"})


def _run_case(case: TirCase, target: Any) -> TirOutcome:
    try:
        set_stage("tir-load")
        func = load_func(case.func)
    except Exception as e:  # noqa: BLE001
        msg, site = _error(e, "load")
        return TirOutcome("invalid", msg, site, detail={"stage": "load"})
    out = TirOutcome("ok", features=tir_features(func))
    name = _func_name(func)
    passes = list(case.passes)
    try:
        bad = [p for p in passes if p.partition(":")[0] not in PASS_POOL]
        if bad:
            raise ValueError(f"unknown passes {bad}")
        inst_ref = None if passes else _Changed()
        set_stage("tir-build")
        ref = _build(func, [], target, inst_ref)
        params = _params(func)
        inputs = _inputs(params, case.seed)
    except Exception as e:  # noqa: BLE001 - clean TVM error on the reference: an invalid test
        return _fail(out, "invalid", e, "reference-build")
    if inst_ref is not None:
        out.changed_passes = set(inst_ref.changed)
    uninit = uninitialized_reads(func)
    if uninit:
        out.status, out.message = "invalid", f"reads uninitialized allocation {uninit[0]}"
        out.error_site, out.detail = "static:uninitialized-read", {"stage": "reference-build", "buffers": uninit}
        return out
    set_stage("tir-run", "reference")
    try:
        ref_a, hits_a = _run(ref, name, params, inputs, _FILL[0])
        _scrub(3.25)
        ref_b, hits_b = _run(ref, name, params, inputs, _FILL[1])
    except Exception as e:  # noqa: BLE001
        return _fail(out, "invalid", e, "reference-run")
    if not _same_bits(ref_a, ref_b):
        diff = _compare(params, ref_a, ref_b) or {}
        out.status, out.message = "invalid", "reference is non-deterministic (reads uninitialized memory)"
        out.error_site, out.detail = "reference-run:nondeterministic", {"stage": "reference-run", **diff}
        return out
    if hits_a and not _func_mutated(case.origin):
        out.status, out.message = "oob", f"reference build writes outside buffer {hits_a[0]['buffer']}"
        out.error_site, out.detail = "reference-run:oob", {"stage": "reference-run", "oob": hits_a}
        return out
    if not passes:
        if hits_a:
            return _invalid_oob(out, hits_a)
        return out
    inst = _Changed()
    try:
        mut = _build(func, passes, target, inst)
    except Exception as e:  # noqa: BLE001 - the mutated sequence failed cleanly: coverage, maybe a bug
        out.changed_passes = set(inst.changed)
        return _fail(out, "pass-error", e, "mutated-build")
    out.changed_passes = set(inst.changed)
    set_stage("tir-run", "mutated")
    try:
        got, hits_m = _run(mut, name, params, inputs, _FILL[0])
    except Exception as e:  # noqa: BLE001 - reference ran, mutated raised at run time: a difference
        return _fail(out, "mismatch", e, "mutated-run")
    diff = _compare(params, ref_a, got)
    if hits_a and diff is None and hits_m == hits_a:
        return _invalid_oob(out, hits_a)
    if hits_m and hits_m != hits_a:
        out.status, out.message = "oob", f"mutated pipeline writes outside buffer {hits_m[0]['buffer']}"
        out.error_site, out.detail = "mutated-run:oob", {"stage": "mutated-run", "oob": hits_m, "ref_oob": hits_a}
        return out
    if diff is not None:
        out.status = "mismatch"
        out.message = f"mutated pipeline differs from reference on buffer {diff['buffer']}"
        out.error_site, out.detail = f"mismatch:{diff['buffer']}", {"stage": "mutated-run", **diff}
    return out


def _invalid_oob(out: TirOutcome, hits: list[dict[str, Any]]) -> TirOutcome:
    out.status, out.message = "invalid", f"mutated function writes outside buffer {hits[0]['buffer']}"
    out.error_site, out.detail = "reference-run:oob-mutated", {"stage": "reference-run", "oob": hits}
    return out


def _fail(out: TirOutcome, status: str, e: BaseException, stage: str) -> TirOutcome:
    out.status = status
    out.message, out.error_site = _error(e, stage)
    out.detail = {"stage": stage, "kind": type(e).__name__}
    return out


# --------------------------------------------------------------------------- reduction

def _ddmin(items: list[Any], test: Callable[[list[Any]], bool]) -> list[Any]:
    """Zeller's ddmin: a 1-minimal sublist of ``items`` on which ``test`` still holds."""
    n = 2
    while len(items) >= 2:
        chunk = max(1, len(items) // n)
        subsets = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        progress = False
        for i, sub in enumerate(subsets):
            comp = [x for j, s in enumerate(subsets) if j != i for x in s]
            if test(sub):
                items, n, progress = sub, 2, True
                break
            if len(subsets) > 2 and test(comp):
                items, n, progress = comp, max(n - 1, 2), True
                break
        if not progress:
            if n >= len(items):
                break
            n = min(len(items), n * 2)
    if len(items) == 1 and test([]):
        return []
    return items


def _simplifications(body: Any) -> Iterator[Any]:
    """Smaller bodies: drop a SeqStmt child, replace a For/Attr/While by its body, an If by a branch."""
    for s in _sites(body):
        node = s.node
        cands: list[Any] = []
        if isinstance(node, tirx.SeqStmt):
            seq = list(node.seq)
            cands += [tirx.SeqStmt(seq[:i] + seq[i + 1:]) if len(seq) > 2 else seq[1 - i]
                      for i in range(len(seq))] if len(seq) > 1 else []
        elif isinstance(node, tirx.For):
            cands.append(_substitute(node.body, node.loop_var, node.min))
        elif isinstance(node, (tirx.AttrStmt, tirx.While)):
            cands.append(node.body)
        elif isinstance(node, tirx.IfThenElse):
            cands += [node.then_case] + ([node.else_case] if node.else_case is not None else [])
        elif isinstance(node, tirx.Select):
            cands += [node.true_value, node.false_value]
        for c in cands:
            yield _replace(body, s.path, c)


def reduce_case(case: TirCase, still_fails: Callable[[TirCase], bool], max_tests: int = 300) -> TirCase:
    """Delta debugging: ddmin over the pass list, then greedy statement removal, keeping the failure."""
    budget = [max_tests]

    def check(c: TirCase) -> bool:
        if budget[0] <= 0:
            return False
        budget[0] -= 1
        try:
            return bool(still_fails(c))
        except Exception:  # noqa: BLE001 - a predicate that crashes on a candidate: not a reproducer
            return False

    passes = _ddmin(list(case.passes), lambda ps: check(replace(case, passes=ps)))
    best = replace(case, passes=passes)
    try:
        func = best.prim_func()
    except Exception:  # noqa: BLE001 - an unloadable function: only the passes can shrink
        return best
    progress = True
    while progress and budget[0] > 0:
        progress = False
        for body in _simplifications(func.body):
            try:
                cand_func = func.with_body(body)
                cand = replace(best, func=dump_func(cand_func))
            except Exception:  # noqa: BLE001 - a simplification TVM cannot serialize
                continue
            if check(cand):
                func, best, progress = cand_func, cand, True
                break
    return best
