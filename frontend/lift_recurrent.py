"""ONNX converters for recurrent layers, control flow and random ops.

Recurrent layers (RNN, GRU, LSTM)
---------------------------------
Unrolled over the static sequence length into kiln's ordinary ops, so the fast
kernels apply and structurally equal steps compile to one kernel each: the input
projection of every step is one ``matmul`` of the whole sequence (``X @ W^T + Wb + Rb``),
then each step adds ``H_{t-1} @ R^T``, splits the gates and applies the activations.
Every ONNX feature is expressed: all directions, ``layout`` 0/1, initial states
(absent means zero: the first step then skips its recurrent matmul, so a symbolic
batch needs no zeros tensor), LSTM peepholes and ``input_forget``, GRU
``linear_before_reset``, ``clip`` (on every gate's pre-activation) and all ONNX
activation functions with ``activation_alpha``/``activation_beta`` (consumed in
order by the activations that take them, as onnxruntime reads them).
``sequence_lens`` may be absent, constant or computed: a step ``t`` past a batch
entry's length keeps its state and writes zeros to ``Y``, selected with ``where``
on ``t < sequence_lens`` (folded away when the lengths are constant and full); an
entry of length 0 ends with zero states, as in onnxruntime (ONNX leaves it open).
Sequences longer than ``MAX_RNN_STEPS`` are refused (the unrolled graph grows with it).

Unrolled rather than one loop-kernel op: measured (one thread, input 64, hidden 128, 16
steps, float32) the compiled layer has 8 unique kernels (4 calls per step) and runs at
2.1-2.5x onnxruntime's time at batch 8 and 5.6-6.2x at batch 1 (LSTM and GRU, max error
3e-7): the per-call cost of the small per-step kernels dominates, which a kernel holding the
whole recurrence (serial time loop in TIR) would remove.

Control flow
------------
kiln IR has no regions, so subgraphs are lifted inline (``lift_subgraph``): the
body's values get fresh names and its nodes go through the lifter like any
other, reading outer-scope values by name.

* ``If`` with a constant condition lifts the taken branch only. With a computed
  condition both branches are lifted and every output is ``where(cond, then, else)``:
  exact for ONNX's pure graphs (no op has side effects; random ops are refused),
  provided the branches' outputs have equal types (else refused).
* ``Loop`` and ``Scan`` are unrolled when their trip count is constant: Loop's ``M``
  and condition must be constants and the body's condition output must fold to a
  constant each iteration; Scan's sequence axis must be static. At most
  ``MAX_UNROLL`` iterations; everything else is refused with the reason.

Random ops
----------
RandomNormal, RandomUniform, their ``*Like`` forms, Bernoulli and Multinomial are
refused, with or without ``seed``. ONNX leaves the generator to the runtime, so no
values any runtime produces can be reproduced; and onnxruntime's seeded ops are a
stream (each run draws new values from a generator seeded once per session), so
folding one draw into a constant at compile time would change what the model
computes on every run after the first. The refusal says to feed the noise as an
input instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from kiln.ir.graph import Value

from .lift import _Ctx, _node_label, _Refuse, _special

MAX_UNROLL = 256  # Loop / Scan iterations kiln unrolls
MAX_RNN_STEPS = 512  # sequence steps an RNN / GRU / LSTM is unrolled over (lift time grows with it)

# ====================================================================== helpers


def _named(ctx: _Ctx, v: Value, k: int) -> Value:
    """``v`` as node output ``k``: a graph output must carry its ONNX name (an identity renames it)."""
    name = ctx.outs[k] if k < len(ctx.outs) else ""
    if name and name in ctx.lifter.graph_outputs and v.name != name:
        return ctx.op("identity", [v], out=k)
    return v


def _i64(ctx: _Ctx, value: int) -> Value:
    return ctx.const(np.array(value, dtype=np.int64))


def _stack(ctx: _Ctx, vals: Sequence[Value], axis: int, out: int | None = None) -> Value:
    """The values stacked along a new ``axis`` (unsqueeze + concat)."""
    rank = vals[0].type.rank
    ax = axis + rank + 1 if axis < 0 else axis
    if not 0 <= ax <= rank:
        raise _Refuse(f"stacking axis {axis} is out of range for rank-{rank} values")
    if any(v.type != vals[0].type for v in vals):
        kinds = sorted({str(v.type) for v in vals})
        raise _Refuse(f"the values stacked into one output have different types ({', '.join(kinds)})")
    parts = [ctx.op("unsqueeze", [v], {"axes": [ax]}) for v in vals]
    if len(parts) == 1:
        return ctx.op("identity", [parts[0]], out=out) if out is not None else parts[0]
    return ctx.op("concat", parts, {"axis": ax}, out=out)


def _cut(ctx: _Ctx, v: Value, sizes: Sequence[int]) -> list[Value]:
    """``v`` cut along its last axis into parts of ``sizes`` (one ``slice`` each)."""
    if len(sizes) == 1:
        return [v]
    axis, parts, start = v.type.rank - 1, [], 0
    for n in sizes:
        parts.append(ctx.op("slice", [v], {"starts": [start], "ends": [start + n], "axes": [axis]}))
        start += n
    return parts


def _const_scalar(ctx: _Ctx, i: int, what: str) -> np.ndarray | None:
    """Input ``i`` as one constant element (None when absent); a computed one is refused."""
    v = ctx.input(i)
    if v is None:
        return None
    try:
        arr = ctx.const_input(i, what)
    except _Refuse as r:
        err = _Refuse(f"its {what} is computed at run time ({_source(v)}); kiln unrolls control flow and "
                      f"needs it constant", dynamic=True)
        err.inputs = list(getattr(r, "inputs", ()))  # the graph inputs that decide it (specializable)
        raise err from None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise _Refuse(f"its {what} must hold one element, got shape {list(arr.shape)}")
    return arr.reshape(())


def _source(v: Value) -> str:
    return f"graph input {v.name!r}" if v.producer is None else f"%{v.name} = {v.producer.op}(...)"


# ====================================================================== subgraphs

def _defined(gp: onnx.GraphProto) -> list[str]:
    """The names a graph defines itself: inputs, initializers, node outputs."""
    return ([i.name for i in gp.input] + [t.name for t in gp.initializer]
            + [o for n in gp.node for o in n.output if o])


def _rename_refs(gp: onnx.GraphProto, mapping: dict[str, str]) -> onnx.GraphProto:
    """A copy of ``gp`` whose references to outer names in ``mapping`` are renamed (its own names kept)."""
    own = set(_defined(gp))
    m = {k: v for k, v in mapping.items() if k not in own}
    if not m:
        return gp
    out = onnx.GraphProto()
    out.CopyFrom(gp)
    for node in out.node:
        node.input[:] = [m.get(x, x) for x in node.input]
        _rename_attr_graphs(node, m)
    for o in out.output:
        o.name = m.get(o.name, o.name)
    return out


def _rename_attr_graphs(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            a.g.CopyFrom(_rename_refs(a.g, mapping))
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                g.CopyFrom(_rename_refs(g, mapping))


def _referenced(gp: onnx.GraphProto) -> list[str]:
    """Every name the graph's nodes (and nested subgraphs) read, and its outputs."""
    names = [o.name for o in gp.output]
    for node in gp.node:
        names.extend(x for x in node.input if x)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                names.extend(_referenced(g))
    return names


def lift_subgraph(ctx: _Ctx, gp: onnx.GraphProto, bindings: Sequence[Value], what: str) -> list[Value]:
    """Lift ``gp`` inline with its inputs bound to ``bindings``; its outputs' values.

    The subgraph's own names are renamed to fresh ones (so a body lifted once per
    iteration never collides with itself or the outer graph); names it does not
    define are outer-scope values, looked up in the lifter's environment. Its
    nodes' refusals are recorded like any node's, and the subgraph is refused too.
    """
    lifter = ctx.lifter
    if len(bindings) != len(gp.input):
        raise _Refuse(f"its {what} takes {len(gp.input)} inputs, but {len(bindings)} are given")
    base = next((o for o in ctx.outs if o), ctx.node.op_type)
    mapping: dict[str, str] = {}
    for name in _defined(gp):
        if name in mapping:
            raise _Refuse(f"its {what} defines {name!r} twice")
        fresh = lifter.fresh(f"{base}.{what}.{name}")
        lifter.onnx_names.add(fresh)  # reserved: later fresh names and ONNX names avoid it
        mapping[name] = fresh
    nodes = []
    for node in gp.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [mapping.get(x, x) for x in node.input]
        copy.output[:] = [mapping.get(x, x) for x in node.output]
        _rename_attr_graphs(copy, mapping)
        nodes.append(copy)
    renamed = onnx.GraphProto()
    renamed.node.extend(nodes)
    renamed.output.extend(gp.output)
    for o in renamed.output:
        o.name = mapping.get(o.name, o.name)
    lifter.uses.update(lifter._nm(n) for n in _referenced(renamed))
    for vi, v in zip(gp.input, bindings):
        lifter.env[mapping[vi.name]] = v
    for t in gp.initializer:
        arr = lifter._as_kiln_array(onnx.numpy_helper.to_array(t), f"{what} initializer {t.name!r}")
        lifter.env[mapping[t.name]] = ctx.g.add_constant(arr, mapping[t.name])
    for node in nodes:
        for x in node.input:
            if x and lifter._nm(x) not in lifter.env and lifter._nm(x) not in lifter.poisoned:
                raise _Refuse(f"its {what}'s node {_node_label(node)} reads {x!r}, which is not defined "
                              f"before it")
        lifter._node(node)
    outs = []
    for o in renamed.output:
        v = lifter.env.get(lifter._nm(o.name))
        if v is None:
            raise _Refuse(f"its {what} cannot be lifted (output {o.name!r}; see the refusals of its nodes)")
        outs.append(v)
    return outs


# ====================================================================== If

@_special("If", needs=("where", "reshape", "identity"))
def _if(ctx: _Ctx) -> list[Value | None]:
    """The taken branch for a constant condition; else both branches and ``where`` per output."""
    then_g, else_g = ctx.attrs.get("then_branch"), ctx.attrs.get("else_branch")
    if then_g is None or else_g is None:
        raise _Refuse("it needs both then_branch and else_branch")
    n = len(ctx.outs)
    for g, which in ((then_g, "then_branch"), (else_g, "else_branch")):
        if len(g.output) != n:
            raise _Refuse(f"its {which} has {len(g.output)} outputs, the node {n}")
    cond = ctx.x(0)
    if cond.is_const:
        arr = np.asarray(cond.const)
        if arr.size != 1:
            raise _Refuse(f"its condition must hold one element, got shape {list(arr.shape)}")
        taken, which = (then_g, "then") if bool(arr.reshape(-1)[0]) else (else_g, "else")
        outs = lift_subgraph(ctx, taken, [], which)
        return [_named(ctx, v, k) for k, v in enumerate(outs)]
    if cond.type.dtype != "bool":
        raise _Refuse(f"its condition must be bool, got {cond.type}")
    if not cond.type.is_static or int(np.prod(cond.type.shape, dtype=np.int64)) != 1:
        raise _Refuse(f"its condition must be a single element, got {cond.type}")
    then_v = lift_subgraph(ctx, then_g, [], "then")
    else_v = lift_subgraph(ctx, else_g, [], "else")
    if cond.type.rank:
        cond = ctx.op("reshape", [cond], {"shape": []})
    results: list[Value | None] = []
    for k, (a, b) in enumerate(zip(then_v, else_v)):
        if a.type != b.type:
            raise _Refuse(f"its condition is computed at run time and output {k} has type {a.type} in "
                          f"then_branch but {b.type} in else_branch; kiln evaluates both branches and "
                          f"selects with where, which needs equal types")
        results.append(_named(ctx, a, k) if a is b else ctx.op("where", [cond, a, b], out=k))
    return results


# ====================================================================== Loop

@_special("Loop", needs=("unsqueeze", "concat", "identity"))
def _loop(ctx: _Ctx) -> list[Value | None]:
    """Unrolled: M and the condition constant, the body's condition output constant each iteration."""
    body = ctx.attrs.get("body")
    if body is None:
        raise _Refuse("it has no body")
    trip = _const_scalar(ctx, 0, "trip count M")
    cond = _const_scalar(ctx, 1, "condition")
    state = list(ctx.inputs[2:])
    if any(v is None for v in state):
        raise _Refuse("an absent loop-carried input is not supported")
    n_state = len(state)
    n_scan = len(body.output) - 1 - n_state
    if len(body.input) != 2 + n_state or n_scan < 0 or len(ctx.outs) != n_state + n_scan:
        raise _Refuse(f"its body takes {len(body.input)} inputs and gives {len(body.output)} outputs, which "
                      f"do not fit {n_state} loop-carried values and {len(ctx.outs)} node outputs")
    if trip is None and cond is None:
        raise _Refuse("it has neither a trip count nor a condition (an endless loop)")
    trip_n = None if trip is None else int(trip)
    if trip_n is not None and trip_n > MAX_UNROLL:
        raise _Refuse(f"its trip count is {trip_n}; kiln unrolls loops of at most {MAX_UNROLL} iterations")
    running = True if cond is None else bool(cond)
    scans: list[list[Value]] = [[] for _ in range(n_scan)]
    i = 0
    while running and (trip_n is None or i < trip_n):
        if i >= MAX_UNROLL:
            raise _Refuse(f"it runs more than {MAX_UNROLL} iterations; kiln unrolls at most that many")
        flag = ctx.const(np.array(True))
        outs = lift_subgraph(ctx, body, [_i64(ctx, i), flag, *state], f"it{i}")
        c = outs[0]
        if not c.is_const:
            raise _Refuse(f"its body computes the loop condition at run time ({_source(c)}); kiln unrolls "
                          f"only loops whose condition is constant")
        running = bool(np.asarray(c.const).reshape(-1)[0])
        state = outs[1:1 + n_state]
        for k in range(n_scan):
            scans[k].append(outs[1 + n_state + k])
        i += 1
    results: list[Value | None] = [_named(ctx, v, k) for k, v in enumerate(state)]
    for k, vals in enumerate(scans):
        if not vals:
            if ctx.outs[n_state + k]:
                raise _Refuse("it runs zero iterations, so the shape of its scan outputs is unknown")
            results.append(None)
            continue
        results.append(_stack(ctx, vals, 0, out=n_state + k))
    return results


# ====================================================================== Scan

def _scan_run(ctx: _Ctx, body: onnx.GraphProto, state: list[Value], xs: list[Value], axes: list[int],
              dirs: list[int], tag: str) -> tuple[list[Value], list[list[Value]]]:
    """Unroll one scan: the final states and, per scan output, its values in iteration order."""
    lens = set()
    for x, a in zip(xs, axes):
        ax = a + x.type.rank if a < 0 else a
        if not 0 <= ax < x.type.rank:
            raise _Refuse(f"scan axis {a} is out of range for {x.type}")
        d = x.type.shape[ax]
        if not isinstance(d, int):
            raise _Refuse(f"the scanned axis {ax} of {x.type} is symbolic; kiln unrolls Scan and needs it "
                          f"static", dynamic=True)
        lens.add(d)
    if len(lens) != 1:
        raise _Refuse(f"its scan inputs have different lengths {sorted(lens)}")
    steps = lens.pop()
    if steps > MAX_UNROLL:
        raise _Refuse(f"it scans {steps} steps; kiln unrolls at most {MAX_UNROLL}")
    n_out = len(body.output) - len(state)
    outs_per_k: list[list[Value]] = [[] for _ in range(n_out)]
    for t in range(steps):
        slices = [ctx.op("gather", [x, _i64(ctx, steps - 1 - t if d else t)], {"axis": a})
                  for x, a, d in zip(xs, axes, dirs)]
        outs = lift_subgraph(ctx, body, [*state, *slices], f"{tag}{t}")
        state = outs[:len(state)]
        for k in range(n_out):
            outs_per_k[k].append(outs[len(state) + k])
    return state, outs_per_k


@_special("Scan", needs=("gather", "unsqueeze", "concat", "identity"))
def _scan(ctx: _Ctx) -> list[Value | None]:
    """Unrolled over the static scan axis (opset 8: per batch entry, sequence_lens absent or full)."""
    body = ctx.attrs.get("body")
    m = int(ctx.attrs.get("num_scan_inputs", 0))
    if body is None or m < 1:
        raise _Refuse("it needs a body and num_scan_inputs >= 1")
    if ctx.opset < 9:
        return _scan8(ctx, body, m)
    inputs = list(ctx.inputs)
    if any(v is None for v in inputs):
        raise _Refuse("an absent state or scan input is not supported")
    n = len(inputs) - m
    state, xs = inputs[:n], inputs[n:]
    n_out = len(body.output) - n
    if n_out < 0 or len(ctx.outs) != n + n_out:
        raise _Refuse(f"its body gives {len(body.output)} outputs, which do not fit {n} states and "
                      f"{len(ctx.outs)} node outputs")
    axes = list(ctx.attrs.get("scan_input_axes") or [0] * m)
    dirs = list(ctx.attrs.get("scan_input_directions") or [0] * m)
    out_axes = list(ctx.attrs.get("scan_output_axes") or [0] * n_out)
    out_dirs = list(ctx.attrs.get("scan_output_directions") or [0] * n_out)
    if len(axes) != m or len(dirs) != m or len(out_axes) != n_out or len(out_dirs) != n_out:
        raise _Refuse("its scan axes/directions attributes do not match its inputs and outputs")
    final, per_k = _scan_run(ctx, body, state, xs, axes, dirs, "t")
    results: list[Value | None] = [_named(ctx, v, k) for k, v in enumerate(final)]
    for k, vals in enumerate(per_k):
        ordered = vals[::-1] if out_dirs[k] else vals
        results.append(_stack(ctx, ordered, out_axes[k], out=n + k))
    return results


def _scan8(ctx: _Ctx, body: onnx.GraphProto, m: int) -> list[Value | None]:
    """Scan-8: a leading batch axis on states and scan inputs (sequence on axis 1), sequence_lens."""
    lens = ctx.input(0)
    inputs = list(ctx.inputs[1:])
    if any(v is None for v in inputs):
        raise _Refuse("an absent state or scan input is not supported")
    n = len(inputs) - m
    state, xs = inputs[:n], inputs[n:]
    n_out = len(body.output) - n
    if n_out < 0 or len(ctx.outs) != n + n_out:
        raise _Refuse(f"its body gives {len(body.output)} outputs, which do not fit {n} states and "
                      f"{len(ctx.outs)} node outputs")
    dirs = list(ctx.attrs.get("directions") or [0] * m)
    batch = xs[0].type.shape[0]
    if not isinstance(batch, int):
        raise _Refuse(f"Scan-8 over a symbolic batch {xs[0].type} is not supported", dynamic=True)
    if lens is not None:
        steps = xs[0].type.shape[1] if xs[0].type.rank > 1 else None
        arr = ctx.const_input(0, "sequence_lens")
        if not isinstance(steps, int) or not np.all(np.asarray(arr) == steps):
            raise _Refuse("sequence_lens shorter than the scan inputs' sequence axis are not supported")
    finals: list[list[Value]] = [[] for _ in range(n)]
    scans: list[list[Value]] = [[] for _ in range(n_out)]
    for b in range(batch):
        st = [ctx.op("gather", [s, _i64(ctx, b)], {"axis": 0}) for s in state]
        xb = [ctx.op("gather", [x, _i64(ctx, b)], {"axis": 0}) for x in xs]
        final, per_k = _scan_run(ctx, body, st, xb, [0] * m, dirs, f"b{b}t")
        for k, v in enumerate(final):
            finals[k].append(v)
        for k, vals in enumerate(per_k):
            scans[k].append(_stack(ctx, vals, 0))
    results: list[Value | None] = [_stack(ctx, vals, 0, out=k) for k, vals in enumerate(finals)]
    results += [_stack(ctx, vals, 0, out=n + k) for k, vals in enumerate(scans)]
    return results


# ====================================================================== random ops

@_special("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial")
def _random(ctx: _Ctx) -> list[Value | None]:
    seeded = "seed" in ctx.attrs
    raise _Refuse(
        ("its seed is set, but " if seeded else "it has no seed, and even with one ")
        + "kiln compiles deterministic graphs: ONNX leaves the generator to the runtime (no runtime's "
        "values can be reproduced) and onnxruntime draws new values on every run, so freezing one draw "
        "into a constant would change the model; feed the random values as a graph input instead")


# ====================================================================== RNN, GRU, LSTM

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# activation -> (default alpha, default beta); None where it takes no such parameter (onnxruntime's table)
_ACT_PARAMS: dict[str, tuple[float | None, float | None]] = {
    "relu": (None, None), "tanh": (None, None), "sigmoid": (None, None), "softsign": (None, None),
    "softplus": (None, None), "affine": (1.0, 0.0), "leakyrelu": (0.01, None),
    "thresholdedrelu": (1.0, None), "scaledtanh": (1.0, 1.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, None),
}


def _activations(ctx: _Ctx, kind: str, n_dir: int) -> list[tuple[str, float, float]]:
    """(name, alpha, beta) of every activation, ``len(defaults) * n_dir`` of them."""
    per = len(_DEFAULT_ACTS[kind])
    names = [str(a) for a in (ctx.attrs.get("activations") or _DEFAULT_ACTS[kind])]
    if len(names) == per and n_dir == 2:
        names = names * 2
    if len(names) != per * n_dir:
        raise _Refuse(f"it lists {len(names)} activations; {kind} with {n_dir} direction(s) needs {per * n_dir}")
    alphas = [float(a) for a in ctx.attrs.get("activation_alpha") or []]
    betas = [float(b) for b in ctx.attrs.get("activation_beta") or []]
    out = []
    for name in names:
        key = name.lower()
        if key not in _ACT_PARAMS:
            raise _Refuse(f"activation {name!r} is not an ONNX RNN activation")
        da, db = _ACT_PARAMS[key]
        alpha = (alphas.pop(0) if alphas else da) if da is not None else 0.0
        beta = (betas.pop(0) if betas else db) if db is not None else 0.0
        out.append((key, alpha, beta))
    return out


def _act(ctx: _Ctx, act: tuple[str, float, float], x: Value) -> Value:
    """One RNN activation function applied to ``x``."""
    name, alpha, beta = act
    if name in ("relu", "tanh", "sigmoid", "softplus"):
        return ctx.op(name, [x])
    if name == "leakyrelu":
        return ctx.op("leaky_relu", [x], {"alpha": alpha})
    if name == "hardsigmoid":
        return ctx.op("hard_sigmoid", [x], {"alpha": alpha, "beta": beta})
    if name == "affine":
        return ctx.op("add", [ctx.op("mul", [x, ctx.scalar(alpha, x)]), ctx.scalar(beta, x)])
    if name == "scaledtanh":
        return ctx.op("mul", [ctx.op("tanh", [ctx.op("mul", [x, ctx.scalar(beta, x)])]), ctx.scalar(alpha, x)])
    if name == "thresholdedrelu":
        return ctx.op("where", [ctx.op("greater", [x, ctx.scalar(alpha, x)]), x, ctx.scalar(0, x)])
    if name == "elu":
        em1 = ctx.op("sub", [ctx.op("exp", [x]), ctx.scalar(1, x)])
        return ctx.op("where", [ctx.op("less", [x, ctx.scalar(0, x)]), ctx.op("mul", [em1, ctx.scalar(alpha, x)]), x])
    if name == "softsign":
        return ctx.op("div", [x, ctx.op("add", [ctx.op("abs", [x]), ctx.scalar(1, x)])])
    raise _Refuse(f"activation {name!r} is not supported")


class _Rnn:
    """The shared unrolling of RNN, GRU and LSTM (ONNX's equations, gate orders i-o-f-c and z-r-h)."""

    def __init__(self, ctx: _Ctx, kind: str):
        self.ctx, self.kind = ctx, kind
        self.g = _GATES[kind]
        x, w, r = ctx.x(0), ctx.x(1), ctx.x(2)
        direction = str(ctx.attr("direction", "forward"))
        if direction not in ("forward", "reverse", "bidirectional"):
            raise _Refuse(f"direction {direction!r} is not forward, reverse or bidirectional")
        self.dirs = [0, 1] if direction == "bidirectional" else [1 if direction == "reverse" else 0]
        self.layout = int(ctx.attr("layout", 0))
        if self.layout not in (0, 1):
            raise _Refuse(f"layout {self.layout} is not 0 or 1")
        if x.type.rank != 3 or w.type.rank != 3 or r.type.rank != 3:
            raise _Refuse(f"X, W and R must be 3-D, got {x.type}, {w.type}, {r.type}")
        h = ctx.attrs.get("hidden_size", r.type.shape[2])
        if not isinstance(h, int) or r.type.shape[2] != h or w.type.shape[1] != self.g * h \
                or r.type.shape[1] != self.g * h:
            raise _Refuse(f"hidden_size {h} does not fit W {w.type} and R {r.type} ({self.g} gates)")
        if w.type.shape[0] != len(self.dirs) or r.type.shape[0] != len(self.dirs):
            raise _Refuse(f"W {w.type} and R {r.type} must hold {len(self.dirs)} direction(s)")
        self.h = int(h)
        if self.layout:
            x = ctx.op("transpose", [x], {"perm": [1, 0, 2]})
        steps = x.type.shape[0]
        if not isinstance(steps, int):
            raise _Refuse(f"the sequence length of X {ctx.x(0).type} is symbolic; kiln unrolls {kind} over a "
                          f"static sequence", dynamic=True)
        if not 1 <= steps <= MAX_RNN_STEPS:
            raise _Refuse(f"a sequence of {steps} steps; kiln unrolls {kind} over 1..{MAX_RNN_STEPS} steps")
        self.x, self.w, self.r, self.steps = x, w, r, steps
        self.acts = _activations(ctx, kind, len(self.dirs))
        clip = ctx.attrs.get("clip")
        self.clip = None if clip is None else float(clip)
        self.lens = ctx.input(4)
        if self.lens is not None and self.lens.is_const and np.all(np.asarray(self.lens.const) >= steps):
            self.lens = None  # every sequence is full: no masking
        if self.lens is not None and self.lens.type.dtype != "i64":
            self.lens = ctx.op("cast", [self.lens], {"to": "i64"})

    # ------------------------------------------------------------ per-direction operands
    def state0(self, i: int, d: int) -> Value | None:
        v = self.ctx.input(i)
        if v is None:
            return None
        if self.layout:
            v = self.ctx.op("transpose", [v], {"perm": [1, 0, 2]})
        return self.ctx.op("gather", [v, _i64(self.ctx, d)], {"axis": 0})

    def pick(self, v: Value, d: int) -> Value:
        return self.ctx.op("gather", [v, _i64(self.ctx, d)], {"axis": 0})

    def t(self, v: Value) -> Value:
        return self.ctx.op("transpose", [v], {"perm": [1, 0]})

    def pre(self, v: Value) -> Value:
        """A gate's pre-activation, clipped when ``clip`` is set."""
        if self.clip is None:
            return v
        return self.ctx.op("clip", [v], {"min": -self.clip, "max": self.clip})

    def split(self, v: Value, n: int, size: int | None = None) -> list[Value]:
        """``v`` cut into ``n`` parts of ``size`` (default: hidden_size) along its last axis."""
        return _cut(self.ctx, v, [size or self.h] * n)

    def mask(self, step: int) -> Value | None:
        """[batch, 1] bool: which batch entries are still inside their sequence at ``step``."""
        if self.lens is None:
            return None
        ctx = self.ctx
        inside = ctx.op("less", [_i64(ctx, step), self.lens])
        return ctx.op("unsqueeze", [inside], {"axes": [1]})

    def hold(self, m: Value | None, new: Value, old: Value | None) -> Value:
        """``new`` where the step is inside the sequence, else ``old`` (zero when absent)."""
        if m is None:
            return new
        return self.ctx.op("where", [m, new, old if old is not None else self.ctx.scalar(0, new)])

    def add(self, a: Value, b: Value | None) -> Value:
        return a if b is None else self.ctx.op("add", [a, b])

    def mul(self, a: Value, b: Value) -> Value:
        return self.ctx.op("mul", [a, b])

    # ------------------------------------------------------------ the unrolled layer
    def run(self) -> list[Value | None]:
        ctx = self.ctx
        ys, hs, cs = [], [], []
        per = len(_DEFAULT_ACTS[self.kind])
        for k, d in enumerate(self.dirs):
            acts = self.acts[k * per:(k + 1) * per]
            y, h, c = self.direction(k, d, acts)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        results: list[Value | None] = [None] * len(ctx.outs)
        if ctx.outs and ctx.outs[0]:
            per_dir = [_stack(ctx, ys_d, 0) for ys_d in ys]  # [T, batch, H] each
            y = _stack(ctx, per_dir, 1, out=None if self.layout else 0)  # [T, dirs, batch, H]
            results[0] = ctx.op("transpose", [y], {"perm": [2, 0, 1, 3]}, out=0) if self.layout else y
        for k, states in ((1, hs), (2, cs)):
            if k < len(ctx.outs) and ctx.outs[k]:
                if any(s is None for s in states):
                    raise _Refuse(f"its output {k} is not computed by {self.kind}")
                s = _stack(ctx, states, 0, out=None if self.layout else k)  # [dirs, batch, H]
                results[k] = ctx.op("transpose", [s], {"perm": [1, 0, 2]}, out=k) if self.layout else s
        return results

    def direction(self, k: int, d: int, acts: list) -> tuple[list[Value], Value, Value | None]:
        """One direction ``k`` (reverse when ``d``): Y per step in time order, final H and C."""
        ctx, g, hsz = self.ctx, self.g, self.h
        w_t = self.t(self.pick(self.w, k))  # [in, gH]
        r_t = self.t(self.pick(self.r, k))  # [H, gH]
        b = ctx.input(3)
        bias_x = rb_h = None
        if b is not None:
            wb, rb = self.split(self.pick(b, k), 2, g * hsz)
            if self.kind == "GRU" and int(ctx.attr("linear_before_reset", 0)):
                rb_zr, rb_h = _cut(ctx, rb, [2 * hsz, hsz])
                rb = ctx.op("concat", [rb_zr, ctx.const(np.zeros(hsz), like=rb_zr)], {"axis": 0})
            bias_x = ctx.op("add", [wb, rb])
        xw = self.add(ctx.op("matmul", [self.x, w_t]), bias_x)  # [T, batch, gH]
        h = self.state0(5, k)
        c = self.state0(6, k) if self.kind == "LSTM" else None
        peep = None
        if self.kind == "LSTM" and ctx.input(7) is not None:
            peep = self.split(self.pick(ctx.x(7), k), 3)
        r_parts = []
        if self.kind == "GRU":
            r_parts = _cut(ctx, r_t, [2 * hsz, hsz])
        ys: dict[int, Value] = {}
        order = range(self.steps - 1, -1, -1) if d else range(self.steps)
        for t in order:
            xt = ctx.op("gather", [xw, _i64(ctx, t)], {"axis": 0})  # [batch, gH]
            m = self.mask(t)
            if self.kind == "RNN":
                new_h = _act(ctx, acts[0], self.pre(self.add(xt, self.rec(h, r_t))))
                new_c = None
            elif self.kind == "GRU":
                new_h = self.gru_step(xt, h, r_parts, rb_h, acts)
                new_c = None
            else:
                new_h, new_c = self.lstm_step(xt, h, c, r_t, peep, acts)
            ys[t] = self.hold(m, new_h, None)
            h = self.hold(m, new_h, h)
            if new_c is not None:
                c = self.hold(m, new_c, c)
        empty = self.empty_mask()
        if empty is not None:  # an entry of length 0 ends with zero states, as onnxruntime's
            h = self.hold(empty, h, None)
            c = None if c is None else self.hold(empty, c, None)
        return [ys[t] for t in range(self.steps)], h, c

    def empty_mask(self) -> Value | None:
        """[batch, 1] bool: which entries have a nonzero length (None when all surely do)."""
        if self.lens is None or (self.lens.is_const and np.all(np.asarray(self.lens.const) > 0)):
            return None
        return self.mask(0)

    def rec(self, h: Value | None, r_t: Value) -> Value | None:
        """``h @ R^T`` (None for a zero state)."""
        return None if h is None else self.ctx.op("matmul", [h, r_t])

    def gru_step(self, xt: Value, h: Value | None, r_parts: list[Value], rb_h: Value | None,
                 acts: list) -> Value:
        """z-r-h gates; ``r_parts``: R^T split into its z-r columns and its h columns."""
        ctx = self.ctx
        f, gact = acts
        xz, xr, xh = self.split(xt, 3)
        r_zr, r_h = r_parts
        hz = hr = None
        if h is not None:
            hz, hr = self.split(ctx.op("matmul", [h, r_zr]), 2)
        z = _act(ctx, f, self.pre(self.add(xz, hz)))
        r = _act(ctx, f, self.pre(self.add(xr, hr)))
        if int(ctx.attr("linear_before_reset", 0)):
            lin = self.add(rb_h, self.rec(h, r_h)) if rb_h is not None else self.rec(h, r_h)
            hh = xh if lin is None else ctx.op("add", [xh, self.mul(r, lin)])
        else:
            hh = xh if h is None else ctx.op("add", [xh, ctx.op("matmul", [self.mul(r, h), r_h])])
        hh = _act(ctx, gact, self.pre(hh))
        one_minus_z = ctx.op("sub", [ctx.scalar(1, z), z])
        out = self.mul(one_minus_z, hh)
        return out if h is None else ctx.op("add", [out, self.mul(z, h)])

    def lstm_step(self, xt: Value, h: Value | None, c: Value | None, r_t: Value,
                  peep: list[Value] | None, acts: list) -> tuple[Value, Value]:
        ctx = self.ctx
        f, gact, hact = acts
        gi, go, gf, gc = self.split(self.add(xt, self.rec(h, r_t)), 4)
        if peep is not None and c is not None:
            gi = ctx.op("add", [gi, self.mul(peep[0], c)])
            gf = ctx.op("add", [gf, self.mul(peep[2], c)])
        i = _act(ctx, f, self.pre(gi))
        if int(ctx.attr("input_forget", 0)):
            fg = ctx.op("sub", [ctx.scalar(1, i), i])
        else:
            fg = _act(ctx, f, self.pre(gf))
        cand = _act(ctx, gact, self.pre(gc))
        new_c = self.mul(i, cand) if c is None else ctx.op("add", [self.mul(fg, c), self.mul(i, cand)])
        if peep is not None:
            go = ctx.op("add", [go, self.mul(peep[1], new_c)])
        o = _act(ctx, f, self.pre(go))
        return self.mul(o, _act(ctx, hact, new_c)), new_c


_RNN_NEEDS = ("matmul", "add", "mul", "sub", "slice", "gather", "transpose", "concat", "unsqueeze", "where",
              "less", "cast", "sigmoid", "tanh", "identity")


@_special("RNN", needs=_RNN_NEEDS)
def _rnn(ctx: _Ctx) -> list[Value | None]:
    return _Rnn(ctx, "RNN").run()


@_special("GRU", needs=_RNN_NEEDS)
def _gru(ctx: _Ctx) -> list[Value | None]:
    return _Rnn(ctx, "GRU").run()


@_special("LSTM", needs=_RNN_NEEDS)
def _lstm(ctx: _Ctx) -> list[Value | None]:
    return _Rnn(ctx, "LSTM").run()
