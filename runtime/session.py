"""Load an artifact and run it: ``load(path) -> Session``, ``Session.run(inputs) -> outputs``.

Loading validates the file (size limits, digest and signature, manifest,
hashes, weights), the target's architecture and the CPU features the code
needs, all before the native library is touched.  The runtime never imports the
``tvm`` Python package: it reaches ``libtvm_runtime.so`` through ``tvm_ffi``
(:mod:`.tvm_backend`, loaded on first use, without torch), so it maps no compiler
code in any mode (``KILN_RUNTIME_ONLY``, which used to ask for that, is retired
and ignored).  A Session is safe to use from several threads: each thread gets
its own VirtualMachine over the shared library and read-only weights.
``Session.close()`` (or ``with``, or garbage collection) unloads the library: TVM
keeps every module it loads alive for the process by default
(``tvm_ffi.load_module(keep_module_alive=True)``), so kiln loads with
``keep_module_alive=False`` and the last reference's release ``dlclose``s it.
Nothing but a ``kiln.Error`` leaves :func:`load` or :meth:`Session.run`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import threads, tvm_backend
from .artifact import ArtifactError, bits_dtype, numpy_dtype, read_artifact
from .cpu import host_arch, missing_cpu_features, required_cpu_features, target_arch
from .errors import Error, InputError
from .limits import DEFAULT_LIMITS, Limits, check_limit
from .signing import TrustInfo

__all__ = ["InputError", "Session", "TensorSpec", "configure_threads", "load"]

@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the compiled model; dims are ints or symbol expressions ("N", "64*N")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __getitem__(self, key: str) -> Any:
        """Mapping-style access (``spec["shape"]``) as in the manifest's JSON."""
        if key not in ("name", "dtype", "shape"):
            raise KeyError(key)
        return list(self.shape) if key == "shape" else getattr(self, key)

    @classmethod
    def from_manifest(cls, spec: Mapping[str, Any]) -> TensorSpec:
        return cls(str(spec["name"]), str(spec["dtype"]), tuple(spec["shape"]))


def _check_target(path: str, manifest: Mapping[str, Any]) -> None:
    """The artifact must be CPU code for this architecture whose ISA extensions this CPU has."""
    target = manifest["target"]
    kind = str(target.get("kind", "llvm"))
    if kind != "llvm":
        raise ArtifactError(f"{path}: compiled for target kind {kind!r}; this runtime runs CPU (llvm) code only")
    arch, host = target_arch(target), host_arch()
    if arch and host and arch != host:
        raise ArtifactError(f"{path}: compiled for {arch} (mtriple={target.get('mtriple')}), "
                            f"this machine is {host}: recompile on (or for) this machine")
    needed = list(dict.fromkeys([*manifest["cpu_features"], *required_cpu_features(target)]))
    missing = missing_cpu_features(needed)
    if missing:
        mattr = target.get("mattr")
        built = f"mcpu={target.get('mcpu', '?')}" + (f" mattr={','.join(map(str, mattr))}" if mattr else "")
        raise ArtifactError(f"{path}: artifact was compiled for {built} which needs CPU features "
                            f"{', '.join(missing)}; this CPU lacks them (running it would die with SIGILL): "
                            f"recompile with --target 'llvm -mcpu=...' for this machine (or with no --target: "
                            f"the host CPU is the default)")


def _load_library(path: str, library: bytes) -> Any:
    """Load lib.so from a private temp file (removed right after ``dlopen``), unloadable when released."""
    tmpdir = tempfile.mkdtemp(prefix="kiln-lib-")
    try:
        lib_path = os.path.join(tmpdir, f"{uuid.uuid4().hex}.so")
        with open(lib_path, "wb") as f:
            f.write(library)
        module = tvm_backend.load_module(lib_path)
        threads.adopt(lib_path)  # parallel loops on kiln's pool (runtime/threads.py); TVM's if it cannot
        return module
    except Exception as e:
        raise ArtifactError(f"{path}: lib.so could not be loaded ({type(e).__name__}: {e})") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _dim_terms(dim: int | str) -> tuple[int, list[str]]:
    """A dim as (integer coefficient, symbol factors): "64*N" -> (64, ["N"])."""
    if isinstance(dim, int):
        return dim, []
    coef, syms = 1, []
    for part in str(dim).replace(" ", "").split("*"):
        if part.isdigit():
            coef *= int(part)
        else:
            syms.append(part)
    return coef, syms


def _describe_dim(dim: int | str) -> str:
    coef, syms = _dim_terms(dim)
    return f"symbol {dim}" if coef == 1 and len(syms) == 1 else str(dim)


class _Loaded:
    """What a Session holds of TVM (library module, weights, per-thread VMs), released once by close or GC."""

    __slots__ = ("module", "weights", "local")

    def __init__(self, module: Any, weights: tuple[Any, ...]) -> None:
        self.module = module
        self.weights = weights
        self.local: threading.local | None = threading.local()

    def release(self) -> None:
        """Drop every reference: the library is ``dlclose``d once no call in flight still holds it."""
        self.local = None
        self.weights = ()
        self.module = None


class Session:
    """A loaded artifact, ready to run; thread-safe (one VirtualMachine per thread).

    ``close()`` (or leaving a ``with`` block, or garbage collection) unloads the
    library; calls already running finish first (they hold their own references).
    """

    def __init__(self, path: str, manifest: dict[str, Any], module: Any, weights: Sequence[Any],
                 ir_text: str, *, trust: TrustInfo | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.ir_text = ir_text
        self.trust = trust
        self.inputs = [TensorSpec.from_manifest(s) for s in manifest["inputs"]]
        self.outputs = [TensorSpec.from_manifest(s) for s in manifest["outputs"]]
        self.symbols: dict[str, int] = dict(manifest["symbols"])
        self.specialized: dict[str, np.ndarray] = {
            str(sp["name"]): np.asarray(sp["value"], dtype=numpy_dtype(sp["dtype"])).reshape(sp["shape"])
            for sp in manifest.get("specialized") or []}
        self._entry = manifest["entry"]
        self._res = _Loaded(module, tuple(weights))
        self._finalizer = weakref.finalize(self, _Loaded.release, self._res)
        self._finalizer.atexit = False  # process exit unmaps everything; unloading then only risks shutdown order
        self._weight_views = tuple(_numpy_view(w, numpy_dtype(str(w.dtype))) for w in self._res.weights)
        self._aliases: list[bool | None] = [s.get("aliases") for s in manifest["outputs"]]
        self._static = {s.name: self._compiled_shape(s) for s in self.inputs}
        self._dtypes = {s.name: numpy_dtype(s.dtype) for s in self.inputs}
        self._out_dtypes = [numpy_dtype(s.dtype) for s in self.outputs]
        self._out_shapes = [tuple(self._compiled_dim(d) for d in s.shape) for s in self.outputs]
        self._out_static = [None if None in shape else shape for shape in self._out_shapes]
        self._out_bits = [bits_dtype(d) is not None for d in self._out_dtypes]
        self._tensor_type = type(tvm_backend.empty((0,), "float32"))  # tvm.runtime.Tensor once tvm is imported
        self._vm_lock = threading.Lock()
        self._check_entry()

    def close(self) -> None:
        """Release the library, weights and per-thread VMs now (idempotent); later runs raise ArtifactError."""
        self._weight_views = ()
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._res.local is None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        sig = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)
        return f"Session({self.path!r}, {self._entry}({sig}) -> {len(self.outputs)} outputs)"

    def _local(self) -> threading.local:
        """This thread's VM and staging buffers; ArtifactError once the Session is closed."""
        local = self._res.local
        if local is None:
            raise ArtifactError(f"{self.path}: this Session was closed; load the artifact again to run it")
        return local

    def _function(self) -> Any:
        """This thread's VirtualMachine entry function (created on first use)."""
        local = self._local()
        fn = getattr(local, "fn", None)
        if fn is None:
            with self._vm_lock:
                module = self._res.module
                if module is None:
                    raise ArtifactError(f"{self.path}: this Session was closed; load the artifact again to run it")
                vm = tvm_backend.VirtualMachine(module)
            local.vm = vm
            fn = local.fn = vm[self._entry]
        return fn

    def _check_entry(self) -> None:
        """The library must define the entry with one parameter per input and weight."""
        try:
            self._function()
            arity = self._res.local.vm.arity(self._entry)
        except Exception as e:
            raise ArtifactError(f"{self.path}: lib.so has no usable function {self._entry!r} ({e})") from e
        want = len(self.inputs) + len(self._res.weights)
        if arity != want:
            raise ArtifactError(f"{self.path}: {self._entry} takes {arity} parameters, the manifest lists "
                                f"{len(self.inputs)} inputs + {len(self._res.weights)} weights = {want}")

    def _compiled_dim(self, dim: int | str) -> int | None:
        """The value the artifact was compiled for of one dim (None if a symbol has no value)."""
        coef, syms = _dim_terms(dim)
        if any(s not in self.symbols for s in syms):
            return None
        return coef * math.prod(self.symbols[s] for s in syms)

    def _compiled_shape(self, spec: TensorSpec) -> tuple[int, ...] | None:
        """The shape the artifact was compiled for (None if a symbol has no value)."""
        shape = tuple(self._compiled_dim(d) for d in spec.shape)
        return None if None in shape else shape

    def validate(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        """The inputs as contiguous arrays in manifest order; InputError on any mismatch.

        Inputs the artifact was specialized for (``self.specialized``) may be given too; each must
        hold exactly the value it was compiled for.
        """
        if self.specialized and isinstance(inputs, Mapping):
            inputs = self._check_specialized(inputs)
        if isinstance(inputs, Mapping) and len(inputs) == len(self.inputs):
            fast = self._validate_fast(inputs)
            if fast is not None:
                return fast
        return self._validate(inputs)

    def _check_specialized(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs without the specialized ones, each of which must equal its compile-time value."""
        rest: dict[str, Any] = {}
        for name, value in inputs.items():
            want = self.specialized.get(name)
            if want is None:
                rest[name] = value
                continue
            got = np.asarray(value)
            if got.dtype != want.dtype:
                raise InputError(f"input {name!r}: expected dtype {want.dtype.name}, got {got.dtype.name} (it was "
                                 f"specialized to {want.tolist()} at compile time)")
            same = got.shape == want.shape and np.array_equal(got, want, equal_nan=want.dtype.kind in "fc")
            if not same:
                raise InputError(f"input {name!r} was specialized to {want.tolist()} at compile time; got "
                                 f"{got.tolist() if got.size <= 64 else f'an array of shape {list(got.shape)}'}; "
                                 f"recompile with that value")
        return rest

    def _validate_fast(self, inputs: Mapping[str, Any]) -> list[np.ndarray] | None:
        """The common case (every input an array of the compiled dtype and shape) without the diagnostics."""
        arrays = []
        for spec in self.inputs:
            a = inputs.get(spec.name)
            if type(a) is not np.ndarray or a.dtype != self._dtypes[spec.name] or a.shape != self._static[spec.name]:
                return None
            arrays.append(a if a.flags.c_contiguous else np.require(a, requirements="C"))
        return arrays

    def _validate(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs should be a mapping from input name to array, got {type(inputs).__name__} "
                             f"(expected names {[s.name for s in self.inputs]})")
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            parts = ([f"missing inputs {missing}"] if missing else []) + \
                    ([f"unexpected inputs {extra}"] if extra else [])
            raise InputError(f"{' and '.join(parts)}: the model takes {names}, got {list(inputs)}")
        arrays = []
        bound: dict[str, tuple[int, str, int]] = {}
        for spec in self.inputs:
            a = np.asarray(inputs[spec.name])
            want = self._dtypes[spec.name]
            if a.dtype != want and a.dtype.byteorder in "<>" and a.dtype.newbyteorder("=") == want:
                a = a.astype(want)  # the same values in this machine's byte order: exact, not a cast
            if a.dtype != want:
                raise InputError(f"input {spec.name!r}: expected dtype {_dtype_text(want)}, got "
                                 f"{_dtype_text(a.dtype)} (convert it with .astype(np.{want.name}); kiln does "
                                 f"not cast silently)")
            if a.ndim != len(spec.shape):
                raise InputError(f"input {spec.name!r}: expected rank {len(spec.shape)} (shape "
                                 f"{list(spec.shape)}), got rank {a.ndim} (shape {list(a.shape)})")
            self._bind_dims(spec, a.shape, bound)
            arrays.append(np.require(a, requirements="C"))
        for spec, a in zip(self.inputs, arrays):
            self._check_dims(spec, a.shape, bound)
        return arrays

    def _bind_dims(self, spec: TensorSpec, shape: tuple[int, ...], bound: dict[str, tuple[int, str, int]]) -> None:
        """Bind single-symbol dims to the values given; one symbol must take one value across inputs."""
        for i, (dim, got) in enumerate(zip(spec.shape, shape)):
            coef, syms = _dim_terms(dim)
            if len(syms) != 1 or coef == 0 or got % coef:
                continue
            (sym,) = syms
            value = got // coef
            if sym in bound and bound[sym][0] != value:
                _, other, j = bound[sym]
                raise InputError(f"input {spec.name!r} dim {i} is {_describe_dim(dim)}: got {got} (so {sym}="
                                 f"{value}) but input {other!r} dim {j} gave {sym}={bound[sym][0]}: "
                                 f"{sym} must take one value across all inputs")
            bound.setdefault(sym, (value, spec.name, i))

    def _check_dims(self, spec: TensorSpec, shape: tuple[int, ...], bound: Mapping[str, tuple[int, str, int]]) -> None:
        """Every dim must equal what the artifact was compiled for."""
        for i, (dim, got) in enumerate(zip(spec.shape, shape)):
            coef, syms = _dim_terms(dim)
            if not syms:
                if got != coef:
                    raise InputError(f"input {spec.name!r}: dim {i} should be {coef}, got {got} "
                                     f"(expected shape {list(spec.shape)}, got {list(shape)})")
                continue
            unknown = [s for s in syms if s not in self.symbols]
            if unknown:
                raise ArtifactError(f"{self.path}: manifest gives no compiled value for symbols {unknown}")
            compiled = {s: self.symbols[s] for s in syms}
            want = self._compiled_dim(dim)
            if got == want:
                continue
            values = ", ".join(f"{s}={v}" for s, v in compiled.items())
            if coef == 1 and len(syms) == 1:
                got_desc = f"got {got}"
            else:
                got_desc = f"got {got}" + "".join(f" ({s}={bound[s][0]})" for s in syms if s in bound)
                got_desc += f", expected {want}"
            raise InputError(f"input {spec.name!r} dim {i} is {_describe_dim(dim)}: {got_desc} but the artifact "
                             f"was compiled for {values} (recompile with that shape)")

    def _call(self, tensors: Sequence[Any], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        result = self._function()(*tensors, *self._res.weights)
        if type(result) is self._tensor_type and len(self.outputs) == 1:  # one output: returned bare
            return {self.outputs[0].name: self._to_numpy(0, result, arrays)}
        flat = _flatten(result, self._tensor_type)
        if len(flat) != len(self.outputs):
            raise ArtifactError(f"{self.path}: {self._entry} returned {len(flat)} outputs, "
                                f"the manifest lists {len(self.outputs)}")
        return {spec.name: self._to_numpy(i, t, arrays) for i, (spec, t) in enumerate(zip(self.outputs, flat))}

    def _to_numpy(self, i: int, tensor: Any, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Output ``i`` without a copy, unless it may alias an input, a weight or another output.

        Its dtype and shape must be the manifest's: a library that returns something
        else is refused (ArtifactError naming the output) instead of handed on.
        """
        want = self._out_dtypes[i]
        if self._out_bits[i] and str(tensor.dtype) != want.name:
            self._bad_output(i, str(tensor.dtype), tuple(tensor.shape))
        out = _numpy_view(tensor, want)
        static = self._out_static[i]
        if static is not None:
            if out.shape != static or out.dtype != want:
                self._bad_output(i, out.dtype.name, out.shape)
        elif out.dtype != want or len(out.shape) != len(self._out_shapes[i]) or \
                any(w is not None and w != g for w, g in zip(self._out_shapes[i], out.shape)):
            self._bad_output(i, out.dtype.name, out.shape)
        alias = self._aliases[i]
        if alias is None:  # an artifact that does not say: look
            alias = any(np.may_share_memory(out, a) for a in (*arrays, *self._weight_views))
        return out.copy() if alias else out

    def _to_device(self, arrays: Sequence[np.ndarray]) -> tuple[list[Any], list[np.ndarray]]:
        """TVM tensors for ``arrays``, and the numpy arrays they view (what an output may alias).

        An input of at most :data:`STAGE_BYTES` is copied into this thread's aligned buffer for
        it, whose tensor is made once; a larger one is a zero-copy DLPack view (TVM wants 64-byte
        aligned, writeable data: others are copied into aligned buffers).  numpy cannot
        DLPack-export ml_dtypes' arrays (bfloat16, float8): those go over as their unsigned-integer
        bits and are re-typed on the TVM side (same bytes, no copy).
        """
        from_dlpack = tvm_backend.from_dlpack
        stage = self._stage()
        out, seen = [], []
        for i, a in enumerate(arrays):
            if a.size == 0:  # no data; numpy's strides and pointer for it need not be what TVM checks
                out.append(tvm_backend.empty(a.shape, str(a.dtype)))
                seen.append(a)
                continue
            bits = bits_dtype(a.dtype)
            if bits is None and a.nbytes <= STAGE_BYTES:
                slot = stage.get(i)
                if slot is None or slot[0].shape != a.shape or slot[0].dtype != a.dtype:
                    buf = _aligned(np.empty(a.shape, a.dtype), force_copy=True)
                    slot = stage[i] = (buf, from_dlpack(buf))
                np.copyto(slot[0], a)
                out.append(slot[1])
                seen.append(slot[0])
                continue
            src = _aligned(a if bits is None else a.view(bits))  # checked first: a refused import costs a TVM exception
            t = from_dlpack(src)
            out.append(t if bits is None else tvm_backend.view(t, a.shape, str(a.dtype)))
            seen.append(src)
        return out, seen

    def _stage(self) -> dict[int, tuple[np.ndarray, Any]]:
        """This thread's staging buffers for small inputs, by input index."""
        local = self._local()
        stage = getattr(local, "stage", None)
        if stage is None:
            stage = local.stage = {}
        return stage

    def _bad_output(self, i: int, dtype: str, shape: Sequence[int]) -> None:
        spec = self.outputs[i]
        want = [d if d is not None else s for d, s in zip(self._out_shapes[i], spec.shape)]
        raise ArtifactError(f"{self.path}: output {spec.name!r}: the manifest says {spec.dtype}{want}, the "
                            f"library returned {dtype}{list(shape)} (the library and manifest disagree)")

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on numpy inputs (by name); returns the outputs by name, in manifest order.

        Bad inputs raise InputError; a library that fails or returns what the
        manifest does not say raises ArtifactError; nothing else leaves.
        """
        try:
            arrays = self.validate(inputs)
        except Error:
            raise
        except Exception as e:  # noqa: BLE001 - the API boundary: e.g. np.asarray on an object it cannot read
            raise InputError(f"inputs could not be read as arrays ({type(e).__name__}: {str(e)[:300]})") from e
        try:
            return self._call(*self._to_device(arrays))
        except Error:
            raise
        except MemoryError as e:
            raise ArtifactError(f"{self.path}: out of memory while running {self._entry}") from e
        except Exception as e:  # noqa: BLE001 - TVM's errors (tvm_ffi.Error, RuntimeError...) at the boundary
            raise ArtifactError(f"{self.path}: {self._entry} failed ({type(e).__name__}: {str(e)[:500]})") from e

    __call__ = run

    def benchmark(self, inputs: Mapping[str, Any], repeat: int = 20, warmup: int = 3) -> list[float]:
        """Seconds per run over ``repeat`` timed runs (inputs validated and handed over once)."""
        tensors, arrays = self._to_device(self.validate(inputs))
        for _ in range(max(0, warmup)):
            self._call(tensors, arrays)
        times = []
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            self._call(tensors, arrays)
            times.append(time.perf_counter() - t0)
        return times


def _dtype_text(dtype: np.dtype) -> str:
    """A dtype for messages, with its byte order when that is not this machine's: ``float64 (big-endian, >f8)``."""
    if not dtype.isnative:
        return f"{dtype.name} ({'big' if dtype.byteorder == '>' else 'little'}-endian, {dtype.str})"
    return dtype.name


# Inputs up to this many bytes are copied into a per-thread aligned buffer whose TVM tensor is made once: the
# copy costs less than checking and importing the caller's array (a 1x16 float input: 2.3 -> 0.6 us).
STAGE_BYTES = 1 << 16


def _aligned(a: np.ndarray, alignment: int = 64, *, force_copy: bool = False) -> np.ndarray:
    """``a`` itself when C-contiguous, writeable and aligned (and not ``force_copy``), else a copy in an aligned buffer."""
    if not force_copy and a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % alignment == 0:
        return a
    buf = np.empty(a.nbytes + alignment, np.uint8)
    offset = -buf.ctypes.data % alignment
    out = buf[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _numpy_view(tensor: Any, dtype: np.dtype) -> np.ndarray:
    """A zero-copy numpy view of a TVM tensor of ``dtype``; ml_dtypes' types go through their bits."""
    bits = bits_dtype(dtype)
    if bits is None:
        return np.from_dlpack(tensor)
    return np.from_dlpack(tvm_backend.view(tensor, tuple(tensor.shape), bits.name)).view(dtype)


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's kernel thread pool: ``threads``, else ``TVM_NUM_THREADS``, else every core this process may use.

    TVM's own default is half the logical CPUs (it assumes hyper-threading),
    one thread on a 2-vCPU machine, so every ``parallel`` loop runs serially.
    The pool reads ``TVM_NUM_THREADS`` once, when it is created (the first
    parallel kernel call), so this must run before that; returns the count set.
    """
    if threads is None:
        env = os.environ.get("TVM_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def _flatten(result: Any, tensor_type: type) -> list[Any]:
    """The VM's result (one tensor or nested tuples/Arrays of tensors) as a flat list.

    The usual result, one flat tuple of tensors, is checked with ``type is``
    (``hasattr``/``isinstance`` per item cost microseconds per call).
    """
    if isinstance(result, tensor_type):
        return [result]
    items = list(result)
    if all(type(t) is tensor_type for t in items):
        return items
    return [t for item in items for t in _flatten(item, tensor_type)]


def _check_sizes(path: str, manifest: Mapping[str, Any], limits: Limits) -> None:
    """Every input and output a run allocates must fit ``limits.tensor_bytes`` (checked before the library loads)."""
    symbols = manifest["symbols"]
    for kind in ("inputs", "outputs"):
        for spec in manifest[kind]:
            coefs = [_dim_terms(d) for d in spec["shape"]]
            if any(s not in symbols for _, syms in coefs for s in syms):
                continue
            count = math.prod(c * math.prod(symbols[s] for s in syms) for c, syms in coefs)
            check_limit(limits, "tensor_bytes", count * numpy_dtype(spec["dtype"]).itemsize,
                        f"{path}: {kind[:-1]} {spec['name']!r} ({spec['dtype']}{list(spec['shape'])})")


def _open_session(path: str, contents: Any, limits: Limits, check_cpu: bool) -> Session:
    """The Session of a validated artifact: target and sizes checked, then the library, then the weights (once)."""
    if check_cpu:
        _check_target(path, contents.manifest)
    _check_sizes(path, contents.manifest, limits)
    module = _load_library(path, contents.library)
    weights = [tvm_backend.empty(a.shape, str(a.dtype)) if a.size == 0 else tvm_backend.tensor(a)
               for a in contents.weights.values()]
    return Session(path, contents.manifest, module, weights, contents.ir_text, trust=contents.trust)


def load(path: str | os.PathLike, *, trusted_keys: Any = None, allow_unsigned: bool = False,
         limits: Limits | None = None, check_cpu: bool = True, threads: int | None = None) -> Session:
    """Load an artifact: its signature, limits and contents first, then this CPU, then the library and weights.

    ``trusted_keys`` (public key paths, PEM bytes or key objects) are trusted
    beside ``KILN_TRUSTED_KEYS`` and the local key; an unsigned or untrusted
    artifact raises TrustError unless ``allow_unsigned`` (see
    :mod:`kiln.runtime.signing`).  ``limits`` bounds what the file may make kiln
    allocate.  ``threads`` sizes the kernel thread pool (see :func:`configure_threads`).
    Every refusal is a ``kiln.Error``.
    """
    path = os.fspath(path)
    limits = limits or DEFAULT_LIMITS
    configure_threads(threads)
    contents = read_artifact(path, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned, limits=limits)
    try:
        return _open_session(path, contents, limits, check_cpu)
    except Error:
        raise
    except MemoryError as e:
        raise ArtifactError(f"{path}: out of memory while loading the artifact") from e
    except Exception as e:  # noqa: BLE001 - the API boundary: TVM's and numpy's errors on a bad file
        raise ArtifactError(f"{path}: cannot load the artifact ({type(e).__name__}: {str(e)[:300]})") from e
