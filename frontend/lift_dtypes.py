"""ONNX converters for Cast/CastLike (through opset 25; Cast 28 only adds float6 types).

Both become kiln's ``cast``. ``saturate`` is kept only where it changes the result (a float8
or float8e8m0 target with saturate=0) and ``round_mode`` only for a float8e8m0 target, so
every other cast has one spelling. BitCast (opset 26) is lifted generically from the ``bitcast``
op's OnnxSpec.
"""

from __future__ import annotations

from kiln.ir.graph import Value
from kiln.ir.ops.dtypes import ROUND_MODES
from kiln.ir.types import FLOAT8_DTYPES

from .dtypes import kiln_dtype
from .lift import _check_only, _Ctx, _Refuse, _special


def _cast_attrs(ctx: _Ctx, to: str) -> dict[str, object]:
    """kiln ``cast`` attributes for target ``to`` from the node's saturate and round_mode."""
    saturate = int(ctx.attr("saturate", 1))
    mode = ctx.attr("round_mode", "up")
    if saturate not in (0, 1):
        raise _Refuse(f"saturate={saturate} (must be 0 or 1)")
    if mode not in ROUND_MODES:
        raise _Refuse(f"round_mode={mode!r} is not one of {list(ROUND_MODES)}")
    attrs: dict[str, object] = {"to": to}
    if to in FLOAT8_DTYPES | {"f8e8m0"} and saturate == 0:
        attrs["saturate"] = 0
    if to == "f8e8m0" and mode != "up":
        attrs["round_mode"] = mode
    return attrs


def _target(elem_type: int, what: str) -> str:
    try:
        return kiln_dtype(int(elem_type))
    except ValueError as e:
        raise _Refuse(f"{what}: {e}") from None


@_special("Cast", needs=("cast",), since=25)
def _cast(ctx: _Ctx) -> list[Value | None]:
    if "to" not in ctx.attrs:
        raise _Refuse("Cast has no 'to' attribute")
    _check_only(ctx, ("to", "saturate", "round_mode"))
    to = _target(ctx.attrs["to"], "to")
    return [ctx.op("cast", [ctx.x()], _cast_attrs(ctx, to), out=0)]


@_special("CastLike", needs=("cast",), since=25)
def _cast_like(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("saturate", "round_mode"))
    to = ctx.x(1).type.dtype
    return [ctx.op("cast", [ctx.x(0)], _cast_attrs(ctx, to), out=0)]
