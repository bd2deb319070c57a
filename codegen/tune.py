"""Optional MetaSchedule tuning of kiln's kernels, with a tuning database reused across compiles.

``kiln compile --tune TRIALS`` tunes every distinct kernel that the database
does not already know (TRIALS measured candidates per kernel), then keeps,
per kernel, whichever is faster: the tuned schedule or kiln's hand schedule.
The database (MetaSchedule JSON records) lives in ``$KILN_TUNING_DB`` or
``~/.cache/kiln/tuning``; a later compile of the same kernel on the same
target reuses its record without tuning.

TVM's ``s_tir.tensor_intrin`` import (done by tuning and by every builder
worker) spends most of its time in ``inspect.stack()`` reading source lines;
the builder initializer imports it with source reading off.  The search uses
MetaSchedule's random cost model (its XGBoost model would pull in xgboost and
CUDA's NCCL wheel).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm.target import Target

__all__ = ["TuneOptions", "TuneResult", "default_db_dir", "tune_kernel"]


def default_db_dir() -> Path:
    return Path(os.environ.get("KILN_TUNING_DB") or Path.home() / ".cache" / "kiln" / "tuning")


@dataclass(frozen=True)
class TuneOptions:
    trials: int
    db_dir: Path | None = None
    builder_timeout_s: float = 120.0


@dataclass
class TuneResult:
    func: tvm.tirx.PrimFunc
    source: str  # "tuned", "database", "hand" (hand schedule faster or tuning found nothing)
    hand_us: float | None = None
    tuned_us: float | None = None


def fast_tensor_intrin_import() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` with ``inspect.stack`` not reading source lines (8x faster)."""
    orig = inspect.stack
    inspect.stack = lambda context=1: orig(0)
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = orig


def _time_us(func: tvm.tirx.PrimFunc, target: Target) -> float:
    mod = tvm.compile(tvm.IRModule({"main": func}), target=target).mod
    dev = tvm.cpu()
    args = []
    for p in func.params:
        shape, dtype = [int(d) for d in p.shape], str(p.dtype)
        arr = np.random.default_rng(0).standard_normal(shape).astype(dtype) if "float" in dtype \
            else np.zeros(shape, dtype=dtype)
        args.append(tvm.runtime.tensor(arr, dev))
    ev = mod.time_evaluator("main", dev, number=5, repeat=5, min_repeat_ms=20)
    return float(np.median(ev(*args).results)) * 1e6


def tune_kernel(unscheduled: tvm.tirx.PrimFunc, hand: tvm.tirx.PrimFunc, target: Target, opts: TuneOptions,
                log: Callable[[str], None] | None = None) -> TuneResult:
    """The faster of the database/tuned schedule and kiln's hand schedule for one kernel."""
    from tvm.s_tir import meta_schedule as ms

    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_log.level == logging.NOTSET:
        ms_log.setLevel(logging.WARNING)  # its per-round tables go to the work dir's log files
    fast_tensor_intrin_import()
    db_dir = Path(opts.db_dir or default_db_dir())
    db_dir.mkdir(parents=True, exist_ok=True)
    mod = tvm.IRModule({"main": unscheduled.with_attr("global_symbol", "main")})
    database = ms.database.JSONDatabase(str(db_dir / "workloads.json"), str(db_dir / "records.json"))
    source = "database"
    sch = ms.tir_integration.compile_tir(database, mod, target)
    if sch is None and opts.trials > 0:
        builder = ms.builder.LocalBuilder(timeout_sec=opts.builder_timeout_s, initializer=fast_tensor_intrin_import)
        database = ms.tune_tir(mod, target, work_dir=str(db_dir / "work"), max_trials_global=opts.trials,
                               num_trials_per_iter=min(opts.trials, 16), builder=builder, database=database,
                               cost_model="random")
        sch = ms.tir_integration.compile_tir(database, mod, target)
        source = "tuned"
    if sch is None:
        return TuneResult(hand, "hand")
    tuned = sch.mod["main"]
    hand_us, tuned_us = _time_us(hand, target), _time_us(tuned, target)
    if log:
        log(f"hand {hand_us:.1f} us, {source} {tuned_us:.1f} us")
    if tuned_us < hand_us:
        return TuneResult(tuned, source, hand_us, tuned_us)
    return TuneResult(hand, "hand", hand_us, tuned_us)
