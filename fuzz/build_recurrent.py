"""Fuzz builders for the ops of family 'recurrent' (ops the generic builders do not cover)."""

from __future__ import annotations
