"""``kiln fuzz``: run a campaign (live status line, findings table, output folder) or replay saved findings."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", choices=("graph", "tir", "both", "inputs"), default="both",
                   help="graph: kiln IR + pass pipelines; tir: TVM PrimFuncs + TVM pass sequences (default: both); "
                        "inputs: malformed ONNX files, artifacts, calibration files and run inputs")
    p.add_argument("--kind", default=None, metavar="K1,K2",
                   help="--level inputs: onnx,artifact,calib,run (default: all); --iterations counts per kind")
    p.add_argument("--time", type=_duration, default=None, metavar="DURATION",
                   help="budget: 90s, 10m, 1h (default: 60s)")
    p.add_argument("--iterations", type=_at_least_1, default=None, metavar="N", help="budget: N test cases")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--jobs", type=_jobs, default=1, metavar="J", help="worker processes (default 1)")
    p.add_argument("--in-process", action="store_true",
                   help="run cases in this process instead of workers (faster; a crash ends the campaign)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the campaign saved in DIR (its options, corpus, coverage, counters and "
                        "random state) with the rest of its budget, or with --time/--iterations more")
    p.add_argument("--out", default=None, metavar="DIR", help="write corpus/, findings/, report.json, coverage.png")
    p.add_argument("--no-feedback", action="store_true", help="the same loop with coverage feedback off (ablation)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="S",
                   help="seconds before a case counts as a hang (default 60)")
    p.add_argument("--no-reduce", action="store_true", help="save findings unreduced")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE in every worker first (e.g. to register an extra pass)")
    p.add_argument("--passes", default=None, metavar="POOL",
                   help="';'-separated pass strings the pipeline mutator draws from (default: every registered pass)")
    p.add_argument("--models", default="", metavar="M1,M2",
                   help="also seed with these models: zoo names, light:<name> (onnx's light CNNs), .onnx paths")
    p.add_argument("--known-crashes", action="store_true",
                   help="also put TVM passes with a known crash (fuzz/FINDINGS.md) into TIR pass sequences")
    p.add_argument("--replay", default=None, metavar="DIR",
                   help="re-run saved findings (a finding folder or a campaign folder); exit 1 if any reproduces")


def _duration(text: str) -> str:
    """argparse type of --time: a duration above 0 (kept as text; parse_duration reads it)."""
    from kiln.fuzz.campaign import parse_duration

    try:
        parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration above 0: 90, 90s, 10m or 1h") from None
    return text


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]) -> Any:
    try:
        v = kind(text)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
    return v


def _at_least_1(text: str) -> int:
    return _number(text, int, "a whole number of at least 1", lambda v: v >= 1)


def _seed(text: str) -> int:
    return _number(text, int, "a whole number of at least 0", lambda v: 0 <= v < 1 << 63)


def _jobs(text: str) -> int:
    return _number(text, int, "1 or more worker processes (--in-process runs cases without workers)",
                   lambda v: v >= 1)


def _seconds(text: str) -> float:
    return _number(text, float, "a number of seconds above 0", lambda v: v > 0)


# Flags that define a campaign: --resume takes them from the saved state, so giving one is a usage error.
_FIXED_ON_RESUME = {"level": "both", "seed": 0, "out": None, "no_feedback": False, "timeout": 60.0, "passes": None,
                    "models": "", "known_crashes": False, "replay": None, "kind": None}


def _resume(args: argparse.Namespace, console: Console) -> int:
    """``kiln fuzz --resume DIR``: continue a saved campaign."""
    from kiln.fuzz.campaign import parse_duration, resume_campaign

    given = [k for k, default in _FIXED_ON_RESUME.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"--resume takes the campaign's options from {args.resume}/state.json; "
                         f"{flags} cannot be given with it (only --time, --iterations, --jobs, --in-process, "
                         f"--no-reduce, --plugin)")
    camp = resume_campaign(args.resume, time_s=parse_duration(args.time) if args.time else None,
                           iterations=args.iterations, jobs=0 if args.in_process else args.jobs,
                           reduce=False if args.no_reduce else None, plugins=tuple(args.plugin))
    console.print(f"resuming {args.resume}: {camp.n} tests done, corpus "
                  f"{sum(len(v) for v in camp.corpus.values())}, {len(camp.findings)} findings"
                  + (f"; left out {camp.refused} saved entries that did not check out" if camp.refused else ""))
    return _drive(camp, args.resume, console)


class UsageError(Exception):
    """A flag combination argparse cannot express; exits 2 like argparse's own errors."""


def _drive(camp: Any, out: str | None, console: Console) -> int:
    """Run a campaign with a live status line; SIGINT or SIGTERM saves the folder and stops it
    (KeyboardInterrupt goes on, so the CLI exits 130; SIGTERM exits 143)."""
    from kiln.fuzz.campaign import Interrupted
    from kiln.fuzz.report import status_line

    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            camp.progress = lambda s: live.update(status_line(s))
            camp.run()
            if out:
                camp.save(final=True)
            live.update(status_line(camp.status()))
    except KeyboardInterrupt as e:
        where = f"; saved {out} (report.json, state.json, corpus/, findings/): continue with " \
                f"kiln fuzz --resume {out}" if out else " (no --out: nothing saved)"
        console.print(escape(f"interrupted after {camp.n} tests{where}"))
        if isinstance(e, Interrupted):
            return 143
        raise
    _summary(camp.report(), out, console)
    return 0


def _summary(report: dict[str, Any], out: str | None, console: Console) -> None:
    from kiln.fuzz.report import findings_table

    console.print(findings_table(report))
    lv = ", ".join(f"{k} {v['tests']} tests {v['tests_per_s']:.2f}/s" for k, v in report["levels"].items())
    console.print(escape(f"{report['tests']} tests in {report['seconds']:.0f} s ({lv}); coverage "
                         f"{report['coverage']['total']} ({', '.join(f'{k} {v}' for k, v in sorted(report['coverage']['by_source'].items()))}); "
                         f"statuses {json.dumps(report['statuses'])}"))
    if out:
        console.print(escape(f"wrote {Path(out) / 'report.json'}, state.json, coverage.png, corpus/ and findings/"))


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(escape(f"kiln fuzz: error: {e}"))
        return 2


def _run(args: argparse.Namespace) -> int:
    from kiln.fuzz.campaign import Campaign, FuzzOptions, iter_finding_dirs, parse_duration
    from kiln.fuzz.report import replay_table

    console = Console(highlight=False)
    plugins = tuple(args.plugin)
    if args.replay and args.resume:
        raise UsageError("--replay and --resume cannot be given together")
    if args.resume:
        return _resume(args, console)
    if args.replay:
        from kiln.fuzz.findings import replay

        folders = list(iter_finding_dirs(args.replay))
        if not folders:
            raise ValueError(f"--replay {args.replay}: no finding folders (with finding.json) there")
        rows = replay(folders, timeout_s=args.timeout, plugins=plugins)
        console.print(replay_table(rows))
        still = sum(r.reproduces for r in rows)
        console.print(f"{still} of {len(rows)} findings reproduce")
        return 1 if still else 0
    if args.level == "inputs":
        from kiln.fuzz.inputs import run_cli

        return run_cli(args, console)
    time_s = parse_duration(args.time) if args.time else (None if args.iterations else 60.0)
    pool = tuple(s.strip() for s in args.passes.split(";") if s.strip()) if args.passes else None
    opts = FuzzOptions(level=args.level, time_s=time_s, iterations=args.iterations, seed=args.seed,
                       jobs=0 if args.in_process else args.jobs, out=args.out, feedback=not args.no_feedback,
                       timeout_s=args.timeout, plugins=plugins, pass_pool=pool, reduce=not args.no_reduce,
                       known_crashes=args.known_crashes,
                       models=tuple(m.strip() for m in args.models.split(",") if m.strip()))
    return _drive(Campaign(opts), args.out, console)
