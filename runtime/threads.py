"""kiln's kernel thread pool: work claimed dynamically, so a descheduled thread stalls no kernel.

TVM's pool splits each ``parallel`` loop statically, one task per thread, and the
caller spins until every task is done: on a shared CPU one descheduled worker
stalls every kernel for a scheduler time slice (the corpus ViT went from 0.07 ms
to 28-150 ms beside one or two busy loops on 2 cores).  kiln's pool runs the same
compiled loops differently:

- each loop is split into more tasks than threads (``num_task`` in TVM's lambda
  ABI: about ``chunk_us`` of work each, from the loop's last measured time, at most
  ``chunks`` per thread), and whichever thread is free claims the next one (an
  atomic ticket), the caller included.  A worker that is not running claims
  nothing, so the caller finishes the loop alone; it waits only for chunks a worker
  has started (spinning ``wait_spin_us``, then on a futex);
- a loop measured below ``small_us`` runs on the calling thread only;
- idle workers spin ``spin_us`` then sleep on a futex, and stop spinning at once
  on the CPU the caller launched from (they would keep it off that CPU);
- when a woken worker runs on the caller's own CPU (no CPU was free: the caller
  now waits in the run queue) the caller leaves sleeping workers asleep for the
  next 1, 2, 4 ... 256 launches, until a wake lands on another CPU again: two
  processes sharing 2 cores then each run like one thread instead of trading CPUs;
- a launch while the pool is busy (another thread's), a launch from inside a
  chunk, and every launch with one thread run the whole loop on the calling thread.

Which thread runs which iterations changes nothing else: outputs are bit-identical
to TVM's pool.  The pool is C (:data:`C_SOURCE`): the ``kiln-runtime`` wheel ships
it prebuilt (``lib/kiln-pool-<sha256 of the source>.so``, built when the wheel is,
so a machine without a C compiler has it); otherwise it is built with the system
C compiler on first use into ``$KILN_CACHE_DIR`` (default ``~/.cache/kiln``).  It is
loaded once per process; it survives ``fork`` (the child starts new workers).  :func:`adopt`
points one loaded kernel library's ``__TVMBackendParallelLaunch`` (the launch
function the TVM runtime fills in when it loads a library) at it.  A library that
uses TVM's parallel barrier (kiln's schedules emit none) keeps TVM's pool: a
barrier needs every task running at once.  ``KILN_THREAD_POOL=tvm`` keeps TVM's
pool everywhere; without a C compiler the runtime does the same and says why
(:func:`unavailable_reason`).  ``KILN_THREAD_POOL_TUNING="spin_us=0,chunks=8"``
overrides :class:`Tuning` fields.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path

__all__ = ["C_SOURCE", "PoolStats", "Tuning", "adopt", "build_library", "configure", "enabled", "forget",
           "library_name", "pool_library", "stats", "tuning", "unavailable_reason"]


@dataclass(frozen=True)
class Tuning:
    """How the pool splits and waits (see the module docstring); ``configure`` changes it."""

    threads: int = 1
    # At most this many chunks per thread (and this many for a loop not measured yet): a late or
    # descheduled worker then leaves little for the others to pick up.
    chunks: int = 16
    # Chunks of about this many microseconds of work, from the loop's last measured time; 0: always
    # ``chunks`` per thread.  A claim costs ~0.1 us, so a chunk should be far longer.
    chunk_us: int = 4
    # A loop measured below this runs on the calling thread alone: waking a worker costs more.
    small_us: int = 5
    # How long an idle worker spins before sleeping (a spinning thread under contention spends its
    # scheduler share and is then late when work comes: measured slower than short spins), and how
    # long the caller spins for chunks in flight before sleeping.
    spin_us: int = 60
    wait_spin_us: int = 30
    # After a wake that took the caller's own CPU, sleeping workers stay asleep for 1, 2, 4 ... up
    # to this many launches (0: always wake).
    backoff: int = 256


C_SOURCE = (Path(__file__).parent / "pool.c").read_text()  # one source for Python and the C++ runtime

_LOCK = threading.Lock()
_problem: list[str] = []
_tuning = [Tuning()]


def _env_tuning() -> dict[str, int]:
    """``KILN_THREAD_POOL_TUNING="spin_us=0,chunks=8"``: Tuning fields set from the environment."""
    out: dict[str, int] = {}
    names = {f.name for f in fields(Tuning)} - {"threads"}
    for item in filter(None, (p.strip() for p in os.environ.get("KILN_THREAD_POOL_TUNING", "").split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in names or not value.strip().isdigit():
            raise ValueError(f"KILN_THREAD_POOL_TUNING: {item!r} is not NAME=INT with NAME one of {sorted(names)}")
        out[key.strip()] = int(value)
    return out


@dataclass(frozen=True)
class PoolStats:
    """Counters since the process started: launches (pooled; inline: one thread, nested or pool busy;
    small: inline because measured small), chunks by who ran them, times the caller slept on a chunk,
    workers woken, wakes that handed the caller's CPU over, and wakes skipped after one."""

    launches: int
    pooled: int
    inline: int
    small: int
    chunks_caller: int
    chunks_workers: int
    caller_sleeps: int
    wakeups: int
    handoffs: int
    wakes_skipped: int
    workers: int


def enabled() -> bool:
    """kiln's pool is used unless ``KILN_THREAD_POOL=tvm`` asks for TVM's own."""
    return os.environ.get("KILN_THREAD_POOL", "kiln").strip().lower() != "tvm"


def _cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def library_name() -> str:
    """The pool library's file name, ``kiln-pool-<16 hex of sha256(C_SOURCE)>.so``: a changed source gets a new name."""
    return f"kiln-pool-{hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]}.so"


def _shipped() -> Path:
    """Where the kiln-runtime wheel puts the prebuilt pool (absent in a source checkout)."""
    return Path(__file__).resolve().parent / "lib" / library_name()


def build_library(target: Path) -> None:
    """Compile :data:`C_SOURCE` to ``target`` (atomically: a temp file renamed into place); OSError on failure."""
    _build(Path(target))


def _build(target: Path) -> None:
    """Compile :data:`C_SOURCE` to ``target`` (atomically: a temp file renamed into place)."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (set CC, or install cc/gcc/clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".kiln-pool-") as d:
        src, out = Path(d) / "pool.c", Path(d) / "pool.so"
        src.write_text(C_SOURCE)
        res = subprocess.run([cc, "-O2", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-o", str(out),
                              str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            raise OSError(f"{cc} failed: {res.stderr.strip()[:500]}")
        os.replace(out, target)


@cache
def _ffi_error_api() -> tuple[int, int, int]:
    """Addresses of tvm-ffi's error-moving functions (a worker's error is re-raised in the caller)."""
    import tvm_ffi.libinfo

    lib = ctypes.CDLL(tvm_ffi.libinfo.find_libtvm_ffi(), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                 for name in ("TVMFFIErrorMoveFromRaised", "TVMFFIErrorSetRaised", "TVMFFIObjectDecRef"))


def pool_library() -> ctypes.CDLL | None:
    """The pool's shared library (built on first use), or None when it cannot be built or loaded."""
    with _LOCK:
        return _pool_library()


@cache
def _pool_library() -> ctypes.CDLL | None:
    path = _shipped()
    if not path.is_file():
        path = _cache_dir() / library_name()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        lib.kiln_pool_set_error_api(*(ctypes.c_void_p(a) for a in _ffi_error_api()))
    except (OSError, AttributeError) as e:
        _problem.append(f"kiln's thread pool is unavailable ({e}); kernels use TVM's pool")
        return None
    lib.kiln_pool_configure.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_long] * 4 + [ctypes.c_int]
    lib.kiln_pool_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    t = _tuning[0] = replace(_tuning[0], **_env_tuning())
    lib.kiln_pool_configure(t.threads, t.chunks, t.spin_us, t.wait_spin_us, t.small_us, t.chunk_us, t.backoff)
    return lib


def unavailable_reason() -> str | None:
    """Why kiln's pool is not used (disabled, or could not be built), else None."""
    if not enabled():
        return "KILN_THREAD_POOL=tvm: kernels use TVM's pool"
    pool_library()
    return _problem[0] if _problem else None


def configure(threads: int | None = None, **tuning: int) -> bool:
    """Set the pool's thread count (the caller is one of them) and any :class:`Tuning` field.

    Settings not named keep their value.  Returns False when the pool is unavailable.
    """
    new = replace(_tuning[0], **({"threads": threads} if threads is not None else {}), **tuning)
    if new.threads < 1 or new.chunks < 1 or min(new.spin_us, new.wait_spin_us, new.small_us, new.chunk_us,
                                                new.backoff) < 0:
        raise ValueError(f"threads and chunks must be >= 1 and times >= 0, got {new}")
    lib = pool_library()
    if lib is None:
        return False
    _tuning[0] = new
    lib.kiln_pool_configure(new.threads, new.chunks, new.spin_us, new.wait_spin_us, new.small_us, new.chunk_us,
                            new.backoff)
    return True


def tuning() -> Tuning:
    """The pool's current settings."""
    return _tuning[0]


def forget() -> None:
    """Drop every loop's measured time (benchmarks comparing settings; not while kernels run)."""
    lib = pool_library()
    if lib is not None:
        lib.kiln_pool_forget()


def _threads_from_env() -> int:
    env = os.environ.get("TVM_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


def adopt(lib_path: str | os.PathLike) -> bool:
    """Make the kernel library just loaded from ``lib_path`` launch its parallel loops on kiln's pool.

    Call it after ``tvm.runtime.load_module(lib_path)`` and before the file is
    removed; the pool (one per process) takes its size from ``TVM_NUM_THREADS`` (set
    by ``configure_threads``; the latest load's count holds).  Returns False (the library keeps TVM's pool) when the
    pool is disabled or unavailable, when the library uses TVM's parallel barrier, or when
    no library is loaded from ``lib_path``.
    """
    if not enabled():
        return False
    lib = pool_library()
    if lib is None:
        return False
    if not configure(_threads_from_env()):
        return False
    try:
        handle = ctypes.CDLL(os.fspath(lib_path), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError:
        return False  # not loaded under this path (TVM loads libraries by their path)
    try:
        return _patch(handle, ctypes.cast(lib.kiln_parallel_launch, ctypes.c_void_p).value)
    finally:
        _libc().dlclose(ctypes.c_void_p(handle._handle))  # only drops the reference taken above


def _patch(handle: ctypes.CDLL, launch: int) -> bool:
    """Point the library's launch slot at ``launch``, unless it uses a barrier or has no slot."""
    for name in ("__TVMBackendParallelBarrier", "__TVMBackendParallelLaunch"):
        try:
            slot = ctypes.c_void_p.in_dll(handle, name)
        except ValueError:
            if name.endswith("Launch"):
                return False  # no parallel loop in this library
            continue
        if name.endswith("Barrier"):
            return False  # a barrier needs every task running at once: only TVM's static pool gives that
    slot.value = launch
    return True


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    libc.dlclose.argtypes = [ctypes.c_void_p]
    return libc


def set_test_mode(mode: int) -> None:
    """Tests only: 1 makes workers claim nothing (as if descheduled), 2 leaves every chunk to them, 3 as 2
    with a worker preempted between reading the ticket and the job, 0 resets."""
    lib = pool_library()
    if lib is not None:
        lib.kiln_pool_set_test_mode(mode)


def stats() -> PoolStats | None:
    """The pool's counters (None when it is unavailable)."""
    lib = pool_library()
    if lib is None:
        return None
    out = (ctypes.c_uint64 * len(fields(PoolStats)))()
    lib.kiln_pool_stats(out)
    return PoolStats(*(int(v) for v in out))
