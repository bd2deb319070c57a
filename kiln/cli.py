"""The ``kiln`` command line: ``kiln inspect``, ``quantize``, ``compile``, ``run``, ``bench``, ``demo``.

Exit codes: 0 ok, 1 error (any ``kiln.Error``: one line naming the thing, what
was expected and what came), 2 usage (argparse), 130 interrupted (Ctrl-C,
whatever layer it reached: torch's exporter, TVM). Anything else is a kiln bug
and says so in one line; ``--debug`` (or ``KILN_DEBUG=1``) shows the traceback.
No user text (file names, messages, node and dim names) is read as rich markup.
An output path that is the same file as an input, a folder, or in a missing or
unwritable folder is refused before any work; other existing outputs are
replaced (atomically), as ONNX Runtime's and onnxsim's tools do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.runtime.errors import Error, InputError, caused_by_interrupt

console = Console(highlight=False)
if not console.is_terminal:  # piped or logged: tables keep their columns
    console = Console(highlight=False, width=max(console.width, 140))
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Error):
    """An error to show the user as one line."""


# ------------------------------------------------------------------ argument types and output paths

def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--repeat``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_mb(text: str) -> float:
    """argparse type: a size in MiB > 0 (the ``--max-*-mb`` limit flags)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MiB > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a size in MiB > 0, got {text}")
    return value


def _shape_item(text: str) -> tuple[str, int]:
    """argparse type of ``--shape SYM=N``: a symbol name and an integer >= 1."""
    sym, sep, val = text.partition("=")
    sym, val = sym.strip(), val.strip()
    if not sep or not sym or not (sym[0].isalpha() or sym[0] == "_") or not val.isdigit():
        raise argparse.ArgumentTypeError(f"expected SYMBOL=N with N an integer >= 1 (e.g. --shape N=1), "
                                         f"got {text!r}")
    if int(val) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a dim's value must be >= 1")
    return sym, int(val)


def _limit_arguments(p: argparse.ArgumentParser, fields: Sequence[str]) -> None:
    """The ``--max-*`` flags of the given :class:`kiln.runtime.limits.Limits` fields (defaults shown)."""
    from kiln.runtime.limits import DEFAULT_LIMITS, Limits, MiB

    for field in fields:
        flag = Limits.FLAGS[field]
        default = getattr(DEFAULT_LIMITS, field)
        if field == "zip_ratio":
            p.add_argument(flag, type=_positive_int, default=None, metavar="N",
                           help=f"limit {field} (default {default})")
        else:
            p.add_argument(flag, type=_positive_mb, default=None, metavar="MB",
                           help=f"limit {field} in MiB (default {default // MiB})")


def _limits(args: argparse.Namespace):
    """The Limits of the command's ``--max-*`` flags (defaults where a flag is absent or not given)."""
    import dataclasses

    from kiln.runtime.limits import DEFAULT_LIMITS, Limits, MiB

    given = {}
    for field, flag in Limits.FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            given[field] = int(value) if field == "zip_ratio" else int(value * MiB)
    return dataclasses.replace(DEFAULT_LIMITS, **given)


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, flag: str, inputs: Sequence[str | None] = (), others: Sequence[str | None] = ()) -> None:
    """Refuse an output path before any work: the same file as an input (data loss), the same as another
    output of the command, a folder, or in a folder that is missing or not writable (tried, not guessed)."""
    out = Path(path)
    if out.is_dir():
        raise CliError(f"{flag} {path}: is a folder; give a file path")
    folder = Path(os.path.abspath(out)).parent
    if not folder.is_dir():
        raise CliError(f"{flag} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kiln-write-check-"):
            pass
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot write in folder {folder}: {e.strerror or e}") from None
    for src in inputs:
        if src and os.path.exists(src) and not os.path.isdir(src) and _same_file(path, src):
            raise CliError(f"{flag} {path} is the input {src}: writing it would destroy the input; "
                           f"choose another output path")
    for other in others:
        if other and os.path.realpath(other) == os.path.realpath(path):
            raise CliError(f"{flag} {path} is also another output of this command; give each output its own path")


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
    """``dtype[d0,d1]`` as table cell text (escaped: ``[batch_size,seq_len]`` is not markup)."""
    return escape(f"{t.dtype}[{','.join(str(d) for d in t.shape)}]")


# ------------------------------------------------------------------ inspect

ARTIFACT_LIMITS = ("member_bytes", "artifact_bytes", "zip_ratio", "tensor_bytes")


def _trust_arguments(p: argparse.ArgumentParser) -> None:
    """``--trust KEY.pub`` (repeatable) and ``--allow-unsigned``, for every command that loads an artifact."""
    p.add_argument("--trust", action="append", default=[], metavar="KEY.pub",
                   help="trust artifacts signed by this public key (repeatable; also $KILN_TRUSTED_KEYS and "
                        "your local key)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="load an unsigned or untrusted artifact anyway (it holds native code: only for files "
                        "you trust)")


def _load_options(args: argparse.Namespace) -> dict:
    """``kiln.load`` / ``read_artifact`` keyword arguments of the trust and limit flags."""
    return {"trusted_keys": list(args.trust), "allow_unsigned": args.allow_unsigned, "limits": _limits(args)}


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new Ed25519 key pair for ``kiln compile --sign`` (private, 0600) and ``--trust`` (public)."""
    from kiln.runtime.signing import generate_keypair

    key, pub, kid = generate_keypair(args.output)
    console.print(f"wrote {key} (private, mode 0600: keep it secret) and {pub} (public), key id {kid}",
                  markup=False)
    console.print(f"sign: kiln compile MODEL --sign {key}    trust: kiln run A.kiln --trust {pub}", markup=False)
    return 0


def inspect_artifact(path: str, show_ir: bool, options: dict | None = None) -> int:
    """An artifact's manifest: signature, target, pipeline, and the kernel list with each kernel's ops."""
    from kiln.runtime.artifact import read_artifact

    art = read_artifact(path, **(options or {}))
    m = art.manifest
    tgt = m.get("target", {})
    console.print(f"[bold]{escape(str(path))}[/]  model [cyan]{escape(str(m.get('model', '?')))}[/]  "
                  + escape(f"kiln {m.get('kiln_version')}, TVM {m.get('tvm_version')}, target "
                           f"{tgt.get('kind', '?')} -mcpu={tgt.get('mcpu', '?')}"))
    console.print(f"pipeline: {m.get('pipeline')}", markup=False)
    if art.trust is not None:
        console.print(f"signed: {art.trust.describe()}", markup=False)
    sig = Table(title="signature", title_justify="left")
    for col in ("kind", "name", "dtype:shape"):
        sig.add_column(col)
    params = set(m.get("params") or [])
    for kind, key in (("input", "inputs"), ("output", "outputs")):
        for spec in m[key]:
            label = "weight input" if spec["name"] in params else kind
            sig.add_row(label, escape(str(spec["name"])),
                        escape(f"{spec['dtype']}[{','.join(str(d) for d in spec['shape'])}]"))
    console.print(sig)
    kernels = Table(title=f"kernels ({len(m.get('kernels', []))})", title_justify="left")
    for col in ("#", "kernel", "anchor", "kind", "ops"):
        kernels.add_column(col, justify="right" if col == "#" else "left")
    for i, k in enumerate(m.get("kernels", [])):
        kernels.add_row(*(escape(str(c)) for c in (i, k["name"], k.get("op", "?"), k.get("kind", "?"),
                                                    " ".join(k.get("ops", [])))))
    console.print(kernels)
    n_weights = sum(int(a.size) for a in art.weights.values())
    console.print(f"weights: {len(art.weights)} arrays ({n_weights:,} elements), library {len(art.library):,} bytes")
    if show_ir:
        sys.stdout.write(_printable(art.ir_text))
    return 0


def _printable(text: str) -> str:
    """``text`` with control characters other than newline and tab shown as ``\\xNN``: a file's text must
    not drive the terminal (escape sequences can retitle it, hide output or fake a prompt)."""
    return "".join(c if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160) else f"\\x{ord(c):02x}"
                   for c in text)


def cmd_inspect(args: argparse.Namespace) -> int:
    from kiln import ir
    from kiln.frontend import lift

    if args.model.endswith(".kiln") and Path(args.model).exists():
        return inspect_artifact(args.model, args.ir, _load_options(args))
    if args.model.endswith(".ir") and Path(args.model).exists():
        graph = ir.verify(ir.parse(Path(args.model).read_text()))
        model = None
    else:
        model = load_onnx(args.model)
        graph = lift(model, limits=_limits(args))
    console.print(f"[bold]{escape(args.model)}[/]  graph [cyan]{escape(graph.name)}[/]")
    if model is not None:
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        console.print(f"opset: {opsets}   producer: {model.producer_name or '?'} {model.producer_version}",
                      markup=False)
    sig = Table(title="signature", title_justify="left")
    sig.add_column("kind")
    sig.add_column("name")
    sig.add_column("dtype:shape")
    for v in graph.inputs:
        sig.add_row("input", escape(v.name), _shape(v.type))
    for v in graph.outputs:
        sig.add_row("output", escape(v.name), _shape(v.type))
    console.print(sig)

    counts = Table(title="ops", title_justify="left")
    counts.add_column("kiln op")
    counts.add_column("count", justify="right")
    for op, n in sorted(graph.op_counts().items(), key=lambda kv: (-kv[1], kv[0])):
        counts.add_row(escape(op), str(n))
    counts.add_row("[bold]total[/]", f"[bold]{len(graph.nodes)}[/]")
    if model is not None:
        onnx_counts: dict[str, int] = {}
        for n in model.graph.node:
            onnx_counts[n.op_type] = onnx_counts.get(n.op_type, 0) + 1
        ot = Table(title="ONNX ops (before lifting)", title_justify="left")
        ot.add_column("ONNX op")
        ot.add_column("count", justify="right")
        for op, n in sorted(onnx_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ot.add_row(escape(op), str(n))
        ot.add_row("[bold]total[/]", f"[bold]{len(model.graph.node)}[/]")
        console.print(ot)
    console.print(counts)
    n_params = sum(int(v.const.size) for v in graph.constants.values())
    console.print(f"constants: {len(graph.constants)} ({n_params:,} elements)")
    if args.ir:
        text = ir.print_graph(graph, elide_constants=not args.full)
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------ opt

def _instruments(args: argparse.Namespace, graph=None):
    """The pass-manager instruments the flags ask for (``--dump-ir``, ``--check-each-pass``, ``--inputs``)."""
    from kiln.passes.manager import Instruments

    feeds = _read_npz(args.inputs, "--inputs", _limits(args)) if getattr(args, "inputs", None) else None
    if feeds is not None and graph is not None:
        missing = [v.name for v in graph.inputs if v.name not in feeds]
        if missing:
            raise CliError(f"--inputs {args.inputs}: no array for graph inputs {missing}")
    return Instruments(dump_ir=Path(args.dump_ir) if args.dump_ir else None,
                       check_each_pass=args.check_each_pass or feeds is not None, check_inputs=feeds)


def _read_npz(path: str, flag: str, limits=None) -> dict:
    """The arrays of the ``.npz`` a flag names; a file that is not one is an error naming the flag and file
    (:func:`kiln.passes.calibrate.read_npz`: headers checked first, nothing unpickled)."""
    from kiln.passes.calibrate import read_npz

    return read_npz(path, flag, limits, error=InputError)


def print_pass_table(records, title: str, explain: bool = False) -> None:
    """The per-pass table (time, nodes, op-count delta, rewrites, refusals, max error) and, with explain, why."""
    checked = any(r.max_error is not None for r in records)
    table = Table(title=title, title_justify="left")
    for col in ("#", "pass", "time ms", "nodes", "op delta", "rewrites", "refused") + (("max rel err",) if checked else ()):
        table.add_column(col, justify="left" if col in ("pass", "op delta") else "right")
    for i, r in enumerate(records, 1):
        row = [str(i), escape(r.name), f"{r.seconds * 1e3:.1f}", f"{r.nodes_before} -> {r.nodes_after}",
               escape(r.delta_text), str(len(r.log.rewrites)), str(len(r.log.refusals))]
        if checked:
            row.append("-" if r.max_error is None else f"{r.max_error:.2e}")
        table.add_row(*row)
    console.print(table)
    if not explain:
        return
    for r in records:
        for at, what in r.log.rewrites:
            console.print(f"[green]rewrote[/] {escape(f'{r.name} at %{at}: {what}')}", soft_wrap=True)
        for ref in r.log.refusals:
            console.print(f"[yellow]refused[/] {escape(f'{r.name} at %{ref.at}: {ref.reason}')}", soft_wrap=True)


def cmd_opt(args: argparse.Namespace) -> int:
    """Run a pass pipeline on a model, print the per-pass table, write the rewritten graph as ONNX or IR."""
    from kiln import ir
    from kiln.frontend import lift, lower_to_onnx
    from kiln.passes.manager import DEFAULT_PIPELINE, run_pipeline_report

    if args.output:
        check_output(args.output, "-o", [args.model, args.inputs])
    if args.model.endswith(".ir") and Path(args.model).exists():
        graph = ir.verify(ir.parse(Path(args.model).read_text()))
    else:
        graph = lift(load_onnx(args.model), params_as_inputs=args.params_as_inputs, limits=_limits(args))
    result = run_pipeline_report(graph, args.passes or DEFAULT_PIPELINE, _instruments(args, graph))
    print_pass_table(result.records, f"kiln opt: {escape(args.model)}", explain=args.explain)
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            if out.suffix == ".ir":
                tmp.write_text(ir.print_graph(result.graph))
            else:
                import onnx

                onnx.save(lower_to_onnx(result.graph), tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        console.print(f"wrote {out}", markup=False)
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    """List the registered passes with their options (defaults) and what each does."""
    import dataclasses

    from kiln.passes.manager import DEFAULT_PIPELINE, registered_passes

    table = Table(title=f"passes (default pipeline: {DEFAULT_PIPELINE})", title_justify="left")
    for col in ("pass", "options", "what"):
        table.add_column(col)
    for name, cls in sorted(registered_passes().items()):
        if cls.__module__.startswith("tests."):
            continue
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        table.add_row(name, opts or "-", (cls.__doc__ or "").strip().splitlines()[0])
    console.print(table)
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
    if not args.no_compile:
        _demo_compile("gpt")
    return 0


def _demo_compile(name: str) -> None:
    """Compile a zoo model into an artifact, load it, check it against the interpreter, time it vs ORT and torch."""
    import tempfile

    import numpy as np

    import kiln
    from kiln import ir, zoo
    from kiln.bench import _ort_session, _zoo_case, median_latency
    from kiln.codegen.target import configure_threads
    from kiln.frontend import lift

    threads = configure_threads(2)
    proto, feeds, run_torch = _zoo_case(name, threads)
    with tempfile.TemporaryDirectory(prefix="kiln-demo-") as d:
        path = os.path.join(d, f"{name}.kiln")
        t0 = time.perf_counter()
        art = kiln.compile(name)
        art.save(path)
        compile_s = time.perf_counter() - t0
        sess = kiln.load(path)
        size = os.path.getsize(path)
    outs = sess.run(feeds)
    ref = ir.interpret(lift(zoo.onnx_model(name)), feeds)
    err = max(float(np.max(np.abs(outs[k].astype(np.float64) - ref[k]))) for k in outs)
    ort_sess = _ort_session(proto, threads)
    lat = {"kiln": median_latency(lambda: sess.run(feeds), 20, min_time=0.5),
           "ONNX Runtime": median_latency(lambda: ort_sess.run(None, feeds), 20, min_time=0.5),
           "PyTorch eager": median_latency(run_torch, 20, min_time=0.5)}
    table = Table(title=f"kiln demo: zoo {name} compiled ahead of time ({art.stats['kernels']} kernels, "
                        f"{compile_s:.1f} s, {size / 1e6:.1f} MB artifact; max |kiln - interpreter| {err:.1e})",
                  title_justify="left")
    for col in ("engine", "median latency ms", "vs kiln"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for engine, t in lat.items():
        table.add_row(engine, f"{t * 1e3:.2f}", f"{t / lat['kiln']:.2f}x")
    console.print(table)
    if err > 1e-3:
        raise CliError(f"compiled {name} disagrees with the interpreter by {err:.3g}")


# ------------------------------------------------------------------ quantize

def _quant_flags_given(args: argparse.Namespace) -> bool:
    """Whether any quantization flag differs from its default (``kiln compile`` quantizes only then)."""
    from kiln.passes.quantize import QuantizeOptions

    d = QuantizeOptions()
    return (args.scheme != d.scheme or args.method != d.method or args.reparam != d.reparam
            or args.weights != d.weights or bool(args.exclude) or args.error_budget is not None
            or args.samples != d.samples or args.seed != d.seed or args.group_size != d.group_size
            or args.alpha != d.alpha or args.softmax != d.softmax or bool(args.report))


def _quantize_options(args: argparse.Namespace):
    """The QuantizeOptions of the command's flags; a bad combination is a one-line error."""
    from kiln.passes.quantize import QuantizeError, QuantizeOptions

    try:
        return QuantizeOptions(scheme=args.scheme, method=args.method, reparam=args.reparam, weights=args.weights,
                               exclude=tuple(args.exclude or ()), error_budget=args.error_budget,
                               samples=args.samples, seed=args.seed, group_size=args.group_size, alpha=args.alpha,
                               softmax=args.softmax)
    except QuantizeError as e:
        raise CliError(str(e)) from e


def _quant_summary(cal: dict) -> str:
    what = cal["weights"] if cal.get("weights") else cal["method"]
    return (f"{cal['scheme']} ({what}, reparam {cal['reparam']}), calibration seed {cal['seed']}, "
            f"{len(cal['samples'])} samples")


def print_quant_report(report) -> None:
    """The per-layer table (five worst highlighted), the outputs' SQNR and what the fallback kept in float."""
    for table in report.tables():
        console.print(table)
    for note in report.notes:
        err_console.print(f"[yellow]note[/]: {escape(str(note))}")


def write_json(path: str, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder, then rename it into place."""
    import json

    out = Path(path)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a model on calibration data and write it as QDQ ONNX (opset 21); print the error report."""
    import onnx
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from kiln.frontend import lower_to_onnx
    from kiln.passes.quantize import quantize

    if not Path(args.model).exists() and args.model not in _zoo_names():
        raise CliError(f"{args.model!r}: no such file, and not a zoo model ({', '.join(_zoo_names())})")
    options = _quantize_options(args)
    check_output(args.output, "-o", [args.model, args.calib])
    if args.report:
        check_output(args.report, "--report", [args.model, args.calib], [args.output])
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as progress:
        task = progress.add_task("lifting the model", total=None)

        def report(stage: str, done: int, total: int) -> None:
            progress.update(task, description=f"{stage}: calibration samples", completed=done, total=total)

        result = quantize(args.model, args.calib, options, progress=report, limits=_limits(args))
        progress.update(task, description="writing ONNX", completed=0, total=None)
        model = lower_to_onnx(result.graph, opset=21)
        out = Path(args.output)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            onnx.save(model, tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    print_quant_report(result.report)
    if args.report:
        write_json(args.report, result.report.to_json())
    if options.error_budget is not None and not result.report.budget_met:
        err_console.print(f"[yellow]warning[/]: the outputs' SQNR {result.report.output_sqnr_db:.1f} dB misses "
                          f"the error budget {options.error_budget:g} dB even with every listed layer in float")
    console.print(f"wrote {out}" + (f" and {args.report}" if args.report else ""), markup=False)
    return 0


# ------------------------------------------------------------------ compile / run / bench

def _parse_shapes(items: Sequence[tuple[str, int]] | None) -> dict[str, int]:
    """``--shape`` items (parsed by :func:`_shape_item`) as a dict; one symbol given two values is an error.
    A symbol the model does not have is refused by ``kiln.compile`` (exit 1), a static model included."""
    shapes: dict[str, int] = {}
    for sym, val in items or ():
        if shapes.get(sym, val) != val:
            raise CliError(f"--shape {sym}={val}: {sym} was already given as {shapes[sym]}")
        shapes[sym] = val
    return shapes


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a model (ONNX file or zoo name) into one artifact file."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import kiln
    from kiln.compiler import CompileError

    if not Path(args.model).exists() and args.model not in _zoo_names():
        raise CliError(f"{args.model!r}: no such file, and not a zoo model ({', '.join(_zoo_names())})")
    out = args.output or (Path(args.model).stem if Path(args.model).exists() else args.model) + ".kiln"
    qopts = _quantize_options(args) if args.calib or _quant_flags_given(args) else None
    if qopts is not None and not args.calib:
        raise CliError("quantization flags (--scheme, --method, --seed, --report, ...) need --calib "
                       "DIR_OF_NPZ|FILE.npz: kiln compile quantizes only with calibration data")
    sources = [args.model, args.calib, getattr(args, "inputs", None)]
    params_out = str(Path(out).with_suffix("")) + ".params.npz"
    check_output(out, "-o" if args.output else "the output", sources)
    if args.report:
        check_output(args.report, "--report", sources, [out])
    if args.params_as_inputs:
        check_output(params_out, "the weights file", sources, [out, args.report])
    if args.bundle and Path(args.bundle).exists() and (not Path(args.bundle).is_dir() or any(Path(args.bundle).iterdir())):
        raise CliError(f"--bundle {args.bundle}: exists and is not an empty folder; choose a new one")
    shapes = _parse_shapes(args.shape)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("lifting and running passes", total=None)

        def report(stage: str, done: int, total: int) -> None:
            if stage.startswith("calibrate:"):
                desc = f"quantizing: {stage.partition(':')[2]} (calibration samples)"
            else:
                desc = {"lower": "lowering + scheduling kernels", "tune": "MetaSchedule tuning kernels"}.get(
                    stage, "LLVM code generation")
            progress.update(task, description=desc, completed=done, total=total)

        try:
            art = kiln.compile(args.model, passes=args.passes, target=args.target, shapes=shapes,
                               tune=args.tune, tune_db=args.tune_db, params_as_inputs=args.params_as_inputs,
                               instruments=_instruments(args), progress=report, quantize=qopts,
                               calibration=args.calib, limits=_limits(args),
                               sign=args.sign if args.sign else True)
        except CompileError as e:
            raise CliError(str(e)) from e
        progress.update(task, description="writing artifact")
        art.save(out)
        if args.bundle:
            from kiln.bundle import write_bundle

            progress.update(task, description="writing the C++ bundle (building the runtime on first use)")
            write_bundle(out, args.bundle)
        if art.params:
            _write_npz(params_out, art.params)
    st = art.stats
    if st.get("quantize") is not None:
        print_quant_report(st["quantize"])
        if args.report:
            write_json(args.report, st["quantize"].to_json())
    if args.explain or args.check_each_pass:
        print_pass_table(st["passes"], "passes", explain=args.explain)
    table = Table(title=escape(f"kiln compile: {st['model']} -> {out}"), title_justify="left")
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    tgt = st["target"]
    for key, val in [("target", f"{tgt['kind']} -mcpu={tgt['mcpu']} ({tgt['num-cores']} cores, {tgt['vector-width']}-bit)"),
                     ("pipeline", art.manifest["pipeline"]),
                     *([("quantized", _quant_summary(art.manifest["calibration"]))] if art.manifest.get("calibration") else []),
                     ("graph nodes", str(st["nodes"])),
                     ("kernels generated", f"{st['kernels']} ({st['unique_kernels']} distinct)"),
                     ("compile time", f"{st['compile_s']:.1f} s (LLVM {st['llvm_s']:.1f} s)"),
                     ("artifact size", f"{st['artifact_bytes'] / 1e6:.2f} MB (weights {st['weights_bytes'] / 1e6:.2f} MB, "
                                       f"library {st['library_bytes'] / 1e6:.2f} MB)")]:
        table.add_row(key, escape(val))
    console.print(table)
    if args.bundle:
        console.print(f"C++ bundle written to {args.bundle} (see {Path(args.bundle) / 'README.txt'})", markup=False)
    if art.params:
        console.print(f"weights are inputs ({len(art.params)}): initial values written to {params_out} "
                      f"(kiln run {out} --params {params_out})", markup=False)
    for note in st["notes"]:
        err_console.print(f"[yellow]note[/]: {escape(str(note))}")
    return 0


def _random_inputs(sess) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in sess.inputs:
        shape = [d if isinstance(d, int) else sess.manifest["symbols"][d] for d in spec["shape"]]
        dt = np.dtype(spec["dtype"])
        feeds[spec["name"]] = (rng.integers(0, 8, shape).astype(dt) if dt.kind in "iu"
                               else rng.standard_normal(shape).astype(dt))
    return feeds


def _write_npz(path: str, arrays: dict) -> None:
    """Write arrays to ``path`` through a temporary file in its folder, so a failed or interrupted write
    leaves nothing half-written (and no temporary file)."""
    import numpy as np

    tmp = f"{path}.{os.getpid()}.tmp.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_run(args: argparse.Namespace) -> int:
    """Load an artifact, run it on the given (or random) inputs, print a summary of the outputs."""
    import numpy as np

    from kiln.runtime import load

    if args.out:
        check_output(args.out, "--out", [args.artifact, args.inputs, args.params])
    sess = load(args.artifact, **_load_options(args))
    params = _read_npz(args.params, "--params", _limits(args)) if args.params else {}
    if args.inputs:
        feeds = _read_npz(args.inputs, "--inputs", _limits(args))
    else:
        feeds = {k: v for k, v in _random_inputs(sess).items() if k not in params}
        err_console.print("no --inputs given: running on seeded random inputs")
    feeds.update(params)
    outs = sess.run(feeds)
    table = Table(title=f"kiln run: {escape(args.artifact)}", title_justify="left")
    for col in ("output", "dtype", "shape", "min", "max", "mean"):
        table.add_column(col, justify="left" if col in ("output", "dtype") else "right")
    for name, a in outs.items():
        num = a.size and a.dtype.kind in "fiub"
        table.add_row(escape(name), str(a.dtype), escape(str(list(a.shape))),
                      *(f"{float(f(a)):.4g}" if num else "-" for f in (np.min, np.max, np.mean)))
    console.print(table)
    if args.out:
        _write_npz(args.out, outs)
        console.print(f"outputs written to {args.out}", markup=False)
    if args.repeat:
        times = np.array(sess.benchmark(feeds, repeat=args.repeat)) * 1e3
        console.print(f"latency over {args.repeat} runs: median {np.median(times):.3f} ms, "
                      f"min {times.min():.3f} ms, max {times.max():.3f} ms")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.run(args)


def cmd_conformance(args: argparse.Namespace) -> int:
    from . import conformance

    return conformance.run_cli(args)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from kiln.fuzz.cli import run

    return run(args)


# ------------------------------------------------------------------ entry point

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: an ahead-of-time compiler for neural-network graphs")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="show a model's signature, op counts and (with --ir) its kiln IR")
    ins.add_argument("model", help="an .onnx file, a kiln .ir file, a compiled .kiln artifact, or a zoo model name")
    ins.add_argument("--ir", action="store_true", help="print the kiln IR text")
    ins.add_argument("--full", action="store_true", help="with --ir: print every constant's data, not just small ones")
    _limit_arguments(ins, ["constant_bytes"])
    _limit_arguments(ins, ARTIFACT_LIMITS)
    _trust_arguments(ins)
    ins.set_defaults(func=cmd_inspect)
    qz = sub.add_parser("quantize", help="quantize a model on calibration data; write QDQ ONNX and an error report")
    qz.add_argument("model", help="an .onnx file or a zoo model name")
    qz.add_argument("-o", "--output", required=True, help="the quantized model (.onnx, opset 21 QDQ)")
    _quant_arguments(qz, calib_required=True)
    _limit_arguments(qz, ["constant_bytes"])
    qz.set_defaults(func=cmd_quantize)
    demo = sub.add_parser("demo", help="run the main job on the built-in example model zoo")
    demo.add_argument("models", nargs="*", help="zoo model names (default: all)")
    demo.add_argument("--no-compile", action="store_true", help="skip compiling and timing the zoo GPT")
    demo.set_defaults(func=cmd_demo)
    opt = sub.add_parser("opt", help="run a pass pipeline on a model and write the rewritten graph")
    opt.add_argument("model", help="an .onnx file, a kiln .ir file, or a zoo model name")
    opt.add_argument("--passes", default=None, help="pass pipeline, e.g. 'canonicalize,fold-conv-bn,dce'")
    opt.add_argument("-o", "--output", help="write the result: .onnx (default) or .ir (kiln IR text)")
    opt.add_argument("--inputs", help=".npz of inputs for the per-pass check (implies --check-each-pass)")
    _pass_arguments(opt)
    _limit_arguments(opt, ["constant_bytes", "tensor_bytes"])
    opt.set_defaults(func=cmd_opt)

    sub.add_parser("passes", help="list the passes a pipeline may name, with their options").set_defaults(
        func=cmd_passes)

    comp = sub.add_parser("compile", help="compile a model ahead of time into one artifact file")
    comp.add_argument("model", help="an .onnx file or a zoo model name")
    comp.add_argument("-o", "--output", help="artifact path (default: <model>.kiln)")
    comp.add_argument("--passes", default=None, help="pass pipeline, e.g. 'canonicalize,dce'")
    comp.add_argument("--target", default=None, help="TVM target, e.g. 'llvm -mcpu=znver2' (default: this CPU)")
    comp.add_argument("--shape", action="append", type=_shape_item, metavar="SYM=N",
                      help="value (>= 1) of one of the model's symbolic dims (repeatable)")
    _pass_arguments(comp)
    comp.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                      help="MetaSchedule-tune each distinct kernel with TRIALS candidates (default: off)")
    comp.add_argument("--tune-db", default=None, metavar="DIR",
                      help="tuning database, reused across compiles (default: $KILN_TUNING_DB or ~/.cache/kiln/tuning)")
    _quant_arguments(comp, calib_required=False)
    _limit_arguments(comp, ["constant_bytes"])
    comp.add_argument("--sign", metavar="KEY", default=None,
                      help="sign the artifact with this Ed25519 private key (PEM, from kiln keygen; default: your "
                           "local key $KILN_HOME/signing.key, created on first use)")
    comp.add_argument("--bundle", metavar="DIR", default=None,
                      help="also write DIR: the artifact, kiln's C++ runtime library and its TVM libraries, the "
                           "header, the example main.cpp and a CMakeLists.txt that builds it (C++ compiler + CMake)")
    comp.set_defaults(func=cmd_compile)
    run = sub.add_parser("run", help="run a compiled artifact")
    run.add_argument("artifact", help="a .kiln file from kiln compile")
    run.add_argument("--inputs", help=".npz with one array per input name (default: seeded random inputs)")
    run.add_argument("--params", help=".npz of weights for an artifact compiled with --params-as-inputs")
    run.add_argument("--out", help="write the outputs to this .npz")
    run.add_argument("--repeat", type=_positive_int, default=None, metavar="N",
                     help="also time N (>= 1) runs and print median/min/max latency")
    _trust_arguments(run)
    _limit_arguments(run, ARTIFACT_LIMITS)
    run.set_defaults(func=cmd_run)
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair to sign artifacts (--sign) and trust them "
                                           "(--trust)")
    keygen.add_argument("-o", "--output", default="kiln-signing", metavar="PREFIX",
                        help="write PREFIX.key (private) and PREFIX.pub (public); never overwrites "
                             "(default: kiln-signing)")
    keygen.set_defaults(func=cmd_keygen)
    from .bench import add_arguments
    bench = sub.add_parser("bench", help="latency of kiln vs ONNX Runtime, PyTorch and TVM on the zoo")
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    from .conformance import add_arguments as conformance_arguments
    conf = sub.add_parser("conformance", help="run ONNX's node conformance suite through the interpreter or "
                                              "the compiled path; per-op pass/refused/wrong/crashed")
    conformance_arguments(conf)
    conf.set_defaults(func=cmd_conformance)
    from kiln.fuzz.cli import add_arguments as fuzz_arguments
    fuzz = sub.add_parser("fuzz", help="fuzz the compiler: graphs + pass pipelines, TIR + TVM pass sequences")
    fuzz_arguments(fuzz)
    fuzz.set_defaults(func=cmd_fuzz)
    return p


def _quant_arguments(p: argparse.ArgumentParser, calib_required: bool) -> None:
    """The quantization flags that ``quantize`` and ``compile`` share (see kiln.passes.quantize)."""
    from kiln.passes.quantize import METHODS, REPARAMS, SCHEMES, WEIGHT_METHODS, QuantizeOptions

    d = QuantizeOptions()
    g = p.add_argument_group("quantization" + ("" if calib_required else " (quantize before compiling when "
                                                                           "--calib is given)"))
    g.add_argument("--calib", required=calib_required, metavar="DIR|FILE.npz",
                   help="calibration data: a directory of .npz (one sample each) or one .npz with a sample axis")
    g.add_argument("--scheme", choices=SCHEMES, default=d.scheme, help=f"(default {d.scheme})")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help=f"activation range calibration, w8a8 (default {d.method})")
    g.add_argument("--reparam", choices=REPARAMS, default=d.reparam,
                   help=f"scale reparameterization before w8a8 (default {d.reparam})")
    g.add_argument("--weights", choices=WEIGHT_METHODS, default=d.weights,
                   help=f"weight quantizer for w4a16/w8a16 (default {d.weights})")
    g.add_argument("--exclude", nargs="+", action="extend", metavar="NODE", default=[],
                   help="layers to keep in float (node or output names, as in the report)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the calibration draw (default {d.seed})")
    g.add_argument("--samples", type=int, default=d.samples,
                   help=f"calibration samples drawn (default {d.samples}; 0 = all)")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help=f"weight-only quantization group along the input axis (default {d.group_size}; 0 = per "
                        f"output channel)")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"SmoothQuant migration strength (default {d.alpha})")
    g.add_argument("--softmax", choices=("uniform", "log2"), default=d.softmax,
                   help="quantizer of softmax outputs read by a matmul: int8 uniform (default) or RepQ-ViT's "
                        "log-sqrt2 quantizer")
    g.add_argument("--error-budget", type=float, default=None, metavar="DB",
                   help="minimum SQNR of every output: keep the worst layers in float until it is met")
    g.add_argument("--report", metavar="R.json", help="write the quantization report as JSON")


def _pass_arguments(p: argparse.ArgumentParser) -> None:
    """The pass-manager flags that ``opt`` and ``compile`` share."""
    p.add_argument("--explain", action="store_true", help="print every rewrite and every refused match with its reason")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass as DIR/NNN_<pass>.ir")
    p.add_argument("--check-each-pass", action="store_true",
                   help="run the interpreter after every pass and stop at the first pass that changes the outputs")
    p.add_argument("--params-as-inputs", action="store_true",
                   help="lift the weights as graph inputs (fed at run time) instead of constants")


class _SigintFlag:
    """Set by the CLI's SIGINT handler: an error that follows a Ctrl-C is the interruption, whatever its
    type (TVM wraps a KeyboardInterrupt in its own error; torch's exporter in an AttributeError)."""

    seen = False


def _on_sigint(signum: int, frame: object) -> None:
    _SigintFlag.seen = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit 0 ok, 1 error, 2 usage (argparse), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("KILN_DEBUG"))
    _SigintFlag.seen = False
    handler = _install_sigint()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, or the traceback with --debug
        if _SigintFlag.seen or caused_by_interrupt(e):
            err_console.print("interrupted", markup=False)
            return 130
        if debug:
            raise
        err_console.print(f"[red]error:[/] {escape(_one_line(e))}")
        return 1
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def _install_sigint():
    """Install :func:`_on_sigint` (main thread only); the previous handler, to restore, or None."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:  # started with SIGINT ignored (nohup, `cmd &`): keep it so
        return None
    signal.signal(signal.SIGINT, _on_sigint)
    return previous


def _one_line(e: BaseException) -> str:
    """The error as one line: a kiln error's or OS error's message as is; anything else is a kiln bug."""
    msg = str(e) if not isinstance(e, KeyError) else str(e.args[0]) if e.args else repr(e)
    if isinstance(e, Error):
        return msg
    if isinstance(e, OSError):
        return msg or type(e).__name__
    if isinstance(e, MemoryError):
        return f"out of memory ({msg or 'MemoryError'}); lower the --max-*-mb limits or give a smaller input"
    first = next((ln for ln in msg.splitlines() if ln.strip()), "")[:300]
    return (f"internal error, a kiln bug ({type(e).__name__}: {first}); please report it with the "
            f"traceback of --debug")


if __name__ == "__main__":
    sys.exit(main())
