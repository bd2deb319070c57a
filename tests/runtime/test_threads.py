"""kiln's thread pool: each chunk runs exactly once, by whoever is free; errors reach the caller;
a descheduled worker stalls nothing; fork, concurrent callers and two processes are safe; a whole
model's outputs are bit-identical to TVM's pool."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from kiln.runtime import threads

HEADER = "# from tvm.script import tirx as T\n"
KERNELS = {
    "inc": """@T.prim_func
def inc(a: T.handle, n: T.int32):
    A = T.match_buffer(a, (n,), "int32")
    for i in T.parallel(n):
        A[i] = A[i] + 1
""",
    "check": """@T.prim_func
def check(a: T.handle, n: T.int32):
    A = T.match_buffer(a, (n,), "int32")
    for i in T.parallel(n):
        assert A[i] >= 0, "kiln-test: negative element"
        A[i] = A[i] + 1
""",
    "rows": """@T.prim_func
def rows(a: T.handle, b: T.handle, n: T.int32):
    A = T.match_buffer(a, (n, 67), "float32")
    B = T.match_buffer(b, (n,), "float32")
    for i in T.parallel(n):
        B[i] = T.float32(0)
        for j in range(67):
            B[i] = B[i] + T.exp(A[i, j] * T.float32(0.37)) / T.float32(3.0)
""",
    "two": """@T.prim_func
def two(a: T.handle, b: T.handle, n: T.int32, m: T.int32):
    A = T.match_buffer(a, (n,), "int32")
    B = T.match_buffer(b, (m,), "int32")
    for i in T.parallel(n):
        A[i] = A[i] + 1
    for j in T.parallel(m):
        B[j] = B[j] + 1
""",
}
SIZES = (0, 1, 5, 8, 9, 31, 1000, 100003)


def _build(path: Path) -> None:
    import tvm
    from tvm.script import from_source

    mod = tvm.IRModule({name: from_source(HEADER + src).with_attr("global_symbol", name)
                        for name, src in KERNELS.items()})
    tvm.compile(mod, target="llvm").export_library(str(path))


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> tuple[Path, Path]:
    """The kernel library twice (two files, so two separate dlopen instances)."""
    d = tmp_path_factory.mktemp("pool")
    first = d / "kernels.so"
    _build(first)
    second = d / "kernels_tvm.so"
    shutil.copy(first, second)
    return first, second


@pytest.fixture(scope="module")
def pooled(libs):
    """The kernels on kiln's pool (2 threads)."""
    import tvm

    assert threads.pool_library() is not None, threads.unavailable_reason()
    os.environ["TVM_NUM_THREADS"] = "2"
    mod = tvm.runtime.load_module(str(libs[0]))
    assert threads.adopt(libs[0])
    return mod


@pytest.fixture(scope="module")
def tvm_pooled(libs):
    """The same kernels left on TVM's pool."""
    import tvm

    return tvm.runtime.load_module(str(libs[1]))


@pytest.fixture
def pool_mode() -> Iterator[None]:
    """Fixed chunking (no measured sizes) for the test; then the defaults again (2 threads, no test mode)."""
    threads.forget()
    threads.configure(2, chunk_us=0, small_us=0)
    yield
    threads.set_test_mode(0)
    threads.forget()
    threads.configure(**asdict(threads.Tuning(threads=2)))


def _tensor(a: np.ndarray):
    import tvm

    return tvm.runtime.tensor(a)


def _count_runs(mod, n: int, times: int = 3) -> np.ndarray:
    a = _tensor(np.zeros(n, np.int32))
    for _ in range(times):
        mod["inc"](a, n)
    return a.numpy()


def _delta(before: threads.PoolStats, after: threads.PoolStats) -> dict[str, int]:
    return {k: getattr(after, k) - getattr(before, k) for k in before.__dataclass_fields__}


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("chunks", [1, 4, 7])
def test_every_iteration_runs_exactly_once(pooled, pool_mode, mode, chunks):
    """Whoever claims the chunks (caller and workers, caller alone, workers alone), each index runs once."""
    threads.configure(2, chunks=chunks)
    threads.set_test_mode(mode)
    before = threads.stats()
    for n in SIZES:
        assert np.array_equal(_count_runs(pooled, n), np.full(n, 3, np.int32)), n
    d = _delta(before, threads.stats())
    assert d["pooled"] == 3 * len(SIZES) and d["inline"] == 0
    assert d["chunks_caller"] + d["chunks_workers"] == 3 * len(SIZES) * 2 * chunks
    if mode == 1:  # workers as if descheduled: the caller ran every chunk, and waited for none
        assert d["chunks_workers"] == 0 and d["caller_sleeps"] == 0
    if mode == 2:
        assert d["chunks_caller"] == 0


def test_more_threads_than_cores(pooled, pool_mode):
    threads.configure(5, chunks=3)
    before = threads.stats()
    assert np.array_equal(_count_runs(pooled, 1000), np.full(1000, 3, np.int32))
    d = _delta(before, threads.stats())
    assert d["chunks_caller"] + d["chunks_workers"] == 3 * 5 * 3
    assert threads.stats().workers >= 4


def test_one_thread_runs_inline(pooled, pool_mode):
    threads.configure(1)
    before = threads.stats()
    assert np.array_equal(_count_runs(pooled, 1000), np.full(1000, 3, np.int32))
    d = _delta(before, threads.stats())
    assert d["inline"] == 3 and d["pooled"] == 0


def test_measured_loops_get_sized_chunks(pooled, pool_mode):
    """A loop measured below small_us runs on the caller alone; a long one gets many chunks, capped."""
    threads.configure(2, chunks=8, chunk_us=1, small_us=100_000)  # far above any preemption
    before = threads.stats()
    assert np.array_equal(_count_runs(pooled, 100, times=4), np.full(100, 4, np.int32))
    d = _delta(before, threads.stats())
    assert d["pooled"] == 1 and d["small"] == 3  # first launch measures it, the rest run inline
    threads.configure(2, chunks=8, chunk_us=1, small_us=0)
    threads.forget()
    before = threads.stats()
    n = 2_000_000  # ~ms of work: the cap (8 per thread) once measured
    assert np.array_equal(_count_runs(pooled, n, times=3), np.full(n, 3, np.int32))
    d = _delta(before, threads.stats())
    assert d["small"] == 0 and d["chunks_caller"] + d["chunks_workers"] == 3 * 16


def test_float_kernel_bit_identical_to_tvm_pool(pooled, tvm_pooled, pool_mode):
    """Same kernel, same inputs: kiln's pool (any split of the rows) and TVM's give identical bits."""
    n = 517
    a = np.random.default_rng(0).standard_normal((n, 67)).astype(np.float32)
    want = _tensor(np.zeros(n, np.float32))
    tvm_pooled["rows"](_tensor(a), want, n)
    assert np.all(np.isfinite(want.numpy())) and np.ptp(want.numpy()) > 0
    for chunks, mode in [(1, 0), (4, 0), (13, 2), (4, 1)]:
        threads.configure(2, chunks=chunks)
        threads.set_test_mode(mode)
        got = _tensor(np.zeros(n, np.float32))
        pooled["rows"](_tensor(a), got, n)
        assert got.numpy().tobytes() == want.numpy().tobytes()


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_error_in_a_chunk_reaches_the_caller(pooled, pool_mode, mode):
    """A failing chunk, run by the caller or by a worker, raises in the caller with its message."""
    threads.set_test_mode(mode)
    a = np.zeros(1000, np.int32)
    a[-1] = -1
    with pytest.raises(Exception, match="kiln-test: negative element"):
        pooled["check"](_tensor(a), 1000)
    # the pool is usable afterwards, and leaves no stale error behind
    b = _tensor(np.zeros(1000, np.int32))
    pooled["check"](b, 1000)
    assert np.array_equal(b.numpy(), np.ones(1000, np.int32))


def test_concurrent_callers(pooled, pool_mode):
    """Several Python threads launching at once: one gets the pool, the others run inline; all correct."""
    bad: list[int] = []

    def work(k: int) -> None:
        for _ in range(30):
            n = 5000 + k
            if not np.array_equal(_count_runs(pooled, n, times=2), np.full(n, 2, np.int32)):
                bad.append(k)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts) and not bad


_PREEMPTED_CLAIM = '''
import sys
import numpy as np
import tvm
from kiln.runtime import threads
mod = tvm.runtime.load_module(sys.argv[1])
assert threads.adopt(sys.argv[1])
threads.configure(2, chunks=8, small_us=0)
threads.set_test_mode(3)  # loops alternate 2 and 16 chunks; the worker and the caller pause in the window
n, m = 20_000, 64
a, b = tvm.runtime.tensor(np.zeros(n, np.int32)), tvm.runtime.tensor(np.zeros(m, np.int32))
for _ in range(100):
    mod["two"](a, b, n, m)
s = threads.stats()
print((a.numpy() == 100).all() and (b.numpy() == 100).all(), s.chunks_workers, s.pooled)
'''


def test_worker_preempted_while_claiming_never_runs_a_chunk_of_the_next_loop(libs):
    """A worker that read the ticket of a finished loop and resumes after the caller wrote the next
    loop's job must not claim a chunk of it under the old ticket (it did: an extra chunk ran, the done
    count overshot and the caller slept forever; found as a hang compiling matmuls).  Test mode 3
    makes that interleaving happen on every launch."""
    try:
        out = subprocess.run([sys.executable, "-c", _PREEMPTED_CLAIM, str(libs[0])], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "TVM_NUM_THREADS": "2"})
    except subprocess.TimeoutExpired:
        pytest.fail("a launch never returned (the caller waits for a done count it passed)")
    assert out.returncode == 0, out.stderr[-2000:]
    ok, worker_chunks, pooled = out.stdout.split()
    assert ok == "True" and int(pooled) == 200 and int(worker_chunks) == 100 * (2 + 16)


def test_fork_child_runs_kernels(pooled):
    """A child forked after the pool started (its workers gone) still completes every launch."""
    assert np.array_equal(_count_runs(pooled, 4000), np.full(4000, 3, np.int32))
    assert threads.stats().workers >= 1
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def in_child() -> None:
        child.send(bool(np.array_equal(_count_runs(pooled, 10000), np.full(10000, 3, np.int32))))

    p = ctx.Process(target=in_child)
    p.start()
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
        pytest.fail("forked child hung on a parallel launch")
    assert p.exitcode == 0 and parent.recv() is True


_TWO_PROCESSES = '''
import os, sys, time
import numpy as np
os.environ["TVM_NUM_THREADS"] = "2"
import tvm
from kiln.runtime import threads
mod = tvm.runtime.load_module(sys.argv[1])
assert threads.adopt(sys.argv[1])
threads.configure(small_us=0)  # every launch on the pool, none inline
a = tvm.runtime.tensor(np.zeros(20000, np.int32))
for _ in range(3000):
    mod["inc"](a, 20000)
assert (a.numpy() == 3000).all()
s = threads.stats()
print(s.pooled, s.chunks_workers)
'''


def test_two_processes_do_not_block_each_other(libs):
    """Two processes, each with a 2-thread pool, on the same cores: both finish (no shared barrier)."""
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(libs[0])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all(int(o[0].split()[0]) == 3000 for o in outs)
    assert time.monotonic() - t0 < 300


_ONE_CPU = '''
import os, sys
import numpy as np
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
os.environ["TVM_NUM_THREADS"] = "2"
import tvm
from kiln.runtime import threads
mod = tvm.runtime.load_module(sys.argv[1])
assert threads.adopt(sys.argv[1])
threads.configure(small_us=0)
a = tvm.runtime.tensor(np.zeros(200000, np.int32))
for _ in range(300):
    mod["inc"](a, 200000)
assert (a.numpy() == 300).all()
s = threads.stats()
print(s.wakeups, s.handoffs, s.wakes_skipped)
'''


def test_no_free_cpu_leaves_workers_asleep(libs):
    """On one CPU every woken worker takes the caller's CPU (a handoff): the pool stops waking them."""
    res = subprocess.run([sys.executable, "-c", _ONE_CPU, str(libs[0])], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wakeups, handoffs, skipped = map(int, res.stdout.split())
    assert handoffs >= 1 and skipped > wakeups


def _fake_library(tmp_path: Path, barrier: bool) -> Path:
    """A shared library with TVM's launch slot (and its barrier slot when ``barrier``)."""
    src = tmp_path / f"fake{int(barrier)}.c"
    src.write_text("void* __TVMBackendParallelLaunch = (void*)0x1234;\n" +
                   ("void* __TVMBackendParallelBarrier = (void*)0x5678;\n" if barrier else ""))
    out = src.with_suffix(".so")
    subprocess.run([threads._compiler(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


@pytest.mark.parametrize("barrier", [False, True])
def test_library_with_barrier_keeps_tvm_pool(tmp_path, barrier):
    lib_path = _fake_library(tmp_path, barrier)
    lib = ctypes.CDLL(str(lib_path))
    assert threads.adopt(lib_path) is (not barrier)
    slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch").value
    launch = ctypes.cast(threads.pool_library().kiln_parallel_launch, ctypes.c_void_p).value
    assert slot == (0x1234 if barrier else launch)


def test_library_not_loaded(tmp_path):
    assert threads.adopt(tmp_path / "never-loaded.so") is False


def test_disabled_by_environment(libs, monkeypatch):
    monkeypatch.setenv("KILN_THREAD_POOL", "tvm")
    assert not threads.enabled() and threads.adopt(libs[1]) is False
    assert "KILN_THREAD_POOL=tvm" in threads.unavailable_reason()


def test_configure_rejects_bad_values():
    with pytest.raises(ValueError, match="threads"):
        threads.configure(0)
    with pytest.raises(ValueError, match="chunks"):
        threads.configure(2, chunks=0)
    with pytest.raises(ValueError, match="times"):
        threads.configure(2, spin_us=-1)
    with pytest.raises(TypeError):
        threads.configure(2, no_such_setting=1)


def test_build_leaves_only_the_library(tmp_path):
    """The build writes through a temp dir renamed into place: only the library is left."""
    target = tmp_path / "x.so"
    threads._build(target)
    assert target.exists() and ctypes.CDLL(str(target)).kiln_parallel_launch
    assert [p.name for p in tmp_path.iterdir()] == ["x.so"]


def test_no_compiler_means_tvm_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(OSError):
        threads._build(tmp_path / "y.so")


@pytest.mark.slow
def test_model_bit_identical_and_on_kiln_pool(tmp_path):
    """A compiled model through ``kiln.runtime.load``: its kernels run on kiln's pool, with the exact
    outputs of TVM's pool (``KILN_THREAD_POOL=tvm``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import kiln
    from kiln.runtime import load

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 384)).astype(np.float32) * 0.05
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Softmax", ["y"], ["p"], axis=-1),
         helper.make_node("Tanh", ["p"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [128, 256])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [128, 384])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    x = rng.standard_normal((128, 256)).astype(np.float32)
    path = kiln.compile(model, {"x": x}).save(tmp_path / "m.kiln")
    os.environ["KILN_THREAD_POOL"] = "tvm"
    try:
        want = load(path, threads=2).run({"x": x})["z"]
    finally:
        del os.environ["KILN_THREAD_POOL"]
    sess = load(path, threads=2)
    before = threads.stats()
    got = [sess.run({"x": x})["z"] for _ in range(5)]
    d = _delta(before, threads.stats())
    assert d["pooled"] >= 5, "kiln.runtime.load does not put kernels on kiln's pool (threads.adopt)"
    assert all(g.tobytes() == want.tobytes() for g in got)
