"""Fuzz builders for the ops of family 'nn_extra' (ops the generic builders do not cover)."""

from __future__ import annotations
