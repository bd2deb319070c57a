"""The ``kiln`` command line: ``kiln inspect``, ``kiln demo``.

Errors a user can act on are printed as one line and exit non-zero; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """An error to show the user as one line."""


# ------------------------------------------------------------------ model loading

def _zoo_names() -> list[str]:
    from . import zoo
    return zoo.names()


def load_onnx(source: str):
    """An onnx.ModelProto from a path or a zoo model name."""
    path = Path(source)
    if path.exists():
        from kiln.frontend.lift import load_model
        return load_model(path)
    if source in _zoo_names():
        from . import zoo
        return zoo.onnx_model(source)
    if path.suffix in (".onnx", ".ir"):
        raise CliError(f"{source}: no such file")
    raise CliError(f"{source!r} is neither a file nor a zoo model (zoo: {', '.join(_zoo_names())})")


def _shape(t) -> str:
    return f"{t.dtype}[{','.join(str(d) for d in t.shape)}]"


# ------------------------------------------------------------------ inspect

def cmd_inspect(args: argparse.Namespace) -> int:
    from kiln import ir
    from kiln.frontend import lift

    if args.model.endswith(".ir") and Path(args.model).exists():
        graph = ir.verify(ir.parse(Path(args.model).read_text()))
        model = None
    else:
        model = load_onnx(args.model)
        graph = lift(model)
    console.print(f"[bold]{args.model}[/]  graph [cyan]{graph.name}[/]")
    if model is not None:
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        console.print(f"opset: {opsets}   producer: {model.producer_name or '?'} {model.producer_version}")
    sig = Table(title="signature", title_justify="left")
    sig.add_column("kind")
    sig.add_column("name")
    sig.add_column("dtype:shape")
    for v in graph.inputs:
        sig.add_row("input", v.name, _shape(v.type))
    for v in graph.outputs:
        sig.add_row("output", v.name, _shape(v.type))
    console.print(sig)

    counts = Table(title="ops", title_justify="left")
    counts.add_column("kiln op")
    counts.add_column("count", justify="right")
    for op, n in sorted(graph.op_counts().items(), key=lambda kv: (-kv[1], kv[0])):
        counts.add_row(op, str(n))
    counts.add_row("[bold]total[/]", f"[bold]{len(graph.nodes)}[/]")
    if model is not None:
        onnx_counts: dict[str, int] = {}
        for n in model.graph.node:
            onnx_counts[n.op_type] = onnx_counts.get(n.op_type, 0) + 1
        ot = Table(title="ONNX ops (before lifting)", title_justify="left")
        ot.add_column("ONNX op")
        ot.add_column("count", justify="right")
        for op, n in sorted(onnx_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ot.add_row(op, str(n))
        ot.add_row("[bold]total[/]", f"[bold]{len(model.graph.node)}[/]")
        console.print(ot)
    console.print(counts)
    n_params = sum(int(v.const.size) for v in graph.constants.values())
    console.print(f"constants: {len(graph.constants)} ({n_params:,} elements)")
    if args.ir:
        text = ir.print_graph(graph, elide_constants=not args.full)
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------ demo

def cmd_demo(args: argparse.Namespace) -> int:
    """Export every zoo model, lift it, and check kiln's interpreter against ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    from kiln import ir, zoo
    from kiln.frontend import lift

    names = args.models or zoo.names()
    table = Table(title="kiln demo: the example zoo, lifted into kiln IR", title_justify="left")
    for col in ("model", "ONNX nodes", "kiln nodes", "canonical ops", "export s", "lift s",
                "interpret s", "max |kiln - ORT|"):
        table.add_column(col, justify="left" if col in ("model", "canonical ops") else "right")
    worst = 0.0
    for name in names:
        module, example = zoo.get(name)
        t0 = time.perf_counter()
        model = zoo.onnx_model(name)
        t1 = time.perf_counter()
        graph = lift(model)
        ir.verify(graph)
        t2 = time.perf_counter()
        feeds = {v.name: a.numpy() for v, a in zip(graph.inputs, example)}
        ours = ir.interpret(graph, feeds)
        t3 = time.perf_counter()
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        theirs = sess.run(None, feeds)
        err = max(float(np.max(np.abs(ours[v.name].astype(np.float64) - t))) for v, t in zip(graph.outputs, theirs))
        worst = max(worst, err)
        canon = [op for op in ("conv", "batch_norm", "layer_norm", "rms_norm", "gelu", "silu", "softmax", "matmul")
                 if op in graph.op_counts()]
        table.add_row(name, str(len(model.graph.node)), str(len(graph.nodes)),
                      ", ".join(f"{op}×{graph.op_counts()[op]}" for op in canon),
                      f"{t1 - t0:.1f}", f"{t2 - t1:.2f}", f"{t3 - t2:.2f}", f"{err:.2e}")
    console.print(table)
    if worst > 1e-3:
        raise CliError(f"kiln's interpreter disagrees with ONNX Runtime by {worst:.3g}")
    console.print("[green]all zoo models lift, verify and match ONNX Runtime[/]")
    return 0


# ------------------------------------------------------------------ entry point

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: an ahead-of-time compiler for neural-network graphs")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="show a model's signature, op counts and (with --ir) its kiln IR")
    ins.add_argument("model", help="an .onnx file, a kiln .ir file, or a zoo model name")
    ins.add_argument("--ir", action="store_true", help="print the kiln IR text")
    ins.add_argument("--full", action="store_true", help="with --ir: print every constant's data, not just small ones")
    ins.set_defaults(func=cmd_inspect)
    demo = sub.add_parser("demo", help="run the main job on the built-in example model zoo")
    demo.add_argument("models", nargs="*", help="zoo model names (default: all)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("KILN_DEBUG"))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, or the traceback with --debug
        if debug:
            raise
        err_console.print(f"[red]error:[/] {_one_line(e)}")
        err_console.print("[dim](run with --debug for the traceback)[/]")
        return 1


def _one_line(e: BaseException) -> str:
    from kiln.ir.verify import VerifyError

    msg = str(e) if not isinstance(e, KeyError) else str(e.args[0]) if e.args else repr(e)
    known = (CliError, VerifyError, ValueError, KeyError, FileNotFoundError, OSError)
    if not isinstance(e, known):
        msg = f"{type(e).__name__}: {msg}"
    return msg


if __name__ == "__main__":
    sys.exit(main())
