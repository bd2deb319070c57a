"""Fuzz builders for the ops of family 'recurrent': none (the family has no registry op; the
unrolled RNN/GRU/LSTM steps are matmul/add/activation graphs the generic builders already make)."""

from __future__ import annotations
