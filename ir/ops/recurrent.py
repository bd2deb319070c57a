"""Op family 'recurrent': no registry op of its own.

RNN, GRU and LSTM are unrolled at lift into matmul / add / activation ops, If / Loop / Scan
are inlined and unrolled, and ONNX's random ops are refused (see
``frontend/lift_recurrent.py`` for why each is exact or refused). Unrolling was chosen over a
loop-kernel op: structurally equal steps compile to one kernel each; the measured cost is the
per-step kernel calls (numbers in the docstring of ``frontend/lift_recurrent.py``).
"""

from __future__ import annotations
