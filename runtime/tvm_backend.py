"""The TVM runtime without the ``tvm`` Python package: ``tvm_ffi`` plus ``libtvm_runtime.so``.

The runtime needs little of TVM: load a kernel library, start a Relax VM over it,
hand tensors over by DLPack and call the entry function.  All of that is C++ in
``libtvm_runtime.so`` (the Relax VM, its ``vm.builtin.*`` functions and the
``runtime.*`` globals register themselves when it is loaded) reached through
``tvm_ffi`` (the ``apache-tvm-ffi`` package).  Importing ``tvm`` instead would
pull in its Python compiler stack and, unless told otherwise, the 260 MB
``libtvm_compiler.so``; the slim ``kiln-runtime`` distribution has neither.

Which ``libtvm_runtime.so`` (:func:`runtime_library_path`): the one ``tvm``
already loaded, if it is imported; else apache-tvm's, found exactly as ``tvm``
would find it (``tvm/base.py``), when apache-tvm is installed; else the copy the
``kiln-runtime`` wheel ships in its ``lib/`` folder.  So a process that has both
the runtime and the compiler maps one copy and has one function registry,
whichever of the two came first.

:class:`VirtualMachine` is what ``tvm.runtime.vm.VirtualMachine`` does for one
CPU device (``vm_load_executable``, then ``vm_initialization`` with the pooled
allocator); :func:`empty`, :func:`tensor`, :func:`view` and :func:`from_dlpack`
are ``tvm.runtime``'s functions of those names (``tensor`` copies as
``Tensor.copyfrom`` does, float4 packing included), so results are bit-identical.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VirtualMachine", "cpu", "empty", "ffi", "from_dlpack", "load_module", "runtime_library_path",
           "tensor", "tensor_class", "view"]

_LOCK = threading.Lock()
_LOADED: list[Any] = []  # [tvm_ffi module, libtvm_runtime handle] once loaded
_KDL_CPU = 1
_POOLED_ALLOCATOR = 2
_PACKAGE_LIB = Path(__file__).resolve().parent / "lib"  # the kiln-runtime wheel's copy


class _BlockTorch(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` fail (as if not installed) in the thread importing tvm_ffi, and only there."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if threading.get_ident() != self.thread:
            return None
        if fullname == "torch" or fullname.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked while kiln imports tvm_ffi)",
                                      name=fullname)
        return None


@contextmanager
def _torch_blocked() -> Iterator[None]:
    """Block torch for the duration, unless it is already imported (then blocking gains nothing).

    tvm_ffi imports torch when it can, only for optional fast paths (torch tensors
    still pass through ``__dlpack__`` without them); that costs seconds and hundreds
    of MB a runtime does not need.
    """
    if "torch" in sys.modules:
        yield
        return
    blocker = _BlockTorch()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)


def _tvm_lib_dirs(package_dir: Path) -> list[Path]:
    """The folders ``tvm.libinfo.package_lib_paths()`` searches, for apache-tvm installed in ``package_dir``."""
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    return [*dirs, package_dir / "lib", package_dir / ".." / ".." / "build" / "lib", package_dir / ".." / ".." / "lib"]


def runtime_library_path() -> str:
    """The ``libtvm_runtime.so`` to load: tvm's own if loaded or installed, else this package's copy."""
    base = sys.modules.get("tvm.base")
    loaded = getattr(base, "_LOADED_LIBS", {}).get("tvm_runtime") if base is not None else None
    if loaded is not None:
        return str(loaded._name)
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.origin:
        with _torch_blocked():
            from tvm_ffi import libinfo

        try:
            return str(libinfo._find_library_by_basename("tvm", "tvm_runtime",
                                                         extra_lib_paths=_tvm_lib_dirs(Path(spec.origin).parent)))
        except RuntimeError:
            pass
    shipped = _PACKAGE_LIB / "libtvm_runtime.so"
    if shipped.is_file():
        return str(shipped)
    raise OSError("libtvm_runtime.so not found: install kiln-runtime (which ships it) or apache-tvm")


def ffi() -> Any:
    """The ``tvm_ffi`` module, with ``libtvm_runtime.so`` loaded (RTLD_GLOBAL, once per process)."""
    if _LOADED:
        return _LOADED[0]
    with _LOCK:
        if not _LOADED:
            with _torch_blocked():
                import tvm_ffi
            handle = ctypes.CDLL(runtime_library_path(), ctypes.RTLD_GLOBAL)
            _LOADED.extend((tvm_ffi, handle))
    return _LOADED[0]


def cpu() -> Any:
    """The CPU device (``tvm.cpu()``)."""
    return ffi().device("cpu", 0)


def tensor_class() -> type:
    """The base class of every tensor the runtime hands back (``tvm.runtime.Tensor`` derives from it)."""
    return ffi().Tensor


def load_module(path: str) -> Any:
    """Load a kernel library; the last reference's release ``dlclose``s it (TVM keeps modules alive by default)."""
    return ffi().load_module(path, keep_module_alive=False)


def _global(name: str) -> Any:
    return ffi().get_global_func(name)


def _shape(shape: Sequence[int]) -> Any:
    return ffi().Shape([int(d) for d in shape])


def empty(shape: Sequence[int], dtype: str, device: Any = None) -> Any:
    """An uninitialized tensor (``tvm.runtime.empty``)."""
    tvm_ffi = ffi()
    return _global("runtime.TVMTensorAllocWithScope")(_shape(shape), tvm_ffi.dtype(dtype), device or cpu(), None)


def tensor(array: np.ndarray, device: Any = None) -> Any:
    """A TVM-owned copy of ``array`` (``tvm.runtime.tensor``: allocate, then ``Tensor.copyfrom``'s byte copy)."""
    dtype = str(array.dtype)
    out = empty(array.shape, dtype, device)
    if dtype.startswith("float4_e2m1fn"):  # TVM stores two per byte; numpy (ml_dtypes) one
        bits = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        if bits.size % 2:
            bits = np.pad(bits, (0, 1))
        pairs = bits.reshape(-1, 2)
        source = (((pairs[:, 0] & 0x0F) << 4) | (pairs[:, 1] & 0x0F)).astype(np.int8)
    else:
        source = np.ascontiguousarray(array)
    _global("runtime.TVMTensorCopyFromBytes")(out, ctypes.c_void_p(source.ctypes.data), source.nbytes)
    return out


def view(t: Any, shape: Sequence[int], dtype: str) -> Any:
    """The same bytes as another shape and dtype (``Tensor._create_view``)."""
    return _global("runtime.TVMTensorCreateView")(t, _shape(shape), dtype, 0)


def from_dlpack(array: Any) -> Any:
    """A zero-copy tensor over ``array``; TVM's kernels want 64-byte aligned, contiguous data (as ``tvm.runtime``)."""
    return ffi().from_dlpack(array, require_alignment=64, require_contiguous=True)


class VirtualMachine:
    """A Relax VM over a loaded kernel library, on the CPU with the pooled allocator.

    ``vm[name]`` is a VM function; ``arity(name)`` its parameter count.
    """

    def __init__(self, module: Any) -> None:
        self.module = module["vm_load_executable"]()
        self.module["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)

    def __getitem__(self, name: str) -> Any:
        return self.module[name]

    def arity(self, name: str) -> int:
        return int(self.module["get_function_arity"](name))
