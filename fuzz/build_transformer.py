"""Fuzz builders for the ops of family 'transformer' (ops the generic builders do not cover)."""

from __future__ import annotations
