"""Malformed-input fuzzing: every hostile or careless file ends in a result or a ``kiln.Error``.

``kiln fuzz --level inputs`` mutates valid inputs of four kinds and hands each
mutant to the public entry point that reads it:

- ``onnx``: ONNX models (zoo exports and tiny ones built here) after byte flips,
  truncation, insertion and protobuf edits through the onnx API (dims, dtypes,
  attributes, opsets, initializers, names, cycles, nested subgraphs, functions)
  -> ``lift`` (from a path or the bytes), ``ir.interpret`` on random inputs when
  it lifts, and ``kiln.compile`` for a sampled fraction;
- ``artifact``: ``.kiln`` files compiled once per campaign (cached under
  ``OUT/seeds``) after byte flips, truncation, zip member edits, manifest JSON
  edits and weight/npy edits, with member hashes recomputed or not
  -> ``kiln.load`` (``allow_unsigned=True`` where the API has it, so that cases
  reach the checks behind the signature; and without) and a run on valid inputs;
- ``calib``: calibration ``.npz`` files after flips, truncation, npy header edits
  (shape, dtype, fortran_order, huge shapes), object arrays, NaN/inf, wrong names
  -> ``load_calibration`` + ``check_calibration`` and ``kiln.quantize`` on a tiny
  model for a sampled fraction;
- ``run``: run inputs to a loaded Session (wrong names, dtypes, shapes, byte
  order, non-arrays, 0-d, empty, zero-stride views claiming huge shapes, unusual
  layouts) -> ``Session.run``, and ``.npz``/``.npy`` files -> the CLI's
  ``--inputs`` reader + ``Session.run``.

The oracle: a case is ``ok`` (a result), ``error`` (a ``kiln.Error``, counted by
class), ``foreign`` (any other exception: a finding), ``crash`` (the worker
process died: a finding), ``hang`` (no answer within the timeout: a finding),
``wrong`` (a run whose inputs held the valid values in an unusual layout or
byte order gave other outputs than the plain arrays: a finding) or ``harness``
(the fuzzer itself failed to set the case up: reported, never blamed on kiln).
Cases run in a worker process under an address-space cap (so a runaway
allocation is a ``MemoryError``, which kiln must not let out, rather than a
machine-wide OOM), restarted after a crash, a hang, or every ``recycle``
artifact loads (each maps a library).  Case ``i`` of a
kind is a function of (campaign seed, kind, i) alone, so a campaign replays
case for case.  Findings are saved under ``OUT/findings/`` (the input, the
traceback and a one-line reproduction command) as they come, and
``OUT/report.json`` is rewritten every few seconds and on interruption.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KINDS", "Case", "InputsCampaign", "InputsOptions", "execute", "make_case", "prepare_seeds", "summary_lines",
           "replay_finding", "run_inputs", "summary_table"]

KINDS = ("onnx", "artifact", "calib", "run")
OUTCOMES = ("ok", "error", "foreign", "crash", "hang", "wrong", "harness")
FINDING_OUTCOMES = frozenset({"foreign", "crash", "hang", "wrong", "harness"})
_EXT = {"onnx": ".onnx", "artifact": ".kiln", "calib": ".npz", "run": ".npz"}
_REPORT_EVERY_S = 3.0
_MAX_INTERPRET_ELEMENTS = 1 << 22  # skip the interpreter on lifted graphs with bigger values


# ====================================================================== options and cases

@dataclass(frozen=True)
class InputsOptions:
    """A malformed-input campaign: ``iterations`` cases per kind, or ``time_s`` seconds over all kinds."""

    kinds: tuple[str, ...] = KINDS
    iterations: int | None = None
    time_s: float | None = None
    seed: int = 0
    out: str | None = None
    timeout_s: float = 60.0
    jobs: int = 1  # worker processes; 0 runs cases in this process (no crash isolation: tests)
    zoo: tuple[str, ...] = ("mlp", "resnet")  # zoo models exported as ONNX seeds (torch, once per campaign)
    compile_fraction: float = 0.03  # onnx cases that also go through kiln.compile (when they lift)
    quantize_fraction: float = 0.2  # calib cases that pass the checks and also go through kiln.quantize
    recycle: int = 400  # cases per worker process before a fresh one (bounds what leaks per load)
    mem_limit_gib: float = 8.0  # the worker's address-space cap (0: none)
    plugins: tuple[str, ...] = ()  # "module" or "module:function" imported/called in each worker first

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"--kind {','.join(self.kinds)}: expected a comma-separated subset of "
                             f"{','.join(KINDS)}")
        if self.iterations is None and self.time_s is None:
            raise ValueError("a campaign needs --time or --iterations")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"--iterations {self.iterations}: expected a count >= 1")
        if self.time_s is not None and not self.time_s > 0:
            raise ValueError(f"--time {self.time_s:g}: expected a positive duration")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout {self.timeout_s:g}: expected a positive number of seconds")
        if self.jobs < 0:
            raise ValueError(f"--jobs {self.jobs}: expected 0 (in-process) or more")


@dataclass
class Case:
    """One mutant: which kind and seed it came from, what was done to it, and the bytes (or recipe)."""

    kind: str
    index: int
    seed: str
    mutation: str
    data: bytes = b""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """A short hash of everything the target sees (for determinism checks and finding names)."""
        h = hashlib.sha256(self.data)
        h.update(json.dumps([self.kind, self.seed, self.params], sort_keys=True, default=str).encode())
        return h.hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        """The case without its bytes (they are saved beside it)."""
        return {"kind": self.kind, "index": self.index, "seed": self.seed, "mutation": self.mutation,
                "params": self.params, "digest": self.digest, "bytes": len(self.data)}


# ====================================================================== seeds

def _tiny_onnx_models() -> dict[str, bytes]:
    """Small valid ONNX models built in code: one per structure the mutators like to break."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(1234)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def model(name: str, nodes: list, inputs: list, outputs: list, inits: Sequence = (),
              opset: int = 17) -> bytes:
        g = h.make_graph(nodes, name, inputs, outputs, list(inits))
        m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], producer_name="kiln-fuzz")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m.SerializeToString()

    vi = h.make_tensor_value_info
    out: dict[str, bytes] = {}
    out["add_relu"] = model("add_relu", [h.make_node("Add", ["x", "y"], ["s"]), h.make_node("Relu", ["s"], ["z"])],
                            [vi("x", T.FLOAT, ["N", 4]), vi("y", T.FLOAT, ["N", 4])], [vi("z", T.FLOAT, ["N", 4])])
    out["gemm"] = model("gemm", [h.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1, alpha=0.5),
                                 h.make_node("Softmax", ["g"], ["y"], axis=-1)],
                        [vi("x", T.FLOAT, [2, 8])], [vi("y", T.FLOAT, [2, 4])],
                        [nh.from_array(f32(4, 8), "W"), nh.from_array(f32(4), "B")])
    out["conv"] = model("conv", [h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
                                 h.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
                        [vi("x", T.FLOAT, [1, 2, 6, 6])], [vi("y", T.FLOAT, [1, 3, 3, 3])],
                        [nh.from_array(f32(3, 2, 3, 3), "W")])
    shape = nh.from_array(np.array([2, -1], np.int64), "shape")
    out["reshape"] = model("reshape", [h.make_node("Reshape", ["x", "shape"], ["r"]),
                                       h.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
                                       h.make_node("ReduceSum", ["t", "axes"], ["y"], keepdims=0)],
                           [vi("x", T.FLOAT, [2, 3, 4])], [vi("y", T.FLOAT, [12])],
                           [shape, nh.from_array(np.array([1], np.int64), "axes")], opset=18)
    out["layernorm"] = model("layernorm", [h.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1,
                                                       epsilon=1e-5),
                                           h.make_node("Gather", ["n", "idx"], ["y"], axis=1)],
                             [vi("x", T.FLOAT, [2, 5, 8])], [vi("y", T.FLOAT, [2, 3, 8])],
                             [nh.from_array(f32(8), "g"), nh.from_array(f32(8), "b"),
                              nh.from_array(np.array([0, 4, 2], np.int64), "idx")])
    then_g = h.make_graph([h.make_node("Neg", ["x"], ["t_out"])], "then", [], [vi("t_out", T.FLOAT, [3])])
    else_g = h.make_graph([h.make_node("Abs", ["x"], ["e_out"])], "else", [], [vi("e_out", T.FLOAT, [3])])
    out["if"] = model("if", [h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                      [vi("x", T.FLOAT, [3]), vi("c", T.BOOL, [])], [vi("y", T.FLOAT, [3])])
    out["cast_where"] = model("cast_where", [h.make_node("Cast", ["i"], ["f"], to=T.FLOAT),
                                             h.make_node("Greater", ["f", "zero"], ["m"]),
                                             h.make_node("Where", ["m", "f", "zero"], ["y"])],
                              [vi("i", T.INT64, [2, 3])], [vi("y", T.FLOAT, [2, 3])],
                              [nh.from_array(np.zeros((), np.float32), "zero")])
    return out


def _calib_model() -> bytes:
    """The model calibration cases quantize: x f32[N,8] -> MatMul -> Add -> Relu -> y f32[N,4]."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(99)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["m"]), h.make_node("Add", ["m", "B"], ["a"]),
                      h.make_node("Relu", ["a"], ["y"])], "calib_mm",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])], [h.make_tensor_value_info("y", T.FLOAT,
                                                                                                  ["N", 4])],
                     [nh.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
                      nh.from_array(rng.standard_normal(4).astype(np.float32), "B")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _npz_bytes(arrays: Mapping[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _calib_seeds() -> dict[str, bytes]:
    """Valid calibration files for :func:`_calib_model`: stacked (plain, compressed) and one sample."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 2, 8)).astype(np.float32)
    return {"stacked": _npz_bytes({"x": x}), "stacked_z": _npz_bytes({"x": x}, compressed=True),
            "sample": _npz_bytes({"x": x[0]})}


ARTIFACT_SEEDS = ("gemm", "add_relu")  # tiny models compiled once per campaign


def prepare_seeds(folder: str | os.PathLike, zoo: Sequence[str] = ("mlp",),
                  kinds: Sequence[str] = KINDS) -> Path:
    """Write (or reuse) the seeds ``kinds`` need under ``folder``: onnx/, artifact/, calib/, calib_model.onnx.

    Artifacts are compiled once and reused while they still load (a runtime that changed the format
    gets fresh ones), signed by a key of the seed folder's own (``KILN_HOME=folder/kiln_home``, which
    the workers trust), never the user's; zoo models are exported with torch once and cached as files.
    """
    root = Path(folder)
    for sub in ("onnx", "artifact", "calib"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tiny = _tiny_onnx_models()
    for name, data in tiny.items():
        _write_once(root / "onnx" / f"{name}.onnx", data)
    for name in zoo if "onnx" in kinds else ():
        path = root / "onnx" / f"zoo_{name}.onnx"
        if not path.exists():
            from kiln import zoo as kiln_zoo

            _write_once(path, kiln_zoo.onnx_model(name).SerializeToString())
    _write_once(root / "calib_model.onnx", _calib_model())
    for name, data in _calib_seeds().items():
        _write_once(root / "calib" / f"{name}.npz", data)
    if not {"artifact", "run"} & set(kinds):
        return root
    with _kiln_home(root):
        for name in ARTIFACT_SEEDS:
            path = root / "artifact" / f"{name}.kiln"
            if path.exists() and _loads(path):
                continue
            import kiln

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kiln.compile(tiny[name]).save(path)
    return root


@contextlib.contextmanager
def _kiln_home(seed_root: Path) -> Iterator[None]:
    """``KILN_HOME`` set to the seed folder's own (its signing key), restored afterwards."""
    old = os.environ.get("KILN_HOME")
    os.environ["KILN_HOME"] = str(Path(seed_root).resolve() / "kiln_home")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KILN_HOME", None)
        else:
            os.environ["KILN_HOME"] = old


def _write_once(path: Path, data: bytes) -> None:
    """Write ``data`` atomically unless the file already holds exactly it."""
    if path.exists() and path.read_bytes() == data:
        return
    _atomic_write(path, data)


def _load_kwargs(unsigned: bool = True) -> dict[str, Any]:
    """``kiln.load`` options that let an unsigned artifact through, where this runtime has them."""
    from kiln.runtime import load

    return {"allow_unsigned": True} if unsigned and "allow_unsigned" in inspect.signature(load).parameters \
        else {}


def _loads(path: Path) -> bool:
    """Whether a cached seed artifact still loads with this runtime."""
    from kiln.runtime import load

    try:
        _close(load(path, **_load_kwargs()))
    except Exception:  # noqa: BLE001 - any refusal means: compile it again
        return False
    return True


def _close(session: Any) -> None:
    """Release a Session's library where the runtime can."""
    close = getattr(session, "close", None)
    if callable(close):
        close()


@dataclass
class SeedSet:
    """The seeds a campaign mutates, read once from the seed folder."""

    root: Path
    onnx: dict[str, bytes]
    artifact: dict[str, bytes]
    calib: dict[str, bytes]

    @classmethod
    def read(cls, root: Path) -> SeedSet:
        def files(sub: str, ext: str) -> dict[str, bytes]:
            return {p.stem: p.read_bytes() for p in sorted((root / sub).glob(f"*{ext}"))}

        return cls(root, files("onnx", ".onnx"), files("artifact", ".kiln"), files("calib", ".npz"))


# ====================================================================== byte-level mutations

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def mutate_bytes(rng: np.random.Generator, data: bytes, pool: Sequence[bytes] = ()) -> tuple[str, bytes]:
    """One byte-level mutation (AFL's havoc menu, one step): its name and the new bytes."""
    b = bytearray(data)
    n = len(b)
    op = _pick(rng, ("flip", "flip", "byte", "truncate", "insert", "delete", "duplicate", "int", "splice",
                     "zero", "empty"))
    if n == 0 or op == "empty":
        return "bytes.empty", b""
    at = int(rng.integers(n))
    if op == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(n))
            b[i] ^= 1 << int(rng.integers(8))
    elif op == "byte":
        b[at] = _pick(rng, (0, 0xFF, 0x7F, 0x80, int(rng.integers(256))))
    elif op == "truncate":
        cut = _pick(rng, (at, n // 2, n - 1, int(rng.integers(min(n, 64))), n - int(rng.integers(1, min(n, 64) + 1))))
        b = b[:cut]
    elif op == "insert":
        size = _pick(rng, (1, 4, 16, int(rng.integers(1, 4096))))
        b[at:at] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    elif op == "delete":
        del b[at:at + int(rng.integers(1, 256))]
    elif op == "duplicate":
        chunk = b[at:at + int(rng.integers(1, 1024))]
        b[at:at] = chunk * int(rng.integers(1, 4))
    elif op == "int":
        width = _pick(rng, (1, 2, 4, 8))
        value = _pick(rng, _INTERESTING) & ((1 << (8 * width)) - 1)
        b[at:at + width] = value.to_bytes(width, _pick(rng, ("little", "big")))
    elif op == "splice" and pool:
        other = _pick(rng, pool)
        j = int(rng.integers(max(len(other), 1)))
        b = b[:at] + other[j:]
    else:
        b[at:at + int(rng.integers(1, 512))] = bytes(len(b[at:at + int(rng.integers(1, 512))]))
    return f"bytes.{op}", bytes(b)


# ====================================================================== npy / npz / zip helpers

_NPY_MAGIC = b"\x93NUMPY"
_DESCRS = ("<f4", ">f4", "<f8", "<f2", "<i8", "<i4", "|u1", "|b1", "<c8", "<U3", "|S3", "|V4", "|O",
           "<M8[s]", "bogus", "", "<f4<f4", 12, None, [("a", "<f4")], "<u8", ">i8")
_HUGE_DIMS = (-1, -(1 << 31), 1 << 31, 1 << 32, 10 ** 12, (1 << 62), (1 << 63) - 1, 1 << 64, 0)


def _npy_parts(blob: bytes) -> tuple[tuple[int, int], dict[str, Any] | str, bytes] | None:
    """(version, header dict or raw text, data) of a .npy, or None when it is not one."""
    if not blob.startswith(_NPY_MAGIC) or len(blob) < 10:
        return None
    major, minor = blob[6], blob[7]
    if major == 1:
        hlen, start = int.from_bytes(blob[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(blob[8:12], "little"), 12
    text = blob[start:start + hlen].decode("latin1")
    try:
        import ast

        header: dict[str, Any] | str = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        header = text
    return (major, minor), header, blob[start + hlen:]


def _npy_build(header: Mapping[str, Any] | str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy from a header (dict, written like numpy does, or raw text) and data bytes."""
    text = header if isinstance(header, str) else "{" + "".join(f"{k!r}: {v!r}, " for k, v in header.items()) + "}"
    major, minor = version
    prefix = 12 if major >= 2 else 10
    pad = (-(prefix + len(text) + 1)) % 64
    body = (text + " " * pad + "\n").encode("latin1", errors="replace")
    size = len(body).to_bytes(4 if major >= 2 else 2, "little") if len(body) < (1 << 16) or major >= 2 \
        else (len(body) & 0xFFFF).to_bytes(2, "little")
    return _NPY_MAGIC + bytes([major & 0xFF, minor & 0xFF]) + size + body + data


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def mutate_npy(rng: np.random.Generator, blob: bytes) -> tuple[str, bytes]:
    """One .npy header or data edit: shapes (huge, negative, wrong rank), dtypes, fortran_order, raw header."""
    parts = _npy_parts(blob)
    if parts is None or not isinstance(parts[1], dict):
        return mutate_bytes(rng, blob)
    version, header, data = parts
    header = dict(header)
    shape = tuple(header.get("shape", ()))
    op = _pick(rng, ("shape_huge", "shape_huge", "shape_rank", "shape_zero", "shape_scalar", "shape_type",
                     "descr", "descr", "fortran", "raw_header", "code_header", "version", "data_short",
                     "data_long", "drop_key", "hlen"))
    if op == "shape_huge" and shape:
        dims = list(shape)
        dims[int(rng.integers(len(dims)))] = _pick(rng, _HUGE_DIMS)
        header["shape"] = tuple(dims)
    elif op == "shape_huge":
        header["shape"] = (_pick(rng, _HUGE_DIMS),)
    elif op == "shape_rank":
        header["shape"] = shape + (int(rng.integers(1, 4)),) if rng.random() < 0.5 else shape[1:]
    elif op == "shape_zero":
        header["shape"] = tuple(0 if i == 0 else d for i, d in enumerate(shape)) or (0,)
    elif op == "shape_scalar":
        header["shape"] = ()
    elif op == "shape_type":
        header["shape"] = _pick(rng, ([2, 3], "(2,)", 5, None, (1.5,), (True,), (-0,), ((1, 2),)))
    elif op == "descr":
        header["descr"] = _pick(rng, _DESCRS)
    elif op == "fortran":
        header["fortran_order"] = _pick(rng, (True, "yes", 1, None))
    elif op == "raw_header":
        return "npy.raw_header", _npy_build(_pick(rng, ("{", "{'descr': '<f4'}", "[1, 2]", "'\\x00'", "{}" * 500,
                                                         "{'descr': '<f4', 'fortran_order': False, 'shape': (2,"
                                                         " 3), 'extra': 1}", "\udcff")), data, version)
    elif op == "code_header":
        # must never run: numpy's header reader is literal_eval, kiln must not use anything else
        return "npy.code_header", _npy_build("{'descr': __import__('os').system('touch /tmp/kiln-pwned'), "
                                             "'fortran_order': False, 'shape': (2,)}", data, version)
    elif op == "version":
        version = _pick(rng, ((2, 0), (3, 0), (4, 0), (0, 0), (1, 9), (255, 255)))
    elif op == "data_short":
        data = data[:int(rng.integers(len(data) + 1))] if data else data
    elif op == "data_long":
        data = data + bytes(int(rng.integers(1, 4096)))
    elif op == "drop_key":
        header.pop(_pick(rng, ("descr", "fortran_order", "shape")), None)
    else:
        out = bytearray(_npy_build(header, data, version))
        width = 2 if version[0] == 1 else 4
        out[8:8 + width] = int(_pick(rng, (0, 1, 0xFFFF, 0xFFFFFFFF))).to_bytes(4, "little")[:width]
        return "npy.hlen", bytes(out)
    return f"npy.{op}", _npy_build(header, data, version)


@dataclass
class Member:
    """One zip member: name, bytes, compression (zipfile's constant)."""

    name: str
    data: bytes
    compress: int = zipfile.ZIP_STORED


def zip_members(blob: bytes) -> list[Member] | None:
    """The members of a zip held in ``blob``, or None when it does not open."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            return [Member(i.filename, zf.read(i), i.compress_type) for i in zf.infolist()]
    except Exception:  # noqa: BLE001 - a mutated zip that does not open: byte mutations only
        return None


def zip_build(members: Sequence[Member]) -> bytes:
    """A zip of ``members`` in order (duplicate names allowed, as a hostile file may have them)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(buf, "w") as zf:
            for m in members:
                zf.writestr(zipfile.ZipInfo(m.name, date_time=(2020, 1, 1, 0, 0, 0)), m.data,
                            compress_type=m.compress)
    return buf.getvalue()


_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def mutate_zip(rng: np.random.Generator, members: list[Member], *, pool: Sequence[Member] = (),
               inner: Callable[[np.random.Generator, Member], tuple[str, bytes]] | None = None) -> tuple[str, list[Member]]:
    """One member-level edit of a zip: remove, duplicate, add, rename, replace, reorder, recompress."""
    ms = [Member(m.name, m.data, m.compress) for m in members]
    op = _pick(rng, ("remove", "duplicate", "add", "rename", "replace", "reorder", "compression", "inner",
                     "inner", "bomb"))
    if not ms:
        op = "add"
    i = int(rng.integers(max(len(ms), 1)))
    if op == "remove":
        del ms[i]
    elif op == "duplicate":
        dup = Member(ms[i].name, ms[i].data if rng.random() < 0.5 else mutate_bytes(rng, ms[i].data)[1],
                     ms[i].compress)
        ms.insert(int(rng.integers(len(ms) + 1)), dup)
    elif op == "add":
        name = _pick(rng, ("extra.bin", "../escape.so", "/abs/path.npy", "lib.so.bak", "x" * 300, "dir/",
                           "nested/deep/file.npy", "\u00e9\u4e2d.npy", "a\x00b", "w.npy"))
        data = _pick(rng, (b"", b"\x7fELF" + bytes(60), _npy(np.zeros(3, np.float32)),
                           rng.integers(0, 256, 256, dtype=np.uint8).tobytes()))
        ms.append(Member(name, data, _pick(rng, _COMPRESSIONS)))
    elif op == "rename":
        ms[i].name = _pick(rng, (ms[i].name.upper(), ms[i].name + ".bak", "", ms[i].name.replace(".", "_"),
                                 ms[(i + 1) % len(ms)].name, "./" + ms[i].name))
    elif op == "replace":
        src = _pick(rng, pool) if pool and rng.random() < 0.5 else None
        ms[i].data = src.data if src is not None else _pick(rng, (b"", b"{}", b"null", bytes(16)))
    elif op == "reorder":
        rng.shuffle(ms)
    elif op == "compression":
        ms[i].compress = _pick(rng, _COMPRESSIONS)
    elif op == "bomb":
        # a highly compressible member (64 MiB of zeros in ~64 KiB): the zip-ratio limit must refuse it
        ms[i] = Member(ms[i].name, bytes(64 << 20), zipfile.ZIP_DEFLATED)
    else:
        sub, ms[i].data = (inner or (lambda r, m: mutate_bytes(r, m.data)))(rng, ms[i])
        return f"zip.inner:{ms[i].name}:{sub}", ms
    return f"zip.{op}", ms


# ====================================================================== onnx mutations

def _graphs(model: Any) -> list[Any]:
    """Every GraphProto of the model (the main graph and all subgraphs)."""
    import onnx

    out, stack = [], [model.graph]
    while stack:
        g = stack.pop()
        out.append(g)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                stack.extend(a.graphs)
    return out


def _value_infos(g: Any) -> list[Any]:
    return [*g.input, *g.output, *g.value_info]


def _names(g: Any) -> list[str]:
    names = [v.name for v in g.input] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output]
    return [n for n in names if n]


def _dim_edit(rng: np.random.Generator, model: Any) -> str | None:
    vis = [v for g in _graphs(model) for v in _value_infos(g) if v.type.HasField("tensor_type")]
    if not vis:
        return None
    v = _pick(rng, vis)
    shape = v.type.tensor_type.shape
    if not shape.dim or rng.random() < 0.15:
        choice = _pick(rng, ("clear", "add", "add"))
        if choice == "clear":
            v.type.tensor_type.ClearField("shape")
        else:
            shape.dim.add().dim_value = _pick(rng, (1, 3, 0, 10 ** 6))
        return f"onnx.dim.{choice}"
    d = shape.dim[int(rng.integers(len(shape.dim)))]
    choice = _pick(rng, ("value", "value", "param", "clear"))
    if choice == "value":
        d.dim_value = _pick(rng, (-1, -(1 << 31), 0, 1 << 31, 10 ** 12, (1 << 63) - 1, 7, 1 << 20))
    elif choice == "param":
        d.dim_param = _pick(rng, ("N", "M", "", "[red]x", "a b", "N+1", "2*N", "\u00e9", "-1", "0", "x" * 500))
    else:
        d.Clear()
    return f"onnx.dim.{choice}"


def _dtype_edit(rng: np.random.Generator, model: Any) -> str | None:
    targets = [v.type.tensor_type for g in _graphs(model) for v in _value_infos(g) if v.type.HasField("tensor_type")]
    targets += [t for g in _graphs(model) for t in g.initializer]
    if not targets:
        return None
    t = _pick(rng, targets)
    value = int(_pick(rng, (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 16, 17, 19, 21, 22, 23, 24, 99, 1000)))
    if hasattr(t, "elem_type"):
        t.elem_type = value
        return "onnx.dtype.value_info"
    t.data_type = value
    return "onnx.dtype.initializer"


def _initializer_edit(rng: np.random.Generator, model: Any) -> str | None:
    import onnx

    inits = [(g, t) for g in _graphs(model) for t in g.initializer]
    if not inits:
        return None
    g, t = _pick(rng, inits)
    op = _pick(rng, ("remove", "rename", "duplicate", "dims", "dims_huge", "raw_short", "raw_long", "raw_to_field",
                     "external", "external_dev", "segment", "string", "nan"))
    if op == "remove":
        g.initializer.remove(t)
    elif op == "rename":
        t.name = _pick(rng, ("", t.name + "_x", _pick(rng, _names(g)) if _names(g) else "z"))
    elif op == "duplicate":
        dup = g.initializer.add()
        dup.CopyFrom(t)
        if dup.raw_data:
            dup.raw_data = dup.raw_data[: len(dup.raw_data) // 2]
    elif op == "dims":
        if t.dims:
            t.dims[int(rng.integers(len(t.dims)))] = int(_pick(rng, (-1, 0, 3, 1000)))
        else:
            t.dims.append(2)
    elif op == "dims_huge":
        del t.dims[:]
        t.dims.extend(_pick(rng, ([1 << 20, 1 << 20], [10 ** 12], [1 << 31], [(1 << 63) - 1], [-5, 2])))
    elif op == "raw_short":
        t.raw_data = t.raw_data[: int(rng.integers(len(t.raw_data) + 1))] if t.raw_data else b"\x00"
    elif op == "raw_long":
        t.raw_data = t.raw_data + bytes(int(rng.integers(1, 64)))
    elif op == "raw_to_field":
        t.ClearField("raw_data")
        t.float_data.extend([1.0, float("nan")])
        t.int64_data.extend([1 << 62])
    elif op in ("external", "external_dev"):
        t.data_location = onnx.TensorProto.EXTERNAL
        t.ClearField("raw_data")
        loc = _pick(rng, ("missing.bin", "../../etc/hostname", "/etc/hostname", "", "a/../../b"))
        if op == "external_dev":
            loc = _pick(rng, ("/dev/zero", "/proc/self/mem", "/dev/urandom"))
        for key, value in (("location", loc), ("offset", str(_pick(rng, (0, -1, 1 << 62)))),
                           ("length", str(_pick(rng, (16, 1 << 40, -3))))):
            e = t.external_data.add()
            e.key, e.value = key, value
    elif op == "segment":
        t.segment.begin, t.segment.end = 5, 2
    elif op == "string":
        t.data_type = onnx.TensorProto.STRING
        t.string_data.extend([b"\xff\xfe", b"x" * 100])
    else:
        if t.data_type == onnx.TensorProto.FLOAT and t.raw_data:
            arr = np.frombuffer(t.raw_data, np.float32).copy()
            arr[:: max(1, arr.size // 3)] = _pick(rng, (np.nan, np.inf, -np.inf, 3e38))
            t.raw_data = arr.tobytes()
        else:
            return None
    return f"onnx.init.{op}"


def _attr_edit(rng: np.random.Generator, model: Any) -> str | None:
    import onnx
    from onnx import helper as h

    nodes = [n for g in _graphs(model) for n in g.node]
    if not nodes:
        return None
    node = _pick(rng, nodes)
    op = _pick(rng, ("value", "value", "type", "remove", "add", "duplicate"))
    if op in ("add",) or not node.attribute:
        name = _pick(rng, ("axis", "perm", "to", "kernel_shape", "pads", "epsilon", "bogus", "keepdims", "group",
                           "strides", "dilations", "auto_pad", "alpha"))
        node.attribute.append(h.make_attribute(name, _pick(rng, (0, -1, 1 << 40, 1.5, "SAME_UPPER", [0, 0], [9] * 9))))
        return "onnx.attr.add"
    a = node.attribute[int(rng.integers(len(node.attribute)))]
    if op == "remove":
        node.attribute.remove(a)
    elif op == "duplicate":
        node.attribute.append(a)
    elif op == "type":
        new = _pick(rng, (h.make_attribute(a.name, 1.25), h.make_attribute(a.name, "str"),
                          h.make_attribute(a.name, [1, 2, 3]), h.make_attribute(a.name, 7),
                          h.make_attribute(a.name, [0.5, 1.5]), h.make_attribute(a.name, [b"a", b"b"])))
        a.CopyFrom(new)
        if rng.random() < 0.3:
            a.type = int(_pick(rng, (0, 5, 6, 13)))
    else:
        T = onnx.AttributeProto
        if a.type == T.INT:
            a.i = int(_pick(rng, (-1, -2, 0, 1, 7, 1 << 31, -(1 << 63), (1 << 63) - 1, 99)))
        elif a.type == T.FLOAT:
            a.f = float(_pick(rng, (np.nan, np.inf, -np.inf, 0.0, -1.0, 1e38)))
        elif a.type == T.INTS:
            vals = list(a.ints) or [1]
            vals[int(rng.integers(len(vals)))] = int(_pick(rng, (-1, 0, 1 << 31, -(1 << 40), 99)))
            del a.ints[:]
            a.ints.extend(vals if rng.random() < 0.7 else vals + vals)
        elif a.type == T.STRING:
            a.s = _pick(rng, (b"", b"\xff\xfe", b"NOTSET", b"SAME_LOWER", b"x" * 1000))
        elif a.type == T.TENSOR:
            a.t.dims.append(_pick(rng, (0, 3, 1 << 30)))
        elif a.type == T.GRAPH:
            a.g.ClearField("output" if rng.random() < 0.5 else "node")
        else:
            return None
    return f"onnx.attr.{op}"


_OPS = ("Add", "Relu", "MatMul", "Conv", "Reshape", "Softmax", "If", "Loop", "Scan", "ConstantOfShape", "Expand",
        "Tile", "Range", "NotAnOp", "", "Gemm", "Identity", "Split", "Concat", "Resize", "Einsum")


def _node_edit(rng: np.random.Generator, model: Any) -> str | None:
    g = _pick(rng, _graphs(model))
    if not g.node:
        return None
    i = int(rng.integers(len(g.node)))
    node = g.node[i]
    op = _pick(rng, ("op_type", "domain", "drop_input", "extra_input", "empty_input", "dangling", "dup_output",
                     "cycle", "self_loop", "remove", "reorder", "dup_node", "drop_output", "empty_output"))
    names = _names(g)
    if op == "op_type":
        node.op_type = _pick(rng, _OPS)
    elif op == "domain":
        node.domain = _pick(rng, ("com.microsoft", "ai.onnx.ml", "bogus.domain", "ai.onnx", "\u00e9"))
    elif op == "drop_input" and node.input:
        del node.input[int(rng.integers(len(node.input)))]
    elif op == "extra_input":
        node.input.append(_pick(rng, names) if names else "x")
    elif op == "empty_input" and node.input:
        node.input[int(rng.integers(len(node.input)))] = ""
    elif op == "dangling" and node.input:
        node.input[int(rng.integers(len(node.input)))] = "no_such_value"
    elif op == "dup_output" and len(g.node) > 1 and node.output:
        other = g.node[(i + 1) % len(g.node)]
        if other.output:
            node.output[0] = other.output[0]
    elif op == "cycle" and node.input:
        later = [o for n in g.node[i:] for o in n.output]
        if later:
            node.input[0] = _pick(rng, later)
    elif op == "self_loop" and node.input and node.output:
        node.input[0] = node.output[0]
    elif op == "remove":
        del g.node[i]
    elif op == "reorder":
        nodes = list(g.node)
        rng.shuffle(nodes)
        del g.node[:]
        g.node.extend(nodes)
    elif op == "dup_node":
        g.node.add().CopyFrom(node)
    elif op == "drop_output" and node.output:
        del node.output[-1]
    elif op == "empty_output" and node.output:
        node.output[0] = ""
    else:
        return None
    return f"onnx.node.{op}"


def _io_edit(rng: np.random.Generator, model: Any) -> str | None:
    g = model.graph
    op = _pick(rng, ("remove_input", "rename_input", "dup_input", "remove_output", "rename_output", "dup_output",
                     "output_is_input", "no_outputs", "input_is_initializer", "optional_type"))
    if op == "remove_input" and g.input:
        del g.input[int(rng.integers(len(g.input)))]
    elif op == "rename_input" and g.input:
        g.input[int(rng.integers(len(g.input)))].name = _pick(rng, ("", "renamed", "[/x]", "a" * 4096))
    elif op == "dup_input" and g.input:
        g.input.add().CopyFrom(g.input[0])
    elif op == "remove_output" and g.output:
        del g.output[int(rng.integers(len(g.output)))]
    elif op == "rename_output" and g.output:
        g.output[int(rng.integers(len(g.output)))].name = _pick(rng, ("", "not_produced", "x"))
    elif op == "dup_output" and g.output:
        g.output.add().CopyFrom(g.output[0])
    elif op == "output_is_input" and g.input and g.output:
        g.output[0].name = g.input[0].name
    elif op == "no_outputs":
        del g.output[:]
    elif op == "input_is_initializer" and g.initializer and g.input:
        g.input[0].name = g.initializer[0].name
    elif op == "optional_type" and g.input:
        t = g.input[0].type
        t.Clear()
        kind = _pick(rng, ("sequence_type", "optional_type", "map_type", "sparse_tensor_type"))
        getattr(t, kind).SetInParent()
    else:
        return None
    return f"onnx.io.{op}"


def _model_edit(rng: np.random.Generator, model: Any) -> str | None:
    op = _pick(rng, ("opset_version", "opset_drop", "opset_dup", "opset_domain", "ir_version", "functions",
                     "recursive_function", "metadata", "training_info"))
    if op == "opset_version" and model.opset_import:
        model.opset_import[0].version = int(_pick(rng, (0, -1, 1, 6, 7, 12, 25, 26, 1000, 1 << 40)))
    elif op == "opset_drop":
        del model.opset_import[:]
        if rng.random() < 0.5:
            e = model.opset_import.add()
            e.domain, e.version = "com.microsoft", 1
    elif op == "opset_dup" and model.opset_import:
        e = model.opset_import.add()
        e.CopyFrom(model.opset_import[0])
        e.version = 9
    elif op == "opset_domain":
        e = model.opset_import.add()
        e.domain, e.version = _pick(rng, ("bogus", "ai.onnx", "")), int(_pick(rng, (1, 0, 99)))
    elif op == "ir_version":
        model.ir_version = int(_pick(rng, (0, -1, 1, 3, 11, 12, 100, 1 << 40)))
    elif op in ("functions", "recursive_function"):
        from onnx import helper as h

        name = _pick(rng, ("Relu", "MyFunc")) if op == "functions" else "Rec"
        body = [h.make_node("Rec" if op == "recursive_function" else "Neg", ["a"], ["b"], domain="local")]
        f = h.make_function("local", name, ["a"], ["b"], body, [h.make_opsetid("", 17)])
        model.functions.append(f)
        e = model.opset_import.add()
        e.domain, e.version = "local", 1
        g = model.graph
        if g.node and g.node[0].output:
            g.node[0].op_type, g.node[0].domain = name, "local"
    elif op == "metadata":
        p = model.metadata_props.add()
        p.key, p.value = "\x00", "[red]x[/]" * 1000
    elif op == "training_info":
        model.training_info.add().algorithm.CopyFrom(model.graph)
    else:
        return None
    return f"onnx.model.{op}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    """One protobuf field: a varint for ints, length-delimited for bytes and strings."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    raw = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def nest_model(rng: np.random.Generator, data: bytes) -> tuple[str, bytes] | None:
    """The model with its first node wrapped in ``depth`` nested If subgraphs, encoded by hand (the onnx
    API itself refuses to build messages past protobuf's depth limit, which is what a reader must survive).
    NodeProto: input 1, output 2, op_type 4, attribute 5; AttributeProto: name 1, g 6, type 20 (GRAPH=5);
    GraphProto: node 1, name 2, initializer 5, output 12; ValueInfoProto: name 1; ModelProto: graph 7."""
    import onnx
    from onnx import numpy_helper as nh

    model = onnx.ModelProto()
    model.ParseFromString(data)
    g = model.graph
    if not g.node or not g.node[0].output:
        return None
    depth = int(_pick(rng, (2, 4, 8, 16, 25, 32, 40, 400, 5000)))  # protobuf stops at ~33 levels
    first = g.node[0]
    out_name, src = first.output[0], (first.input[0] if first.input else "cond")
    node = first.SerializeToString()
    for level in range(depth):
        sub = f"{out_name}_lvl{level}"
        inner = _field(2, sub) + node[len(_field(2, out_name)):] if node.startswith(_field(2, out_name)) else node
        then_g = _field(1, inner) + _field(2, f"t{level}") + _field(12, _field(1, sub))
        else_g = _field(1, _field(1, src) + _field(2, sub) + _field(4, "Identity")) + _field(2, f"e{level}") + \
            _field(12, _field(1, sub))
        node = (_field(1, "cond") + _field(2, out_name) + _field(4, "If") +
                _field(5, _field(1, "then_branch") + _field(6, then_g) + _field(20, 5)) +
                _field(5, _field(1, "else_branch") + _field(6, else_g) + _field(20, 5)))
    del g.node[0]
    g.initializer.append(nh.from_array(np.array(True), "cond"))
    graph = _field(1, node) + g.SerializeToString()
    model.ClearField("graph")
    return f"onnx.nest.if{depth}", model.SerializeToString() + _field(7, graph)


def _big_const_edit(rng: np.random.Generator, model: Any) -> str | None:
    """A ConstantOfShape / Expand / Range of a huge or negative size feeding a new output."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    g = model.graph
    dims = _pick(rng, ([10 ** 6, 10 ** 6], [1 << 31], [10 ** 12], [-1, 4], [0, 3], [1 << 16, 1 << 14], [1 << 62, 4]))
    op = _pick(rng, ("ConstantOfShape", "Expand", "Range", "Tile"))
    g.initializer.append(nh.from_array(np.array(dims, np.int64), "big_shape"))
    if op == "ConstantOfShape":
        g.node.append(h.make_node("ConstantOfShape", ["big_shape"], ["big_out"],
                                  value=h.make_tensor("v", T.FLOAT, [1], [1.0])))
    elif op == "Expand":
        g.initializer.append(nh.from_array(np.ones((1,) * len(dims), np.float32), "big_one"))
        g.node.append(h.make_node("Expand", ["big_one", "big_shape"], ["big_out"]))
    elif op == "Range":
        g.initializer.extend([nh.from_array(np.array(0, np.int64), "big_start"),
                              nh.from_array(np.array(dims[0], np.int64), "big_limit"),
                              nh.from_array(np.array(1, np.int64), "big_delta")])
        g.node.append(h.make_node("Range", ["big_start", "big_limit", "big_delta"], ["big_out"]))
    else:
        g.initializer.append(nh.from_array(np.ones((1,) * len(dims), np.float32), "big_one"))
        g.node.append(h.make_node("Tile", ["big_one", "big_shape"], ["big_out"]))
    g.output.append(h.make_tensor_value_info("big_out", T.UNDEFINED, None))
    return f"onnx.big.{op}"


_ONNX_EDITS: tuple[Callable[[np.random.Generator, Any], str | None], ...] = (
    _dim_edit, _dim_edit, _dtype_edit, _initializer_edit, _initializer_edit, _attr_edit, _attr_edit, _node_edit,
    _node_edit, _io_edit, _model_edit, _big_const_edit)


def mutate_onnx(rng: np.random.Generator, data: bytes, pool: Sequence[bytes]) -> tuple[str, bytes]:
    """Protobuf edits (1-3, through the onnx API) and/or a byte-level mutation of a serialized model."""
    import onnx

    steps: list[str] = []
    if rng.random() < 0.05:
        nested = nest_model(rng, data)
        if nested is not None:
            return nested
    if rng.random() < 0.75:
        model = onnx.ModelProto()
        model.ParseFromString(data)
        for _ in range(int(_pick(rng, (1, 1, 1, 2, 3)))):
            for _try in range(8):
                name = _pick(rng, _ONNX_EDITS)(rng, model)
                if name:
                    steps.append(name)
                    break
        data = model.SerializeToString()
    if not steps or rng.random() < 0.2:
        name, data = mutate_bytes(rng, data, pool)
        steps.append(name)
    return "+".join(steps), data


# ====================================================================== artifact mutations

def _json_paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, prefix + (i,))


def _json_get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _deep(depth: int) -> str:
    """A placeholder :func:`dump_json` writes as ``depth`` nested lists (json.dumps itself would recurse)."""
    return f"__kiln_deep_{depth}__"


def dump_json(obj: Any) -> bytes:
    """JSON text of a (mutated) manifest, with :func:`_deep` placeholders expanded to nested brackets."""
    text = json.dumps(obj, indent=1)
    return re.sub(r'"__kiln_deep_(\d+)__"', lambda m: "[" * int(m.group(1)) + "0" + "]" * int(m.group(1)),
                  text).encode()


_JSON_VALUES: tuple[Any, ...] = (None, True, False, -1, 0, 1, 1 << 31, 1 << 63, 10 ** 30, -(10 ** 30), 1e308, -1.5,
                                 float("nan"), float("inf"), "", "x" * 2000, "[red]x[/]", "[/", "../../etc/passwd",
                                 [], {}, [1, 2], {"a": 1}, "float32", "bogus", "N", "\u00e9\u4e2d")
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int8", "uint8", "bool", "object", "O", "<U3",
                "V8", "float8_e4m3fn", "int4", "complex64", "str", "", "float32 ", "datetime64", ">f4")


def mutate_manifest(rng: np.random.Generator, manifest: dict[str, Any]) -> tuple[str, dict[str, Any] | bytes]:
    """One manifest edit: a value's type or size, a dtype or dim, a key removed or added, two values swapped,
    deep nesting; sometimes raw JSON text (duplicate keys, deep brackets, other encodings)."""
    m = json.loads(json.dumps(manifest))
    paths = [p for p in _json_paths(m) if p]
    op = _pick(rng, ("value", "value", "dtype", "dim", "dim", "delete", "add", "swap", "deep", "raw"))
    if op == "raw":
        text = json.dumps(manifest)
        kind = _pick(rng, ("dup_key", "deep_brackets", "utf16", "bom", "trailing", "nan_literal", "huge_int"))
        raw = {"dup_key": lambda: text[:-1] + ', "format_version": 99}',
               "deep_brackets": lambda: text[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
               "utf16": lambda: text,
               "bom": lambda: "\ufeff" + text,
               "trailing": lambda: text + " garbage",
               "nan_literal": lambda: text[:-1] + ', "inputs": NaN}',
               "huge_int": lambda: text[:-1] + ', "format_version": 1' + "0" * 5000 + "}"}[kind]()
        return f"manifest.raw.{kind}", raw.encode("utf-16" if kind == "utf16" else "utf-8")
    if op == "dtype":
        paths_d = [p for p in paths if p[-1] == "dtype"]
        if paths_d:
            p = _pick(rng, paths_d)
            _json_get(m, p[:-1])[p[-1]] = _pick(rng, _DTYPE_NAMES)
            return f"manifest.dtype:{p[0]}", m
    if op == "dim":
        paths_s = [p for p in paths if p[-1] == "shape" and isinstance(_json_get(m, p), list)]
        if paths_s:
            p = _pick(rng, paths_s)
            shape = _json_get(m, p)
            value = _pick(rng, (-1, 0, 1 << 31, 10 ** 12, (1 << 63) - 1, 1 << 64, "N", "Q", "N*2", "", 1.5, True, None,
                                [2]))
            if shape and rng.random() < 0.8:
                shape[int(rng.integers(len(shape)))] = value
            else:
                shape.append(value)
            return f"manifest.dim:{p[0]}", m
    if op == "delete":
        p = _pick(rng, paths)
        parent = _json_get(m, p[:-1])
        del parent[p[-1]]
        return f"manifest.delete:{p[0]}", m
    if op == "add":
        p = _pick(rng, [q for q in [()] + paths if isinstance(_json_get(m, q), dict)])
        _json_get(m, p)[_pick(rng, ("bogus", "members", "format_version", "signature", ""))] = _pick(rng, _JSON_VALUES)
        return f"manifest.add:{p[0] if p else 'top'}", m
    if op == "swap":
        lists = [p for p in paths if isinstance(_json_get(m, p), list) and len(_json_get(m, p)) > 1]
        if lists:
            p = _pick(rng, lists)
            lst = _json_get(m, p)
            i, j = rng.choice(len(lst), 2, replace=False)
            lst[i], lst[j] = lst[j], lst[i]
            return f"manifest.swap:{p[0]}", m
    if op == "deep":
        p = _pick(rng, paths)
        _json_get(m, p[:-1])[p[-1]] = _deep(int(_pick(rng, (50, 900, 5000))))
        return f"manifest.deep:{p[0]}", m
    p = _pick(rng, paths)
    _json_get(m, p[:-1])[p[-1]] = _pick(rng, _JSON_VALUES)
    return f"manifest.value:{p[0]}", m


def _rehash(members: list[Member], rng: np.random.Generator) -> list[Member]:
    """Recompute what a forger can: the member sha256 values in the manifest and the manifest digest in
    ``signature.json``; the signature itself is dropped (an unsigned forgery) or, sometimes, kept (then
    it no longer verifies)."""
    from kiln.runtime import artifact as art

    by_name = {m.name: m for m in members}
    man = by_name.get(art.MANIFEST)
    if man is None:
        return members
    try:
        manifest = json.loads(man.data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("members"), dict):
        for name in getattr(art, "HASHED_MEMBERS", ()):
            if name in by_name:
                manifest["members"][name] = hashlib.sha256(by_name[name].data).hexdigest()
        man.data = json.dumps(manifest, indent=1).encode()
    sig = by_name.get("signature.json")
    if sig is not None:
        try:
            record = json.loads(sig.data)
        except (ValueError, UnicodeDecodeError):
            record = {}
        record = record if isinstance(record, dict) else {}
        record["digest"] = hashlib.sha256(man.data).hexdigest()
        if rng.random() < 0.85:
            record = {"digest": record["digest"]}
        sig.data = json.dumps(record).encode()
    return members


def mutate_artifact(rng: np.random.Generator, data: bytes, pool: Sequence[bytes]) -> tuple[str, bytes, bool]:
    """One artifact mutation: (name, bytes, whether the member hashes were recomputed).

    lib.so's bytes are never changed under recomputed hashes: an unsigned artifact someone chose to
    trust is native code, and corrupt native code that one trusts may crash; that is the trust model,
    not a bug (replacing it with another seed's valid library is fair game)."""
    members = zip_members(data)
    op = rng.random()
    if members is None or op < 0.2:
        name, out = mutate_bytes(rng, data, pool)
        return f"artifact.{name}", out, False
    rehash = rng.random() < 0.7
    by_name = {m.name: m for m in members}
    if op < 0.6 and "manifest.json" in by_name:
        name, new = mutate_manifest(rng, json.loads(by_name["manifest.json"].data))
        by_name["manifest.json"].data = new if isinstance(new, bytes) else dump_json(new)
        if isinstance(new, bytes):
            rehash = False
    elif op < 0.75 and "weights.npz" in by_name:
        inner = zip_members(by_name["weights.npz"].data) or []
        name, inner = mutate_zip(rng, inner, inner=lambda r, m: mutate_npy(r, m.data))
        by_name["weights.npz"].data = zip_build(inner)
        name = f"weights.{name}"
    elif op < 0.8 and "model.ir" in by_name:
        name, by_name["model.ir"].data = mutate_bytes(rng, by_name["model.ir"].data)
        name = f"ir.{name}"
    else:
        lib_pool = [m for other in pool for m in (zip_members(other) or []) if m.name == "lib.so"]

        def inner(r: np.random.Generator, m: Member) -> tuple[str, bytes]:
            if m.name == "lib.so":
                if rehash:
                    return "lib_swap", _pick(r, lib_pool).data if lib_pool else m.data
                return mutate_bytes(r, m.data)
            return mutate_npy(r, m.data) if m.data.startswith(_NPY_MAGIC) else mutate_bytes(r, m.data)

        name, members = mutate_zip(rng, members, pool=[m for m in members], inner=inner)
        valid_libs = {x.data for x in lib_pool}
        if any(m.name == "lib.so" and m.data not in valid_libs for m in members):
            rehash = False  # a changed library under recomputed hashes is trusted native code: out of scope
    if rehash:
        members = _rehash(members, rng)
    return f"artifact.{name}{'+rehash' if rehash else ''}", zip_build(members), rehash


# ====================================================================== calibration and run-input mutations

def mutate_npz(rng: np.random.Generator, data: bytes, pool: Sequence[bytes] = (),
               valid: Mapping[str, np.ndarray] | None = None) -> tuple[str, bytes]:
    """A .npz mutant: bytes, npy header/data edits, member edits, object arrays, NaN/inf, wrong names,
    other dtypes, a bare .npy instead of an npz."""
    op = rng.random()
    members = zip_members(data)
    if members is None or op < 0.2:
        return mutate_bytes(rng, data, pool)
    if op < 0.5:
        name, ms = mutate_zip(rng, members, inner=lambda r, m: mutate_npy(r, m.data))
        return f"npz.{name}", zip_build(ms)
    arrays = dict(valid) if valid else {m.name[:-4]: np.load(io.BytesIO(m.data), allow_pickle=False)
                                         for m in members if m.name.endswith(".npy")}
    if not arrays:
        return mutate_bytes(rng, data, pool)
    key = _pick(rng, sorted(arrays))
    a = arrays[key]
    kind = _pick(rng, ("object", "nan", "inf", "float64", "int", "rename", "extra", "empty", "scalar",
                       "big_endian", "fortran", "npy_only", "unicode", "complex", "zero_samples", "bool"))
    if kind == "object":
        arrays[key] = np.array([a, None, "x"], dtype=object)
    elif kind == "nan":
        arrays[key] = np.full_like(a, np.nan) if a.dtype.kind == "f" else a
    elif kind == "inf":
        b = a.astype(np.float32).copy()
        b.flat[:: max(1, b.size // 4)] = np.inf
        arrays[key] = b
    elif kind == "float64":
        arrays[key] = a.astype(np.float64)
    elif kind == "int":
        arrays[key] = a.astype(np.int64)
    elif kind == "bool":
        arrays[key] = a > 0
    elif kind == "rename":
        arrays[_pick(rng, ("X", key + "_", "", "a/b", "input.1"))] = arrays.pop(key)
    elif kind == "extra":
        arrays["extra"] = np.zeros(3, np.float32)
    elif kind == "empty":
        arrays = {}
    elif kind == "scalar":
        arrays[key] = np.float32(1.0)
    elif kind == "big_endian":
        arrays[key] = a.astype(a.dtype.newbyteorder(">"))
    elif kind == "fortran":
        arrays[key] = np.asfortranarray(a)
    elif kind == "unicode":
        arrays[key] = np.array(["a", "b"])
    elif kind == "complex":
        arrays[key] = a.astype(np.complex64)
    elif kind == "zero_samples":
        arrays[key] = a[:0]
    else:
        return "npz.npy_only", _npy(a)
    buf = io.BytesIO()
    if kind == "object":
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in arrays.items():
                zf.writestr(f"{k}.npy", _npy(v))
        return f"npz.{kind}", buf.getvalue()
    return f"npz.{kind}", _npz_bytes(arrays, compressed=bool(rng.random() < 0.3))


_RUN_DTYPES = ("float64", "float16", "int32", "int64", "uint8", "bool", "complex64", ">f4", ">f8", "<U3", "S3",
               "V4", "object", "datetime64[s]", "bfloat16", "float8_e4m3fn")


def run_recipe(rng: np.random.Generator) -> list[dict[str, Any]]:
    """1-2 edits to apply to valid run inputs (JSON, so a finding saves and replays it)."""
    ops = []
    for _ in range(int(_pick(rng, (1, 1, 2)))):
        op = _pick(rng, ("dtype", "dtype", "shape", "shape", "huge", "value", "value", "layout", "layout", "layout",
                         "names", "container", "nonfinite"))
        choice = {"dtype": _RUN_DTYPES,
                  "shape": ("add_dim", "drop_dim", "dim_plus", "dim_zero", "scalar", "empty", "transpose", "flat"),
                  "huge": ("2^40", "2^62", "2^31", "neg_stride_huge"),
                  "value": ("list", "tuple", "pyscalar", "none", "str", "bytes", "dict", "object_array", "ragged",
                            "memoryview", "set", "nested_object", "matrix"),
                  "layout": ("fortran", "strided", "readonly", "misaligned", "negative_stride", "big_endian",
                             "subclass", "noncontig_view"),
                  "names": ("drop", "extra", "rename", "int_key", "bytes_key", "dup_case"),
                  "container": ("list", "tuple", "none", "str", "pairs", "mapping_proxy"),
                  "nonfinite": ("nan", "inf", "-inf")}[op]
        ops.append({"op": op, "kind": _pick(rng, choice), "pick": int(rng.integers(1 << 16))})
    return ops


_VALUE_PRESERVING = frozenset({"fortran", "strided", "readonly", "misaligned", "negative_stride", "big_endian",
                               "subclass", "noncontig_view"})


def apply_recipe(recipe: Sequence[Mapping[str, Any]], feeds: dict[str, np.ndarray]) -> tuple[Any, bool]:
    """The inputs a recipe makes from valid ``feeds`` and whether they hold the same values (only the layout,
    byte order or array type changed: a run must then give the same outputs)."""
    import types

    out: Any = dict(feeds)
    same = True
    for step in recipe:
        op, kind, pick = step["op"], step["kind"], int(step["pick"])
        if not isinstance(out, dict):
            break
        names = sorted(out, key=str)
        key = names[pick % len(names)] if names else "x"
        a = out.get(key, np.zeros(3, np.float32))
        same = same and op == "layout" and kind in _VALUE_PRESERVING
        if op not in ("names", "container") and (not isinstance(a, np.ndarray) or a.size > _MAX_INTERPRET_ELEMENTS):
            continue  # an earlier step made it a non-array or a huge view: nothing to transform here
        if op == "names":
            _rename(out, key, kind)
        elif op == "container":
            return {"list": lambda: list(out.values()), "tuple": lambda: tuple(out.values()), "none": lambda: None,
                    "str": lambda: "inputs", "pairs": lambda: list(out.items()),
                    "mapping_proxy": lambda: types.MappingProxyType(dict(out))}[kind](), False
        else:
            try:
                out[key] = _transform(a, op, kind)
            except (ValueError, TypeError, IndexError):
                continue  # numpy cannot make that input from this one (a matrix, an object array): skip the step
    return out, same


def _transform(a: np.ndarray, op: str, kind: str) -> Any:
    """One array edit of a recipe step (``op`` dtype, shape, huge, value, layout or nonfinite)."""
    if op == "dtype":
        return _retype(a, kind)
    if op == "shape":
        return _reshape(a, kind)
    if op == "value":
        return _revalue(a, kind)
    if op == "layout":
        return _relayout(a, kind)
    if op == "huge":
        first = np.asarray(a).reshape(-1)[:1].reshape(()) if a.size else np.zeros((), a.dtype)
        n = {"2^40": 1 << 40, "2^62": 1 << 62, "2^31": 1 << 31, "neg_stride_huge": 1 << 45}[kind]
        return np.broadcast_to(first, (n,) + a.shape[1:])  # zero strides: claims the size, holds one element
    if a.dtype.kind != "f":
        return a
    b = a.copy()
    b.flat[:: max(1, b.size // 3)] = float(kind)
    return b


def _rename(feeds: dict[Any, Any], key: Any, kind: str) -> None:
    """Drop, add or rename an input (to another name, an int, bytes, other letter case), in place."""
    if kind == "extra":
        feeds["not_an_input"] = np.zeros(3, np.float32)
        return
    if key not in feeds:
        return
    value = feeds.pop(key)
    if kind == "drop":
        return
    text = key if isinstance(key, str) else str(key)
    new = {"rename": f"{text}_renamed", "int_key": 0, "bytes_key": text.encode(),
           "dup_case": text.upper() if text.upper() != text else text.lower()}[kind]
    feeds[new] = value


def _retype(a: np.ndarray, kind: str) -> np.ndarray:
    """``a`` as dtype ``kind`` (zeros of it for strings, void, objects and dates; ``a`` itself when numpy
    cannot convert, e.g. strings that an earlier step made)."""
    if kind in ("<U3", "S3", "V4", "object", "datetime64[s]"):
        return np.zeros(a.shape, dtype=kind)
    try:
        if kind in ("bfloat16", "float8_e4m3fn"):
            import ml_dtypes

            return a.astype(getattr(ml_dtypes, kind))
        return a.astype(kind)
    except (ValueError, TypeError, OverflowError):
        return a


def _reshape(a: np.ndarray, kind: str) -> Any:
    """``a`` with another shape: a dim more or less, one longer or zero, 0-d, empty, transposed, flat."""
    if kind == "add_dim":
        return a[None]
    if kind == "drop_dim":
        return a[0] if a.ndim > 1 else a.reshape(-1)[: max(a.size // 2, 1)]
    if kind == "dim_plus":
        return np.concatenate([a, a[:1]]) if a.ndim else a
    if kind == "dim_zero":
        return a[:0] if a.ndim else a.reshape(0)
    if kind == "scalar":
        return a.reshape(-1)[0] if a.size else np.float32(0)
    if kind == "empty":
        return np.zeros((0,) * max(a.ndim, 1), a.dtype)
    return a.T if kind == "transpose" else a.reshape(-1)


def _revalue(a: np.ndarray, kind: str) -> Any:
    """Something that is not a plain array of ``a``'s values: Python containers, scalars, objects."""
    values: dict[str, Callable[[], Any]] = {
        "list": a.tolist, "tuple": lambda: tuple(a.tolist()) if a.ndim else a.item(),
        "pyscalar": lambda: 1.5, "none": lambda: None, "str": lambda: "x", "bytes": a.tobytes,
        "dict": lambda: {"a": 1}, "object_array": lambda: a.astype(object),
        "ragged": lambda: [[1.0, 2.0], [3.0]],
        "memoryview": lambda: memoryview(np.ascontiguousarray(a)), "set": lambda: {1, 2},
        "nested_object": lambda: np.array([a, a], dtype=object),
        "matrix": lambda: np.asmatrix(a.reshape(a.shape[0], -1)) if a.ndim else a}
    return values[kind]()


def _relayout(a: np.ndarray, kind: str) -> Any:
    """The same values as ``a`` in another memory layout, byte order or array type."""
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros(a.shape + (2,), a.dtype)
        big[..., 0] = a
        return big[..., 0]
    if kind == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if kind == "misaligned":
        buf = np.zeros(a.nbytes + 1, np.uint8)[1:]
        b = buf.view(a.dtype).reshape(a.shape) if a.dtype.itemsize and a.size else a.copy()
        b[...] = a
        return b
    if kind == "negative_stride":
        if not a.ndim:
            return a
        return np.ascontiguousarray(a[::-1])[::-1]
    if kind == "big_endian":
        return a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    if kind == "subclass":
        class Sub(np.ndarray):
            pass

        return a.view(Sub)
    b = np.repeat(a[..., None], 3, axis=-1) if a.ndim else a
    return b[..., 1] if a.ndim else b


# ====================================================================== case generation

def _case_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, KINDS.index(kind), index])


def make_case(kind: str, index: int, seeds: SeedSet, seed: int, *, compile_fraction: float = 0.03,
              quantize_fraction: float = 0.2) -> Case:
    """Case ``index`` of ``kind``: a function of (seed, kind, index) and the seed files alone.

    A mutator that fails gives a case that reports a ``harness`` outcome (a fuzzer bug, kept visible)
    instead of ending the campaign."""
    try:
        return _make_case(kind, index, seeds, seed, compile_fraction, quantize_fraction)
    except Exception as e:  # noqa: BLE001 - any mutator bug: recorded as this case's outcome
        return Case(kind, index, "?", "mutator-failed", b"", {"mutator_error": f"{type(e).__name__}: {e}"[:300]})


def _make_case(kind: str, index: int, seeds: SeedSet, seed: int, compile_fraction: float,
               quantize_fraction: float) -> Case:
    rng = _case_rng(seed, kind, index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "onnx":
            names = sorted(seeds.onnx)
            name = _pick(rng, names)
            mutation, data = mutate_onnx(rng, seeds.onnx[name], [seeds.onnx[n] for n in names])
            params = {"via": _pick(rng, ("path", "path", "bytes")), "compile": bool(rng.random() < compile_fraction),
                      "input_seed": int(rng.integers(1 << 30))}
            return Case(kind, index, name, mutation, data, params)
        if kind == "artifact":
            names = sorted(seeds.artifact)
            name = _pick(rng, names)
            mutation, data, rehash = mutate_artifact(rng, seeds.artifact[name], [seeds.artifact[n] for n in names])
            return Case(kind, index, name, mutation, data, {"unsigned": bool(rng.random() < 0.9), "rehash": rehash,
                                                            "inspect": bool(rng.random() < 0.25)})
        if kind == "calib":
            names = sorted(seeds.calib)
            name = _pick(rng, names)
            mutation, data = mutate_npz(rng, seeds.calib[name], [seeds.calib[n] for n in names])
            return Case(kind, index, name, mutation, data,
                        {"layout": "dir" if name == "sample" else "file",
                         "quantize": bool(rng.random() < quantize_fraction)})
        names = sorted(seeds.artifact)
        name = _pick(rng, names)
        input_seed = int(rng.integers(1 << 30))
        if rng.random() < 0.6:
            return Case(kind, index, name, "run.api", b"", {"via": "api", "recipe": run_recipe(rng),
                                                            "input_seed": input_seed})
        feeds = _artifact_feeds(seeds.artifact[name], input_seed)
        mutation, data = mutate_npz(rng, _npz_bytes(feeds), valid=feeds)
        suffix = ".npy" if data.startswith(_NPY_MAGIC) and rng.random() < 0.5 else ".npz"
        return Case(kind, index, name, f"run.cli.{mutation}", data, {"via": "cli", "suffix": suffix,
                                                                      "input_seed": input_seed})


def _artifact_feeds(artifact: bytes, seed: int) -> dict[str, np.ndarray]:
    """Valid seeded inputs for an artifact (from its manifest: dtypes, shapes with symbols bound)."""
    with zipfile.ZipFile(io.BytesIO(artifact)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    return _feeds_for(manifest["inputs"], manifest.get("symbols") or {}, seed)


def _feeds_for(specs: Sequence[Mapping[str, Any]], symbols: Mapping[str, int], seed: int,
               limit: int = _MAX_INTERPRET_ELEMENTS) -> dict[str, np.ndarray]:
    """Seeded arrays for tensor specs (name, dtype, shape); ValueError when they would be too big to make."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [d if isinstance(d, int) else int(symbols.get(d, 1)) if isinstance(symbols.get(d, 1), int) else 1
                 for d in spec["shape"]]
        if any(d < 0 for d in shape) or int(np.prod(shape, dtype=object)) > limit:
            raise ValueError(f"input {spec['name']!r} shape {shape} is too big for the harness")
        dt = np.dtype(spec["dtype"]) if spec["dtype"] not in ("bfloat16",) else np.dtype(np.float32)
        feeds[spec["name"]] = (rng.integers(0, 2, shape).astype(dt) if dt.kind == "b" else
                               rng.integers(0, 8, shape).astype(dt) if dt.kind in "iu" else
                               rng.standard_normal(shape).astype(dt))
    return feeds


# ====================================================================== running one case (the worker's body)

class _Ctx:
    """What a worker keeps between cases: the seed folder, a scratch folder, loaded seed Sessions."""

    def __init__(self, seed_root: str | os.PathLike, scratch: str | os.PathLike | None = None):
        self.seed_root = Path(seed_root)
        self.tmp = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="kiln-fuzz-inputs-"))
        self._sessions: dict[str, Any] = {}
        self._calib_graph: Any = None
        self.artifact_cases = 0

    def write(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    def calib_graph(self) -> Any:
        if self._calib_graph is None:
            from kiln.frontend.lift import lift

            self._calib_graph = lift(str(self.seed_root / "calib_model.onnx"))
        return self._calib_graph

    def session(self, name: str) -> Any:
        if name not in self._sessions:
            from kiln.runtime import load

            self._sessions[name] = load(self.seed_root / "artifact" / f"{name}.kiln", **_load_kwargs())
        return self._sessions[name]

    def seed_feeds(self, name: str, seed: int) -> dict[str, np.ndarray]:
        return _artifact_feeds((self.seed_root / "artifact" / f"{name}.kiln").read_bytes(), seed)

    def close(self) -> None:
        for s in self._sessions.values():
            _close(s)
        self._sessions.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


Stage = Callable[[str], None]


def _graph_feeds(graph: Any, seed: int) -> dict[str, np.ndarray] | None:
    """Random inputs for a lifted graph, or None when one of its values is too big to interpret here."""
    from kiln.ir.types import is_static_dim

    for v in graph.values():
        dims = [d if is_static_dim(d) else 1 for d in v.type.shape]
        if any(d < 0 for d in dims) or int(np.prod(dims, dtype=object)) > _MAX_INTERPRET_ELEMENTS:
            return None
    specs = [{"name": v.name, "dtype": v.type.np_dtype.str if v.type.np_dtype.kind != "V" else "float32",
              "shape": [d if is_static_dim(d) else 1 for d in v.type.shape]} for v in graph.inputs]
    try:
        return _feeds_for(specs, {}, seed)
    except (ValueError, TypeError):
        return None


def _target_onnx(case: Case, ctx: _Ctx, stage: Stage) -> str:
    from kiln.frontend.lift import lift
    from kiln.ir.interpret import interpret

    src: Any = ctx.write("model.onnx", case.data) if case.params.get("via") == "path" else case.data
    stage("lift")
    graph = lift(src)
    feeds = _graph_feeds(graph, int(case.params.get("input_seed", 0)))
    if feeds is not None:
        stage("interpret")
        with np.errstate(all="ignore"):
            interpret(graph, feeds)
    if case.params.get("compile"):
        import kiln

        stage("compile")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kiln.compile(src)
    return ""


def _target_artifact(case: Case, ctx: _Ctx, stage: Stage) -> str:
    from kiln.runtime import load

    ctx.artifact_cases += 1
    path = ctx.write("model.kiln", case.data)
    if case.params.get("inspect"):
        _inspect_artifact(path, bool(case.params.get("unsigned", True)), stage)
        return ""
    stage("load")
    session = load(path, **_load_kwargs(bool(case.params.get("unsigned", True))))
    try:
        seed = int(case.params.get("input_seed", 0))
        symbols = session.manifest.get("symbols") or {}
        try:
            feeds = _feeds_for([{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in session.inputs],
                               symbols if isinstance(symbols, dict) else {}, seed)
        except (ValueError, TypeError):
            feeds = ctx.seed_feeds(case.seed, seed)
        stage("run")
        session.run(feeds)
    finally:
        _close(session)
    return ""


def _inspect_artifact(path: str, unsigned: bool, stage: Stage) -> None:
    """``kiln inspect --ir`` on the file, its console output thrown away (rich markup in it must not fail)."""
    from rich.console import Console

    import kiln.cli as cli

    saved = cli.console
    cli.console = Console(file=io.StringIO(), width=120)
    try:
        stage("inspect")
        with contextlib.redirect_stdout(io.StringIO()):  # --ir writes the IR text to stdout itself
            if len(inspect.signature(cli.inspect_artifact).parameters) >= 3:
                cli.inspect_artifact(path, True, _load_kwargs(unsigned))
            else:
                cli.inspect_artifact(path, True)
    finally:
        cli.console = saved


def _target_calib(case: Case, ctx: _Ctx, stage: Stage) -> str:
    import kiln
    from kiln.passes.calibrate import check_calibration, load_calibration

    if case.params.get("layout") == "dir":
        folder = ctx.tmp / "calib_dir"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "a.npz").write_bytes(case.data)
        shutil.copyfile(ctx.seed_root / "calib" / "sample.npz", folder / "b.npz")
        path = str(folder)
    else:
        path = ctx.write("calib.npz", case.data)
    graph = ctx.calib_graph()
    stage("read")
    calib = load_calibration(path)
    stage("check")
    check_calibration(graph, calib)
    if case.params.get("quantize"):
        stage("quantize")
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            kiln.quantize(graph, path)
    return ""


def _same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True) for k in a)


def _target_run(case: Case, ctx: _Ctx, stage: Stage) -> str:
    session = ctx.session(case.seed)
    feeds = ctx.seed_feeds(case.seed, int(case.params.get("input_seed", 0)))
    if case.params.get("via") == "api":
        inputs, same = apply_recipe(case.params["recipe"], feeds)
        stage("run")
        got = session.run(inputs)
        if same:
            want = session.run(feeds)
            if not _same(got, want):
                return "the same values in another layout/byte order gave other outputs"
        return ""
    from kiln.cli import _read_npz

    path = ctx.write("inputs" + str(case.params.get("suffix", ".npz")), case.data)
    stage("read")
    arrays = _read_npz(path, "--inputs")
    stage("run")
    session.run(arrays)
    return ""


TARGETS: dict[str, Callable[[Case, _Ctx, Stage], str]] = {
    "onnx": _target_onnx, "artifact": _target_artifact, "calib": _target_calib, "run": _target_run}

_REPO = Path(__file__).resolve().parents[1]


def _site(tb: Any) -> str:
    """``file:function`` of the innermost traceback frame in kiln's source (else the innermost frame)."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?"
    here = Path(__file__).resolve()
    for fr in reversed(frames):
        p = Path(fr.filename).resolve()
        if p != here and _REPO in p.parents and ".venv" not in p.parts:
            return f"{p.relative_to(_REPO)}:{fr.name}"
    fr = frames[-1]
    return f"{Path(fr.filename).name}:{fr.name}"


def execute(case: Case, ctx: _Ctx, stage: Stage = lambda s: None) -> dict[str, Any]:
    """Run one case and classify it: ok, error (a kiln.Error), foreign (any other exception) or wrong."""
    from kiln.runtime.errors import Error

    where = ["start"]

    def at(s: str) -> None:
        where[0] = s
        stage(s)

    t0 = time.perf_counter()
    result: dict[str, Any]
    if case.params.get("mutator_error"):
        return {"outcome": "harness", "error": "mutator", "message": case.params["mutator_error"], "stage": "start",
                "site": "fuzz/inputs.py:make_case", "seconds": 0.0}
    try:
        wrong = TARGETS[case.kind](case, ctx, at)
        result = {"outcome": "wrong", "message": wrong} if wrong else {"outcome": "ok"}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the oracle: anything a target raises is classified
        kiln_error = isinstance(e, Error)
        outcome = "harness" if where[0] == "start" else "error" if kiln_error else "foreign"
        result = {"outcome": outcome, "error": type(e).__name__,
                  "module": type(e).__module__, "message": _clip(str(e), 600), "site": _site(e.__traceback__)}
        if outcome != "error":
            result["traceback"] = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-40))
    result["stage"] = where[0]
    result["seconds"] = time.perf_counter() - t0
    return result


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return 0.0


def _apply_plugins(plugins: Sequence[str]) -> None:
    """Import each ``module`` (or call ``module:function``): tests plant bugs in workers this way."""
    for spec in plugins:
        module, _, func = spec.partition(":")
        mod = importlib.import_module(module)
        if func:
            getattr(mod, func)()


def _child(conn: Connection, seed_root: str, scratch: str, plugins: Sequence[str], mem_limit: int,
           stage_buf: Any) -> None:
    """The worker process: cap the address space, import once, then answer cases until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    os.environ["KILN_HOME"] = str(Path(seed_root).resolve() / "kiln_home")
    if mem_limit > 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    warnings.simplefilter("ignore")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    _apply_plugins(plugins)
    import kiln.frontend.lift  # noqa: F401  (pay the imports before the first case)

    ctx = _Ctx(seed_root, scratch)

    def stage(s: str) -> None:
        stage_buf.value = s.encode()[:63]

    conn.send({"ready": True})
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            stage("start")
            res = execute(Case(**msg), ctx, stage)
            res["rss_mib"] = _rss_mib()
            res["artifact_cases"] = ctx.artifact_cases
            conn.send(res)
    finally:
        ctx.close()


class _Proc:
    """One worker process: submit a case, collect its result, or call it a crash or a hang."""

    def __init__(self, seed_root: Path, opts: InputsOptions):
        self.seed_root, self.opts = seed_root, opts
        self.proc: Any = None
        self.conn: Connection | None = None
        self.case: Case | None = None
        self.started = 0.0
        self.starts = 0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.stage = ctx.Array("c", 64, lock=False)
        limit = int(self.opts.mem_limit_gib * (1 << 30))
        self.scratch = tempfile.mkdtemp(prefix="kiln-fuzz-inputs-")  # the parent's: removed even after a crash
        self.proc = ctx.Process(target=_child, args=(child, str(self.seed_root), self.scratch, self.opts.plugins,
                                                     limit, self.stage), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        self.starts += 1
        if not parent.poll(180):
            self.kill()
            raise RuntimeError("the fuzz worker did not start within 180 s")
        try:
            parent.recv()
        except EOFError:
            code = self.proc.exitcode
            raise RuntimeError(f"the fuzz worker died while starting (exit code {code})") from None

    def submit(self, case: Case) -> None:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        assert self.conn is not None
        self.case = case
        self.stage.value = b"submit"
        self.started = time.monotonic()
        self.conn.send(asdict(case))

    def overdue(self) -> bool:
        return self.case is not None and time.monotonic() - self.started > self.opts.timeout_s

    def collect(self) -> dict[str, Any]:
        """The running case's result (call when the pipe is readable or the case is overdue)."""
        assert self.conn is not None
        elapsed = time.monotonic() - self.started
        stage = bytes(self.stage.value).decode(errors="replace") or "start"
        if self.overdue() and not self.conn.poll():
            self.kill()
            res = {"outcome": "hang", "stage": stage, "message": f"no answer within {self.opts.timeout_s:g} s"}
        else:
            try:
                res = self.conn.recv()
            except (EOFError, OSError):
                code = self._reap()
                name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
                res = {"outcome": "crash", "stage": stage, "message": f"worker process died ({name})",
                       "exitcode": code}
        res.setdefault("seconds", elapsed)
        self.case = None
        if res.get("artifact_cases", 0) >= self.opts.recycle or res.get("rss_mib", 0) > 3072:
            self.stop()
        return res

    def _reap(self) -> int | None:
        if self.proc is not None:
            self.proc.join(5)
            code = self.proc.exitcode
        else:
            code = None
        self._forget()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._forget()

    def stop(self) -> None:
        """Ask the child to exit (it cleans its scratch folder), kill it if it does not."""
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(None)
            self.proc.join(10)
        self.kill()

    def _forget(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None
        if getattr(self, "scratch", None):
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = ""


# ====================================================================== the campaign

@dataclass
class KindStats:
    """Outcome counts of one kind."""

    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # kiln error class -> count
    foreign: Counter = field(default_factory=Counter)  # exception type -> count
    stages: Counter = field(default_factory=Counter)  # "stage outcome" -> count
    busy_s: float = 0.0

    def to_json(self, elapsed: float) -> dict[str, Any]:
        return {"cases": self.cases, **{o: self.outcomes.get(o, 0) for o in OUTCOMES},
                "errors_by_class": dict(self.errors.most_common()), "foreign_by_type": dict(self.foreign.most_common()),
                "by_stage": dict(sorted(self.stages.items())), "busy_s": round(self.busy_s, 2),
                "cases_per_s": round(self.cases / elapsed, 2) if elapsed > 0 else 0.0}


@dataclass
class InputFinding:
    """One unique finding (kind, outcome, exception type, site): the first case, how often seen."""

    id: str
    kind: str
    outcome: str
    error: str
    site: str
    stage: str
    message: str
    mutation: str
    count: int = 1
    folder: str = ""
    repro: str = ""


class InputsCampaign:
    """A running malformed-input campaign (``run_inputs`` drives it; tests read its fields)."""

    def __init__(self, opts: InputsOptions, seeds: SeedSet, progress: Callable[[dict[str, Any]], None] | None = None):
        self.opts, self.seeds, self.progress = opts, seeds, progress
        self.stats = {k: KindStats() for k in opts.kinds}
        self.findings: dict[tuple[str, ...], InputFinding] = {}
        self.digests: dict[str, list[tuple[int, str, str, str]]] = {k: [] for k in opts.kinds}
        self.t0 = time.monotonic()
        self.interrupted = False
        self._last_write = 0.0
        self.out = Path(opts.out) if opts.out else None

    # ------------------------------------------------------------------ scheduling
    def cases(self) -> Iterator[Case]:
        """Cases round-robin over the kinds until each has ``iterations`` or the time is up."""
        index = dict.fromkeys(self.opts.kinds, 0)
        while True:
            live = [k for k in self.opts.kinds if self.opts.iterations is None or index[k] < self.opts.iterations]
            if not live or self.time_up():
                return
            for k in live:
                if self.time_up():
                    return
                yield make_case(k, index[k], self.seeds, self.opts.seed, compile_fraction=self.opts.compile_fraction,
                                quantize_fraction=self.opts.quantize_fraction)
                index[k] += 1

    def time_up(self) -> bool:
        return self.opts.time_s is not None and time.monotonic() - self.t0 >= self.opts.time_s

    def run(self) -> None:
        """Run every case (in workers, or in this process with ``jobs=0``); write the report as it goes."""
        try:
            if self.opts.jobs == 0:
                self._run_in_process()
            else:
                self._run_workers()
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self.write_report()

    def _run_in_process(self) -> None:
        ctx = _Ctx(self.seeds.root)
        try:
            with _kiln_home(self.seeds.root):
                for case in self.cases():
                    self.record(case, execute(case, ctx))
        finally:
            ctx.close()

    def _run_workers(self) -> None:
        procs = [_Proc(self.seeds.root, self.opts) for _ in range(self.opts.jobs)]
        todo = self.cases()
        upcoming = next(todo, None)
        try:
            while True:
                for p in procs:
                    if p.case is None and upcoming is not None:
                        p.submit(upcoming)
                        upcoming = next(todo, None)  # made while the worker runs the one just sent
                busy = [p for p in procs if p.case is not None]
                if not busy:
                    return
                ready = wait([p.conn for p in busy if p.conn is not None], timeout=0.5)
                for p in busy:
                    if p.conn in ready or p.overdue():
                        case = p.case
                        assert case is not None
                        self.record(case, p.collect())
        finally:
            for p in procs:
                if p.case is not None:  # interrupted mid-case: the case is lost anyway, do not wait for it
                    p.kill()
                p.stop()

    # ------------------------------------------------------------------ results
    def record(self, case: Case, res: dict[str, Any]) -> None:
        """Count one result; save a finding's folder the first time its key is seen."""
        st = self.stats[case.kind]
        st.cases += 1
        outcome = res["outcome"]
        st.outcomes[outcome] += 1
        st.busy_s += float(res.get("seconds", 0.0))
        st.stages[f"{res.get('stage', '?')} {outcome}"] += 1
        if outcome == "error":
            st.errors[res["error"]] += 1
        elif outcome == "foreign":
            st.foreign[f"{res.get('module', '')}.{res['error']}".lstrip(".")] += 1
        self.digests[case.kind].append((case.index, case.mutation, case.digest, outcome))
        if outcome in FINDING_OUTCOMES:
            self._finding(case, res)
        now = time.monotonic()
        if now - self._last_write >= _REPORT_EVERY_S:
            self.write_report()
            if self.progress is not None:
                self.progress(self.status())

    def _finding(self, case: Case, res: dict[str, Any]) -> None:
        error = res.get("error", "") if res["outcome"] == "foreign" else ""
        site = res.get("site", "") if res["outcome"] == "foreign" else res.get("stage", "")
        key = (case.kind, res["outcome"], error, site)
        if key in self.findings:
            self.findings[key].count += 1
            return
        fid = f"{case.kind}-{res['outcome']}-{error or res.get('stage', 'x')}-{case.digest}"
        fid = re.sub(r"[^A-Za-z0-9_.-]", "_", fid)
        f = InputFinding(fid, case.kind, res["outcome"], error, site, str(res.get("stage", "")),
                         _clip(str(res.get("message", "")), 300), case.mutation)
        self.findings[key] = f
        if self.out is not None:
            folder = self.out / "findings" / fid
            save_finding(folder, case, res, self.seeds.root, self.opts.seed)
            f.folder = str(folder)
            f.repro = repro_command(folder)

    def status(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        return {"seconds": elapsed, "kinds": {k: s.to_json(elapsed) for k, s in self.stats.items()},
                "findings": len(self.findings)}

    def report(self) -> dict[str, Any]:
        """Everything the campaign counted, as JSON."""
        st = self.status()
        return {"level": "inputs", "seed": self.opts.seed, "options": {**asdict(self.opts)},
                "seconds": round(st["seconds"], 2), "interrupted": self.interrupted,
                "tests": sum(s.cases for s in self.stats.values()), "kinds": st["kinds"],
                "findings": [asdict(f) for f in self.findings.values()]}

    def write_report(self) -> None:
        """``OUT/report.json``, atomically (every few seconds, and at the end or on interruption)."""
        self._last_write = time.monotonic()
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / "report.json", json.dumps(self.report(), indent=1, default=str).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ====================================================================== findings on disk, replay

def save_finding(folder: Path, case: Case, res: Mapping[str, Any], seed_root: Path, campaign_seed: int) -> None:
    """A finding's folder: the input bytes, case.json (case, outcome, traceback), the seeds the target
    needs (so the folder replays alone) and the one-line reproduction command."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = str(case.params.get("suffix", _EXT[case.kind]))
    if case.data or case.kind != "run":
        _atomic_write(folder / f"input{suffix}", case.data)
    seeds = folder / "seeds"
    if case.kind == "run":
        (seeds / "artifact").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seed_root / "artifact" / f"{case.seed}.kiln", seeds / "artifact" / f"{case.seed}.kiln")
    elif case.kind == "calib":
        (seeds / "calib").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seed_root / "calib_model.onnx", seeds / "calib_model.onnx")
        shutil.copyfile(seed_root / "calib" / "sample.npz", seeds / "calib" / "sample.npz")
    elif case.kind == "artifact":
        (seeds / "artifact").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seed_root / "artifact" / f"{case.seed}.kiln", seeds / "artifact" / f"{case.seed}.kiln")
    public = seed_root / "kiln_home" / "signing.pub"
    if case.kind in ("artifact", "run") and public.is_file():  # the public half only: replays trust the seeds
        (seeds / "kiln_home").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(public, seeds / "kiln_home" / "signing.pub")
    info = {"case": case.to_json(), "result": {k: v for k, v in res.items() if k != "traceback"},
            "campaign_seed": campaign_seed, "input": f"input{suffix}", "repro": repro_command(folder)}
    _atomic_write(folder / "case.json", json.dumps(info, indent=1, default=str).encode())
    _atomic_write(folder / "traceback.txt", str(res.get("traceback") or res.get("message", "")).encode())


def repro_command(folder: Path) -> str:
    return f"{sys.executable} -m kiln.fuzz.inputs {folder}"


def read_case(folder: str | os.PathLike) -> tuple[Case, dict[str, Any]]:
    """The case a finding folder holds (its bytes read back) and what it did when found."""
    p = Path(folder)
    info = json.loads((p / "case.json").read_text())
    c = info["case"]
    data_path = p / info["input"]
    data = data_path.read_bytes() if data_path.exists() else b""
    return Case(c["kind"], int(c["index"]), c["seed"], c["mutation"], data, c["params"]), info["result"]


def replay_finding(folder: str | os.PathLike, *, timeout_s: float = 60.0, isolated: bool = True) -> dict[str, Any]:
    """Run a saved finding again (in a worker, or in this process for a debugger): its result now."""
    case, _ = read_case(folder)
    seeds = Path(folder) / "seeds"
    if not isolated:
        ctx = _Ctx(seeds)
        try:
            with _kiln_home(seeds):
                return execute(case, ctx)
        finally:
            ctx.close()
    proc = _Proc(seeds, InputsOptions(kinds=(case.kind,), iterations=1, timeout_s=timeout_s))
    try:
        proc.submit(case)
        assert proc.conn is not None
        proc.conn.poll(timeout_s + 1)
        return proc.collect()
    finally:
        proc.stop()


# ====================================================================== reporting and the CLI

def summary_table(report: Mapping[str, Any]) -> Any:
    """Per kind: cases, ok, kiln errors, foreign, crashes, hangs, wrong, harness failures, cases/s."""
    from rich.table import Table

    table = Table(title=f"malformed inputs: {report['tests']} cases in {report['seconds']:.0f} s",
                  title_justify="left")
    for col in ("kind", "cases", "ok", "kiln err", "foreign", "crash", "hang", "wrong", "harness", "/s"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind, s in report["kinds"].items():
        table.add_row(kind, str(s["cases"]), str(s["ok"]), str(s["error"]), str(s["foreign"]), str(s["crash"]),
                      str(s["hang"]), str(s["wrong"]), str(s["harness"]), f"{s['cases_per_s']:.1f}")
    return table


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """Plain lines under the table: kiln errors by class per kind, then one block per finding."""
    lines = []
    for kind, s in report["kinds"].items():
        by_class = ", ".join(f"{k} {v}" for k, v in s["errors_by_class"].items()) or "none"
        lines.append(f"{kind} kiln errors: {by_class}")
    for f in report["findings"]:
        lines.append(f"finding: {f['kind']} {f['outcome']} {f['error']} at {f['site'] or f['stage']} "
                     f"(seen {f['count']}x, first from {f['mutation']}): {f['message'][:200]}")
        if f["repro"]:
            lines.append(f"  reproduce: {f['repro']}")
    return lines


def run_inputs(opts: InputsOptions, progress: Callable[[dict[str, Any]], None] | None = None,
               seed_dir: str | os.PathLike | None = None) -> InputsCampaign:
    """Prepare the seeds (under ``OUT/seeds``, ``seed_dir``, or a temporary folder) and run a campaign."""
    with contextlib.ExitStack() as stack:
        if seed_dir is None and opts.out:
            seed_dir = Path(opts.out) / "seeds"
        if seed_dir is None:
            seed_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-fuzz-seeds-"))
        if opts.out:
            out = Path(opts.out)
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {out}: exists and is not a folder")
            out.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        root = prepare_seeds(seed_dir, zoo=opts.zoo, kinds=opts.kinds)
        camp = InputsCampaign(opts, SeedSet.read(root), progress)
        camp.run()
        return camp


def run_cli(args: Any, console: Any) -> int:
    """``kiln fuzz --level inputs``: run, print the per-kind table and the findings; exit 1 on any finding."""
    from rich.live import Live
    from rich.text import Text

    from kiln.fuzz.campaign import Interrupted, parse_duration

    kinds = tuple(k.strip() for k in (getattr(args, "kind", None) or ",".join(KINDS)).split(",") if k.strip())
    time_s = parse_duration(args.time) if args.time else (None if args.iterations else 60.0)
    jobs = 0 if getattr(args, "in_process", False) else args.jobs
    opts = InputsOptions(kinds=kinds, iterations=args.iterations, time_s=time_s, seed=args.seed, out=args.out,
                         timeout_s=args.timeout, jobs=jobs, plugins=tuple(getattr(args, "plugin", ()) or ()))

    def line(st: Mapping[str, Any]) -> Text:
        parts = [f"{k} {s['cases']} ({s['error']} err, {sum(s[o] for o in FINDING_OUTCOMES)} bad)"
                 for k, s in st["kinds"].items()]
        return Text(f"[{st['seconds']:.0f} s] " + "; ".join(parts) + f"; {st['findings']} findings")

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted  # like SIGINT, but the CLI exits 143

    signal.signal(signal.SIGTERM, on_term)
    try:
        with Live(console=console, refresh_per_second=2, transient=True) as live:
            camp = run_inputs(opts, progress=lambda st: live.update(line(st)))
    except Interrupted:
        console.print(f"terminated; {args.out}/report.json is up to date" if args.out else "terminated",
                      markup=False)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = camp.report()
    console.print(summary_table(report))
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False)
    if args.out:
        console.print(f"wrote {Path(args.out) / 'report.json'}" + (" and findings/" if report["findings"] else ""))
    return 1 if report["findings"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiln.fuzz.inputs FINDING_DIR [--in-process]``: replay one saved finding."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m kiln.fuzz.inputs", description=main.__doc__)
    p.add_argument("folder", help="a finding folder (with case.json)")
    p.add_argument("--in-process", action="store_true", help="run in this process (a crash kills it; for a debugger)")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    case, was = read_case(a.folder)
    now = replay_finding(a.folder, timeout_s=a.timeout, isolated=not a.in_process)
    print(f"{case.kind} case {case.index} of seed {case.seed} ({case.mutation})")
    print(f"found: {was.get('outcome')} {was.get('error', '')} at {was.get('stage', '')}")
    print(f"now:   {now.get('outcome')} {now.get('error', '')} at {now.get('stage', '')}: "
          f"{now.get('message', '')}")
    if now.get("traceback"):
        print(now["traceback"])
    return 1 if now.get("outcome") in FINDING_OUTCOMES else 0


if __name__ == "__main__":
    sys.exit(main())
