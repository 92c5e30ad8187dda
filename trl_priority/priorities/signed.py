"""Signed priorities: Φ < 0 on tokens to unlearn (bounded by `PrioritySFTConfig.negative_loss`)."""

from __future__ import annotations
