"""What a campaign shows a person: the live status line, the findings table, the coverage plot."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

__all__ = ["findings_table", "plot_coverage", "replay_table", "status_line"]


def status_line(s: Mapping[str, Any]) -> str:
    """One line: tests, tests/s, coverage, corpus size, findings."""
    return (f"[bold]{s['tests']}[/] tests  {s['tests_per_s']:.2f}/s  coverage {s['coverage']}  "
            f"corpus {s['corpus']}  findings [bold red]{s['findings']}[/]  {s['elapsed_s']:.0f} s")


def findings_table(report: Mapping[str, Any]) -> Table:
    """Findings grouped by kind (symptom) and stage: how many unique ones, how often seen, an example."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for f in report["findings"]:
        groups[(f["level"], f["symptom"], f["stage"])].append(f)
    table = Table(title=f"findings: {len(report['findings'])} unique in {report['tests']} tests")
    for col in ("level", "kind", "stage", "unique", "seen", "reduced size", "example"):
        table.add_column(col, overflow="fold")
    for (level, symptom, stage), fs in sorted(groups.items()):
        ex = fs[0]
        where = f"{ex['pass']}: " if ex["pass"] else ""
        table.add_row(escape(level), escape(symptom), escape(stage), str(len(fs)), str(sum(f["count"] for f in fs)),
                      ", ".join(f"{f['size_before']}→{f['size_after']}" for f in fs[:4]),
                      escape(f"{where}{ex['message'][:90]}\n{ex['folder']}"))
    if not groups:
        table.add_row("-", "none", "-", "0", "0", "-", "-")
    return table


def replay_table(rows: Sequence[Any]) -> Table:
    """One row per replayed finding: what it was, what it does now (saved text is escaped, not markup)."""
    table = Table(title="replay")
    for col in ("finding", "expected", "now"):
        table.add_column(col, overflow="fold")
    for r in rows:
        exp, got = r.expected, r.got
        now = "[red]reproduces[/]" if r.reproduces else \
            "[green]gone[/] " + escape(f"({got.get('status')} {got.get('symptom', '')} {got.get('stage', '')})")
        table.add_row(escape(os.path.basename(r.folder)),
                      escape(f"{exp.get('symptom', '?')} at {exp.get('stage', '?')} {exp.get('pass_name', '')}"), now)
    return table


def plot_coverage(timeline: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Coverage (and findings) over time as a PNG, written through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ts = [p["t"] for p in timeline] or [0]
    ax.plot(ts, [p["coverage"] for p in timeline] or [0], label="coverage (features)", color="tab:blue")
    ax.set_xlabel("seconds")
    ax.set_ylabel("coverage")
    ax2 = ax.twinx()
    ax2.step(ts, [p["findings"] for p in timeline] or [0], where="post", color="tab:red", label="unique findings")
    ax2.set_ylabel("unique findings")
    ax2.set_ylim(bottom=0, top=max([p["findings"] for p in timeline] + [1]) * 1.2)
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title or "kiln fuzz")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
