"""Op families; importing this package registers every op."""

from importlib import import_module

FAMILIES = ("elementwise", "nn", "tensor", "reduce", "quant", "math", "index", "image", "nn_extra",
            "transformer", "recurrent", "signal", "dtypes")

for _family in FAMILIES:
    import_module(f"{__name__}.{_family}")
