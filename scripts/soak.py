"""Soak the runtime (issue 15): one Session from several threads, then many load/close cycles.

Runs: ``threads`` threads x ``runs`` runs each on one Session, inputs drawn from a
fixed set, every output compared bit for bit with the single-threaded result.
Loads: ``loads`` cycles of load, one run, close.  Both report RSS growth after a
warm-up (the issue's bar: under 5 MiB) and the library mappings left.

    python scripts/soak.py                          # the full soak: 4 x 5,000 runs, 500 loads, zoo mlp
    python scripts/soak.py --runs 200 --loads 50    # a quick one
    python scripts/soak.py --artifact model.kiln    # your own artifact (random inputs)

``tests/runtime/test_soak.py`` runs a small soak in ``make test`` through these functions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20


def rss_mib() -> float:
    """This process's resident set size now, in MiB (``VmRSS``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def library_mappings() -> int:
    """Mappings of kiln's loaded libraries (their temp folder is ``kiln-lib-*``) in this process."""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        return sum("kiln-lib" in line for line in f)


def random_feeds(sess: Any, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` input sets matching the Session's compiled signature."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feeds = {}
        for spec in sess.inputs:
            shape = [d if isinstance(d, int) else sess.symbols[d] for d in spec.shape]
            dt = np.dtype(spec.dtype)
            feeds[spec.name] = (rng.integers(0, 8, shape).astype(dt) if dt.kind in "iub"
                                else rng.standard_normal(shape).astype(dt))
        out.append(feeds)
    return out


def _settle() -> float:
    gc.collect()
    return rss_mib()


def soak_runs(sess: Any, *, threads: int = 4, runs: int = 5000, warmup: int = 200, inputs: int = 16,
              seed: int = 0) -> dict[str, Any]:
    """``threads`` x ``runs`` runs on one Session; outputs checked against single-threaded results."""
    feeds = random_feeds(sess, inputs, seed)
    want = [sess.run(f) for f in feeds]
    mismatches = [0] * threads
    errors: list[str] = []

    def work(t: int, n: int) -> None:
        try:
            for i in range(n):
                k = (t * 7 + i) % len(feeds)
                got = sess.run(feeds[k])
                if any(not np.array_equal(got[name], want[k][name], equal_nan=True) for name in want[k]):
                    mismatches[t] += 1
        except Exception as e:  # noqa: BLE001 - reported, and fails the soak
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    def phase(n: int) -> float:
        pool = [threading.Thread(target=work, args=(t, n)) for t in range(threads)]
        t0 = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        return time.perf_counter() - t0

    phase(warmup)
    rss0 = _settle()
    seconds = phase(runs)
    rss1 = _settle()
    return {"threads": threads, "runs": threads * runs, "mismatches": sum(mismatches), "errors": errors,
            "rss_after_warmup_mib": round(rss0, 2), "rss_end_mib": round(rss1, 2),
            "rss_growth_mib": round(rss1 - rss0, 2), "seconds": round(seconds, 2)}


def soak_loads(path: str | os.PathLike, *, loads: int = 500, warmup: int = 20, **load_kwargs: Any) -> dict[str, Any]:
    """``loads`` cycles of load, one run, close; RSS growth after ``warmup`` cycles and mappings left."""
    from kiln.runtime import load

    def cycle(feeds: list[dict[str, np.ndarray]] | None) -> list[dict[str, np.ndarray]]:
        with load(path, **load_kwargs) as sess:
            feeds = feeds or random_feeds(sess, 1)
            sess.run(feeds[0])
        return feeds

    feeds = None
    for _ in range(warmup):
        feeds = cycle(feeds)
    rss0 = _settle()
    t0 = time.perf_counter()
    for _ in range(loads):
        feeds = cycle(feeds)
    seconds = time.perf_counter() - t0
    rss1 = _settle()
    return {"loads": loads, "rss_after_warmup_mib": round(rss0, 2), "rss_end_mib": round(rss1, 2),
            "rss_growth_mib": round(rss1 - rss0, 2), "library_mappings_left": library_mappings(),
            "seconds": round(seconds, 2)}


def _default_artifact(folder: str) -> str:
    """The zoo's mlp, compiled (and signed with the local key) into ``folder``."""
    import kiln

    return kiln.compile("mlp").save(os.path.join(folder, "mlp.kiln"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", help="a .kiln to soak (default: the zoo mlp, compiled now)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--runs", type=int, default=5000, help="runs per thread (default 5000)")
    p.add_argument("--loads", type=int, default=500, help="load/close cycles (default 500)")
    p.add_argument("--max-growth-mib", type=float, default=5.0, help="fail above this RSS growth (default 5)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kiln.runtime import load

    with tempfile.TemporaryDirectory(prefix="kiln-soak-") as d:
        path = args.artifact or _default_artifact(d)
        with load(path) as sess:
            runs = soak_runs(sess, threads=args.threads, runs=args.runs)
        loads = soak_loads(path, loads=args.loads)
    report = {"artifact": os.path.basename(path), "runs": runs, "loads": loads}
    print(json.dumps(report, indent=2))
    ok = (runs["mismatches"] == 0 and not runs["errors"] and loads["library_mappings_left"] == 0
          and max(runs["rss_growth_mib"], loads["rss_growth_mib"]) < args.max_growth_mib)
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
