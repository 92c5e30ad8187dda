"""Priorities that follow training: a schedule over training progress, or a history of each token kept in state."""

from __future__ import annotations
