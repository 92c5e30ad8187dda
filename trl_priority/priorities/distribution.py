"""Priorities whose objective reads the whole next-token distribution: a Φ plus a `DistributionTerm`."""

from __future__ import annotations
