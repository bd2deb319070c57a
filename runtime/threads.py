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
to TVM's pool.  The pool is C (:data:`C_SOURCE`), built with the system C compiler
on first use into ``$KILN_CACHE_DIR`` (default ``~/.cache/kiln``) and loaded once
per process; it survives ``fork`` (the child starts new workers).  :func:`adopt`
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

__all__ = ["C_SOURCE", "PoolStats", "Tuning", "adopt", "configure", "enabled", "forget", "pool_library",
           "stats", "tuning", "unavailable_reason"]


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


C_SOURCE = r"""
/* kiln thread pool: TVMBackendParallelLaunch with dynamically claimed chunks. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef void (*FMoveErr)(void** out);
typedef void (*FSetErr)(void* err);
typedef int (*FDecRef)(void* obj);

#define MAX_WORKERS 255
enum { ST_LAUNCHES, ST_POOLED, ST_INLINE, ST_SMALL, ST_CHUNKS_CALLER, ST_CHUNKS_WORKERS,
       ST_CALLER_SLEEPS, ST_WAKEUPS, ST_HANDOFFS, ST_WAKES_SKIPPED, ST_WORKERS, ST_N };

/* one job at a time: ticket = generation << 32 | next chunk; fields stable while a chunk is owed */
static _Atomic uint64_t ticket;
static _Atomic uint32_t gen_word;          /* futex: idle workers wait for a new generation */
static _Atomic uint32_t done_word;         /* futex: chunks finished in this generation */
static _Atomic(FLambda) job_f;
static _Atomic(void*) job_cdata;
static _Atomic int32_t job_n;
static _Atomic(void*) job_error;           /* first worker error (a TVM FFI Error handle) */
static _Atomic int job_helpers;           /* workers that ran a chunk of this generation */
static _Atomic int job_handoff;           /* a worker woke on the caller's CPU: no CPU was free */
static int wake_skip, wake_backoff;       /* the caller's: sleeping workers left asleep for a while */
static _Atomic int caller_waiting;
static _Atomic int caller_cpu = -1;        /* where the caller last launched from */
static _Atomic int sleepers;
static _Atomic int busy;
static _Atomic int test_mode;              /* tests: 1 workers claim nothing (as if descheduled), 2 only workers claim */

static _Atomic int n_threads = 1;
static _Atomic int chunks_per_thread = 4;
static _Atomic long spin_ns = 60000, wait_spin_ns = 30000, small_ns = 0, chunk_ns = 0;
static _Atomic int max_backoff = 256;
static FMoveErr move_err;
static FSetErr set_err;
static FDecRef dec_ref;

static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static int started;                        /* workers started in this process */
static pid_t owner_pid;
static _Atomic uint64_t st[ST_N];
static __thread int in_chunk;

static long futex(_Atomic uint32_t* addr, int op, uint32_t val) {
  return syscall(SYS_futex, (uint32_t*)addr, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
}

static long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* Run chunk i of the current job; a worker's error moves into job_error (first one kept). */
static void run_chunk(FLambda f, void* cdata, int32_t n, uint32_t i, int is_caller, int* failed) {
  TVMParallelGroupEnv env = {NULL, n};
  in_chunk = 1;
  int rc = f((int)i, &env, cdata);
  in_chunk = 0;
  if (rc != 0) {
    if (is_caller) {
      *failed = 1;
    } else if (move_err) {
      void* err = NULL;
      void* none = NULL;
      move_err(&err);
      if (err && !atomic_compare_exchange_strong(&job_error, &none, err) && dec_ref) dec_ref(err);
    }
  }
  atomic_fetch_add(&st[is_caller ? ST_CHUNKS_CALLER : ST_CHUNKS_WORKERS], 1);
  if (atomic_fetch_add(&done_word, 1) + 1 == (uint32_t)n && !is_caller &&
      atomic_load(&caller_waiting))
    futex(&done_word, FUTEX_WAKE, 1);
}

/* Claim and run chunks of generation g until none is left; returns how many it ran. */
static int drain(uint32_t g, int is_caller, int* failed) {
  int ran = 0;
  for (;;) {
    uint64_t t = atomic_load(&ticket);
    if ((uint32_t)(t >> 32) != g) return ran;
    FLambda f = atomic_load(&job_f);
    void* cdata = atomic_load(&job_cdata);
    int32_t n = atomic_load(&job_n);
    uint32_t i = (uint32_t)t;
    if (i >= (uint32_t)n) return ran;
    if (!atomic_compare_exchange_weak(&ticket, &t, t + 1)) continue;
    if (!is_caller && ran == 0) {  /* counted before its first chunk can complete the job */
      atomic_fetch_add(&job_helpers, 1);
      if (sched_getcpu() == atomic_load(&caller_cpu)) atomic_store(&job_handoff, 1);
    }
    run_chunk(f, cdata, n, i, is_caller, failed);
    ++ran;
  }
}

static void* worker_main(void* arg) {
  int index = (int)(intptr_t)arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);  /* signals go to the application's own threads */
  pthread_setname_np(pthread_self(), "kiln-pool");
  uint32_t seen = atomic_load(&gen_word);
  int failed = 0;
  for (;;) {
    uint32_t g = atomic_load(&gen_word);
    if (g != seen && index < atomic_load(&n_threads) - 1 && atomic_load(&test_mode) != 1) {
      seen = g;
      drain(g, 0, &failed);
      continue;
    }
    seen = g;
    long deadline = now_ns() + atomic_load(&spin_ns);
    int k = 0;
    while (atomic_load(&gen_word) == seen) {
      cpu_relax();
      /* spinning on the CPU the caller last launched from would keep the caller off it */
      if ((++k & 63) == 0 && (now_ns() > deadline || sched_getcpu() == atomic_load(&caller_cpu))) {
        atomic_fetch_add(&sleepers, 1);
        futex(&gen_word, FUTEX_WAIT, seen);
        atomic_fetch_sub(&sleepers, 1);
        deadline = now_ns() + atomic_load(&spin_ns);
      }
    }
  }
  return NULL;
}

static void after_fork_child(void) {
  started = 0;
  owner_pid = getpid();
  atomic_store(&busy, 0);
  atomic_store(&sleepers, 0);
  atomic_store(&caller_waiting, 0);
  atomic_store(&st[ST_WORKERS], 0);
  pthread_mutex_init(&start_lock, NULL);
}

static void ensure_workers(int want) {
  if (want > MAX_WORKERS) want = MAX_WORKERS;
  if (started >= want && owner_pid == getpid()) return;
  pthread_mutex_lock(&start_lock);
  static int atfork_done;
  if (!atfork_done) { pthread_atfork(NULL, NULL, after_fork_child); atfork_done = 1; }
  if (owner_pid != getpid()) { started = 0; owner_pid = getpid(); }
  while (started < want) {
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&tid, &attr, worker_main, (void*)(intptr_t)started);
    pthread_attr_destroy(&attr);
    if (rc != 0) break;  /* no more threads: the caller does the rest */
    ++started;
    atomic_fetch_add(&st[ST_WORKERS], 1);
  }
  pthread_mutex_unlock(&start_lock);
}

/* Per parallel loop (its lambda): an estimate of its work in ns, which sizes its chunks. */
#define TABLE_BITS 10
typedef struct { _Atomic(FLambda) key; _Atomic long work_ns; } Entry;
static Entry table[1 << TABLE_BITS];

static Entry* entry_of(FLambda f) {
  uint64_t h = ((uint64_t)(uintptr_t)f * 0x9E3779B97F4A7C15ull) >> (64 - TABLE_BITS);
  for (int probe = 0; probe < 16; ++probe) {
    Entry* e = &table[(h + probe) & ((1 << TABLE_BITS) - 1)];
    FLambda k = atomic_load(&e->key);
    if (k == f) return e;
    if (k == NULL) {
      FLambda none = NULL;
      if (atomic_compare_exchange_strong(&e->key, &none, f) || none == f) return e;
    }
  }
  return NULL;  /* table full around here: this loop gets the default split */
}

static void record(Entry* e, long work) {
  long old = atomic_load(&e->work_ns);
  atomic_store(&e->work_ns, old ? (3 * old + work) / 4 : work);
}

/* Chunks for a loop of ``work`` ns: about chunk_ns each, at least one per thread, at most
   chunks_per_thread per thread (also the count when the work is not known yet). */
static int32_t chunks_for(long work, int threads) {
  int32_t most = threads * atomic_load(&chunks_per_thread);
  long per = atomic_load(&chunk_ns);
  if (work <= 0 || per <= 0) return most;
  long n = work / per;
  return n < threads ? threads : n > most ? most : (int32_t)n;
}

static int run_inline(FLambda f, void* cdata, int num_task) {
  atomic_fetch_add(&st[ST_INLINE], 1);
  int n = num_task > 0 ? num_task : 1;
  TVMParallelGroupEnv env = {NULL, n};
  for (int i = 0; i < n; ++i)
    if (f(i, &env, cdata) != 0) return -1;
  return 0;
}

int kiln_parallel_launch(FLambda f, void* cdata, int num_task) {
  atomic_fetch_add(&st[ST_LAUNCHES], 1);
  int threads = atomic_load(&n_threads);
  if (threads <= 1 || in_chunk) return run_inline(f, cdata, num_task);
  Entry* e = num_task == 0 ? entry_of(f) : NULL;
  long work = e ? atomic_load(&e->work_ns) : 0;
  if (work > 0 && work < atomic_load(&small_ns)) {
    /* too small to pay for waking a worker: the calling thread runs it (and re-measures it) */
    atomic_fetch_add(&st[ST_SMALL], 1);
    long t0 = now_ns();
    int rc = run_inline(f, cdata, 0);
    record(e, now_ns() - t0);
    return rc;
  }
  int expected = 0;
  if (!atomic_compare_exchange_strong(&busy, &expected, 1)) return run_inline(f, cdata, num_task);
  ensure_workers(threads - 1);
  atomic_fetch_add(&st[ST_POOLED], 1);
  int32_t n = num_task > 0 ? num_task : chunks_for(work, threads);
  long t0 = now_ns();
  uint32_t g = (uint32_t)(atomic_load(&ticket) >> 32) + 1;
  atomic_store(&job_f, f);
  atomic_store(&job_cdata, cdata);
  atomic_store(&job_n, n);
  atomic_store(&job_error, NULL);
  atomic_store(&job_helpers, 0);
  atomic_store(&job_handoff, 0);
  atomic_store(&done_word, 0);
  atomic_store(&caller_cpu, sched_getcpu());
  atomic_store(&ticket, (uint64_t)g << 32);
  atomic_store(&gen_word, g);
  /* Waking a worker helps only if a CPU is free for it; when the scheduler runs it on the caller's
     own CPU instead (a handoff: the caller waits in the run queue), leave sleepers asleep for the
     next 1, 2, 4 ... launches, until a wake lands on another CPU again. */
  int woke = 0;
  if (atomic_load(&sleepers) > 0) {
    if (wake_skip > 0 && atomic_load(&test_mode) != 2) {  /* mode 2: only workers run chunks */
      --wake_skip;
      atomic_fetch_add(&st[ST_WAKES_SKIPPED], 1);
    } else {
      atomic_fetch_add(&st[ST_WAKEUPS], 1);
      futex(&gen_word, FUTEX_WAKE, INT_MAX);
      woke = 1;
    }
  }
  int failed = 0, ran = 0;
  if (atomic_load(&test_mode) != 2 || started == 0) ran = drain(g, 1, &failed);
  if (atomic_load(&done_word) != (uint32_t)n) {
    long deadline = now_ns() + atomic_load(&wait_spin_ns);
    int k = 0;
    uint32_t d;
    while ((d = atomic_load(&done_word)) != (uint32_t)n) {
      cpu_relax();
      if ((++k & 63) == 0 && now_ns() > deadline) {
        atomic_fetch_add(&st[ST_CALLER_SLEEPS], 1);
        atomic_store(&caller_waiting, 1);
        while ((d = atomic_load(&done_word)) != (uint32_t)n) futex(&done_word, FUTEX_WAIT, d);
        atomic_store(&caller_waiting, 0);
      }
    }
  }
  /* the loop's work, at most: its wall time times the threads that ran chunks of it (a chunk's own
     time would mislead: when the loop has fewer iterations than chunks, some chunks are empty) */
  if (e) record(e, (now_ns() - t0) * ((ran > 0) + atomic_load(&job_helpers)));
  if (woke && atomic_load(&job_handoff)) {
    atomic_fetch_add(&st[ST_HANDOFFS], 1);
    int most = atomic_load(&max_backoff);
    wake_backoff = wake_backoff ? (wake_backoff * 2 > most ? most : wake_backoff * 2) : 1;
    wake_skip = wake_backoff > most ? most : wake_backoff;
  } else if (woke && atomic_load(&job_helpers) > 0) {
    wake_backoff = 0;
  }
  void* err = atomic_exchange(&job_error, NULL);
  atomic_store(&busy, 0);
  if (failed) {
    if (err && dec_ref) dec_ref(err);
    return -1;
  }
  if (err) {
    if (set_err) set_err(err);
    if (dec_ref) dec_ref(err);
    return -1;
  }
  return 0;
}

void kiln_pool_configure(int threads, int chunks, long spin_us, long wait_spin_us, long small_us,
                         long chunk_us, int backoff) {
  atomic_store(&max_backoff, backoff < 0 ? 0 : backoff);
  atomic_store(&n_threads, threads < 1 ? 1 : threads);
  atomic_store(&chunks_per_thread, chunks < 1 ? 1 : chunks);
  atomic_store(&spin_ns, spin_us * 1000L);
  atomic_store(&wait_spin_ns, wait_spin_us * 1000L);
  atomic_store(&small_ns, small_us * 1000L);
  atomic_store(&chunk_ns, chunk_us * 1000L);
}

void kiln_pool_forget(void) {
  for (int i = 0; i < (1 << TABLE_BITS); ++i) {
    atomic_store(&table[i].work_ns, 0);
    atomic_store(&table[i].key, NULL);
  }
}

void kiln_pool_set_error_api(void* move, void* set, void* decref) {
  move_err = (FMoveErr)move;
  set_err = (FSetErr)set;
  dec_ref = (FDecRef)decref;
}

void kiln_pool_set_test_mode(int mode) { atomic_store(&test_mode, mode); }

int kiln_pool_threads(void) { return atomic_load(&n_threads); }

void kiln_pool_stats(uint64_t* out) {
  for (int i = 0; i < ST_N; ++i) out[i] = atomic_load(&st[i]);
}
"""

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
    digest = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]
    path = _cache_dir() / f"kiln-pool-{digest}.so"
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
    """Tests only: 1 makes workers claim nothing (as if descheduled), 2 leaves every chunk to them, 0 resets."""
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
