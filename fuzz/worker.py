"""Worker processes: each test case runs in a child that may crash or hang without taking the fuzzer down.

A child imports kiln (and any ``plugins``, modules the tests use to plant a
bug) once, then answers tasks over a pipe.  When it dies (a segfault in TVM,
an abort) the case becomes a ``crash`` finding at stage ``process``; when it
runs past the timeout it is killed and the case becomes a ``hang``.  Either
way a fresh child takes its place.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["Task", "Worker", "check_in_child", "execute", "set_stage", "wait_any"]

_STAGE: Any = None  # the child's shared "stage|pass" buffer; the parent reads it when the child dies


def set_stage(stage: str, pass_name: str = "") -> None:
    """Record where the child is (stage and pass), so a crash that kills it can still be attributed."""
    if _STAGE is not None:
        _STAGE.value = f"{stage}|{pass_name}".encode()[:255]


@dataclass
class Task:
    """One case to run: ``level`` graph or tir, the case as JSON, and how."""

    level: str
    case: dict[str, Any]
    stages: tuple[str, ...] = ("passes", "compile", "onnxruntime")
    trace: bool = True
    harvest: bool = False  # graph cases: also return TIR cases made from the graph's kernels


def _harvest(case: Any, limit: int = 2) -> list[dict[str, Any]]:
    """TIR cases from the first compute nodes of a graph case (the generated graphs' kernels)."""
    from kiln.codegen.kernel import lower_node
    from kiln.codegen.target import host_target
    from kiln.fuzz.tir import case_from_kernel
    from kiln.ir.registry import is_view

    out = []
    for node in case.graph().nodes:
        if len(out) >= limit:
            break
        if is_view(node.op):
            continue
        try:
            kernel = lower_node(node, host_target(), name=f"k_{node.op}")
        except Exception:  # noqa: BLE001 - an op without a lowering has no kernel to harvest
            continue
        tc = case_from_kernel(kernel, seed=case.seed)
        out.append({"func": tc.func, "passes": list(tc.passes), "seed": tc.seed, "origin": f"kernel:{node.op}"})
    return out


def _tir_outcome(res: Any) -> Any:
    """A TirOutcome as the common Outcome: mismatch and oob are findings, clean TVM errors are invalid tests."""
    from kiln.fuzz.oracle import Outcome

    status = {"ok": "ok", "mismatch": "finding", "oob": "finding"}.get(res.status, "invalid")
    stage = "tir-" + str(res.detail.get("stage", "build"))
    features = [f"tir:{f}" for f in sorted(res.features)]
    features += [f"tvm-pass:{p}" for p in sorted(res.changed_passes)]
    if res.error_site:
        features.append(f"err:{res.error_site}")
    symptom = res.status if status == "finding" else ""
    return Outcome(status, symptom, stage if status == "finding" else "", "", res.message, dict(res.detail), features)


def execute(task: Task) -> dict[str, Any]:
    """Run one task in this process (the child's body; also used directly by tests and ``--jobs 0``)."""
    from kiln.fuzz.oracle import GraphCase, Outcome, run_graph_case

    t0 = time.perf_counter()
    try:
        if task.level == "graph":
            case = GraphCase.from_json(task.case)
            out = run_graph_case(case, tuple(task.stages), trace=task.trace)
            if task.harvest and out.status != "invalid":
                try:
                    out.extra["tir_cases"] = _harvest(case)
                except Exception:  # noqa: BLE001 - harvesting is a bonus, never a finding
                    pass
        elif task.level == "tir-check":
            return _check(task.case)
        else:
            from kiln.fuzz.tir import TirCase, run_case

            tc = TirCase(**task.case)
            out = _tir_outcome(run_case(tc))
    except Exception as e:  # noqa: BLE001 - the oracle itself failed: report it, keep the worker alive
        out = Outcome("finding", "crash", "fuzzer", "", f"{type(e).__name__}: {e}"[:300])
    out.seconds = time.perf_counter() - t0
    return out.to_json()


def _check(case: dict[str, Any]) -> dict[str, Any]:
    """Load a saved TIR case's function (``tir-check`` task): {"status": "ok"} or "refused" with why."""
    from kiln.fuzz.tir import load_func

    set_stage("tir-load")
    try:
        load_func(case["func"]).script()
    except Exception as e:  # noqa: BLE001 - any failure to load is a refusal, reported as text
        return {"status": "refused", "message": f"{type(e).__name__}: {e}"[:300]}
    return {"status": "ok"}


def check_in_child(funcs: Sequence[str], timeout_s: float = 60.0) -> list[str | None]:
    """Load each saved TIR function in a worker process first (TVM's JSON loader can crash on a
    damaged file): None for one that loads, else why not. The parent never loads a refused one."""
    from kiln.fuzz.tir import check_func_json

    out: list[str | None] = []
    worker: Worker | None = None
    try:
        for func in funcs:
            try:
                check_func_json(func)
            except Exception as e:  # noqa: BLE001 - UnsafeTir: refused without loading anything
                out.append(str(e))
                continue
            if worker is None:
                worker = Worker(timeout_s)
                worker.start()
            res = worker.run(Task("tir-check", {"func": func}, trace=False))
            if res.get("status") == "ok":
                out.append(None)
            elif res.get("status") == "refused":
                out.append(str(res.get("message", "")))
            else:
                out.append(f"TVM's JSON loader failed on it in a worker ({res.get('message', '')}); "
                           f"the file is damaged or was tampered with")
    finally:
        if worker is not None:
            worker.close()
    return out


def _child(conn: Connection, plugins: Sequence[str], stage: Any) -> None:
    global _STAGE
    _STAGE = stage
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    for module in plugins:
        importlib.import_module(module)
    import kiln.fuzz.oracle  # noqa: F401  (pay the imports once, before the first task)
    conn.send({"ready": True})
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        set_stage("worker")
        conn.send(execute(task))


class Worker:
    """A child process running tasks one at a time, restarted after a crash or hang."""

    def __init__(self, timeout_s: float = 60.0, plugins: Sequence[str] = ()):
        self.timeout_s = timeout_s
        self.plugins = tuple(plugins)
        self.proc: mp.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.task: Task | None = None
        self.started_at = 0.0
        self.restarts = 0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.stage = ctx.Array("c", 256, lock=False)
        self.proc = ctx.Process(target=_child, args=(child, self.plugins, self.stage), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(120):
            raise RuntimeError("fuzz worker did not start within 120 s")
        parent.recv()

    @property
    def busy(self) -> bool:
        return self.task is not None

    def submit(self, task: Task) -> None:
        if self.proc is None or not self.proc.is_alive():
            self.restart()
        assert self.conn is not None
        self.task = task
        self.started_at = time.monotonic()
        self.conn.send(task)

    def overdue(self) -> bool:
        return self.busy and time.monotonic() - self.started_at > self.timeout_s

    def collect(self) -> dict[str, Any]:
        """The result of the running task (call when its pipe is readable or it is overdue)."""
        assert self.task is not None and self.conn is not None
        elapsed = time.monotonic() - self.started_at
        result: dict[str, Any]
        if self.overdue() and not self.conn.poll():
            stage, pass_name = self._where()
            self.kill()
            result = {"status": "finding", "symptom": "hang", "stage": stage, "pass_name": pass_name,
                      "message": f"no answer within {self.timeout_s:g} s", "seconds": elapsed}
        else:
            try:
                result = self.conn.recv()
            except (EOFError, OSError):
                stage, pass_name = self._where()
                code = self._reap()
                name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
                result = {"status": "finding", "symptom": "crash", "stage": stage, "pass_name": pass_name,
                          "message": f"worker process died ({name})", "seconds": elapsed,
                          "detail": {"exitcode": code}}
        self.task = None
        return result

    def _where(self) -> tuple[str, str]:
        """(stage, pass) the child last recorded; ("process", "") when it recorded nothing."""
        raw = bytes(self.stage.value).decode(errors="replace") if getattr(self, "stage", None) else ""
        stage, _, pass_name = raw.partition("|")
        return (stage or "process"), pass_name

    def run(self, task: Task) -> dict[str, Any]:
        """Submit and wait (for the reducer and replay)."""
        self.submit(task)
        assert self.conn is not None
        self.conn.poll(self.timeout_s)
        return self.collect()

    def _reap(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.join(5)
        code = self.proc.exitcode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        self._reap()

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive() and self.conn is not None and not self.busy:
            try:
                self.conn.send(None)
                self.proc.join(5)
            except OSError:
                pass
        self.kill()


def wait_any(workers: Sequence[Worker], timeout: float) -> list[Worker]:
    """The busy workers with a result ready (or overdue), waiting at most ``timeout`` seconds."""
    busy = [w for w in workers if w.busy]
    if not busy:
        return []
    now = time.monotonic()
    soonest = min(max(0.0, w.started_at + w.timeout_s - now) for w in busy)
    ready = wait([w.conn for w in busy if w.conn is not None], timeout=min(timeout, soonest + 0.01))
    return [w for w in busy if w.conn in ready or w.overdue()]
