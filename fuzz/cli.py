"""``kiln fuzz``: run a campaign (live status line, findings table, output folder) or replay saved findings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.live import Live

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", choices=("graph", "tir", "both"), default="both",
                   help="graph: kiln IR + pass pipelines; tir: TVM PrimFuncs + TVM pass sequences (default: both)")
    p.add_argument("--time", default=None, metavar="DURATION", help="budget: 90s, 10m, 1h (default: 60s)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="budget: N test cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="worker processes (default 1); 0 runs in-process (no crash isolation)")
    p.add_argument("--out", default=None, metavar="DIR", help="write corpus/, findings/, report.json, coverage.png")
    p.add_argument("--no-feedback", action="store_true", help="the same loop with coverage feedback off (ablation)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds before a case counts as a hang")
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


def run(args: argparse.Namespace) -> int:
    from kiln.fuzz.campaign import FuzzOptions, iter_finding_dirs, parse_duration, run_campaign
    from kiln.fuzz.report import findings_table, replay_table, status_line

    console = Console(highlight=False)
    plugins = tuple(args.plugin)
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
    time_s = parse_duration(args.time) if args.time else (None if args.iterations else 60.0)
    pool = tuple(s.strip() for s in args.passes.split(";") if s.strip()) if args.passes else None
    opts = FuzzOptions(level=args.level, time_s=time_s, iterations=args.iterations, seed=args.seed,
                       jobs=args.jobs, out=args.out, feedback=not args.no_feedback, timeout_s=args.timeout,
                       plugins=plugins, pass_pool=pool, reduce=not args.no_reduce,
                       known_crashes=args.known_crashes,
                       models=tuple(m.strip() for m in args.models.split(",") if m.strip()))
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        camp = run_campaign(opts, progress=lambda s: live.update(status_line(s)))
        live.update(status_line(camp.status()))
    report = camp.report()
    console.print(findings_table(report))
    lv = ", ".join(f"{k} {v['tests']} tests {v['tests_per_s']:.2f}/s" for k, v in report["levels"].items())
    console.print(f"{report['tests']} tests in {report['seconds']:.0f} s ({lv}); coverage {report['coverage']['total']} "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(report['coverage']['by_source'].items()))}); "
                  f"statuses {json.dumps(report['statuses'])}")
    if args.out:
        console.print(f"wrote {Path(args.out) / 'report.json'}, coverage.png, corpus/ and findings/")
    return 0
