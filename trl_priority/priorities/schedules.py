"""Priority beyond a single step's Φ: schedules over training, and Φ pooled over whole words or spans.

Pure functions of tensors and floats; the trainer applies them to any method, from `PrioritySFTConfig` settings:

- `priority_warmup_ratio`: Φ blends from uniform SFT into the method over the first part of training,
  Φ_eff = (1 − w)·1 + w·Φ with w = min(1, progress / warmup_ratio) (position paper arXiv 2602.01227, appendix A.3);
  a negative Φ (a token to unlearn) is scaled instead, Φ_eff = w·Φ, so that warm-up never trains a token the method
  unlearns: blending it with 1 would make it positive below w = 1/(1 − Φ) (w < 0.5 for Φ = −1);
- `priority_schedule`: a hyperparameter (a ratio, a threshold) moves from `start` to `end` over training, linearly,
  along a half cosine, or in one step at `at`;
- `priority_granularity`: Φ pooled (max, mean or min) over whole words or labelled spans, so that a kept unit is kept
  whole: a number split into several tokens is never half trained (appendix A.1). A unit holding a negative Φ takes
  its most negative Φ whatever the pooling: a word half unlearned is unlearned whole, never learned because another
  of its tokens is kept (max pooling over Φ = 1 and Φ = −1 would give 1).

Methods whose objective reads Φ beyond the NLL (Target-SFT's soft target: Q_t = Φ_t·δ + (1 − Φ_t)·A_t) read Φ after
both, so the two parts of their loss see the same Φ. Terms that do not read Φ (ASFT's KL anchor) are left as they are:
warm-up and pooling shape Φ, not the rest of the objective.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch


SCHEDULE_KINDS = ("linear", "cosine", "step")


def schedule_value(start: float, end: float, kind: str, progress: float, at: float = 0.5) -> float:
    """The value at `progress` ∈ [0, 1]: linear start + (end − start)·s, cosine start + (end − start)·(1 − cos πs)/2,
    or step (start before `at`, end from `at` on)."""
    s = min(1.0, max(0.0, progress))
    if kind == "linear":
        f = s
    elif kind == "cosine":
        f = (1 - math.cos(math.pi * s)) / 2
    elif kind == "step":
        f = 1.0 if s >= at else 0.0
    else:
        raise ValueError(f"Schedule kind {kind!r} is not one of {list(SCHEDULE_KINDS)}.")
    return start + (end - start) * f


def warmup_weight(progress: float, warmup_ratio: float) -> float:
    """w = min(1, progress / warmup_ratio): 0 (uniform SFT) at the start, 1 (the method) once warm."""
    return 1.0 if warmup_ratio <= 0 else min(1.0, progress / warmup_ratio)


def blend_with_uniform(phi: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·1 + w·Φ on the supervised tokens with Φ ≥ 0, w·Φ on those with Φ < 0 (scaled towards 0, never
    flipped to learning)."""
    if weight >= 1:
        return phi
    blended = torch.where(phi < 0, weight * phi, (1 - weight) + weight * phi)  # (B, T-1)
    return torch.where(mask, blended, 0.0)


def unit_groups(example: torch.Tensor, unit: torch.Tensor, granularity: str) -> torch.Tensor:
    """`(B, T-1)` group of each token for `priority_granularity` "word" or "span": one group per (example, unit),
    numbered 0, 1, ... within the batch (never from the example index itself, which can be in the millions); -1 where
    a token has no unit (a span id of 0 is "outside every span", a word id < 0 is padding).

    Args:
        example: `(B, T-1)` example index of each token (packed and padding-free rows hold several examples).
        unit: `(B, T-1)` word or span id of each token within its example.
        granularity: "word" or "span".
    """
    has_unit = (unit > 0) if granularity == "span" else (unit >= 0)  # (B, T-1)
    groups = torch.full_like(unit, -1, dtype=torch.long)  # (B, T-1)
    if bool(has_unit.any()):
        pairs = torch.stack([example[has_unit].long(), unit[has_unit].long()], dim=-1)  # (n, 2)
        groups[has_unit] = torch.unique(pairs, dim=0, return_inverse=True)[1]
    return groups


def pool_over_groups(phi: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Φ replaced, on each supervised token, by the max / mean / min of Φ over the supervised tokens of its group;
    a group with a negative Φ takes its minimum (its most negative Φ), whatever `how` says.

    Args:
        phi: `(B, T-1)` Φ.
        groups: `(B, T-1)` integer group of each token, unique within a row (e.g. example × word); < 0: no group,
            the token keeps its own Φ.
        mask: `(B, T-1)` supervised tokens.
        how: "max", "mean" or "min".
    """
    grouped = mask & (groups >= 0)  # (B, T-1)
    if not bool(grouped.any()):
        return phi
    rows = torch.arange(phi.size(0), device=phi.device)[:, None].expand_as(groups)  # (B, T-1)
    # (row, group) pairs renumbered 0..n_groups-1 in this batch: the pooled table has one slot per group present,
    # whatever the ids' size (ids built from a large example index would otherwise need B × (max id + 1) slots)
    pairs = torch.stack([rows[grouped], groups[grouped]], dim=-1)  # (n, 2)
    _, keys = torch.unique(pairs, dim=0, return_inverse=True)  # (n,) in [0, n_groups)
    values = phi[grouped]  # (n,)
    reduce = {"max": "amax", "min": "amin", "mean": "mean"}[how]
    empty = torch.zeros(int(keys.max()) + 1, dtype=phi.dtype, device=phi.device)  # (n_groups,)
    pooled = empty.scatter_reduce(0, keys, values, reduce=reduce, include_self=False)[keys]  # (n,)
    lowest = empty.scatter_reduce(0, keys, values, reduce="amin", include_self=False)[keys]  # (n,)
    out = phi.clone()
    out[grouped] = torch.where(lowest < 0, lowest, pooled)  # a unit to unlearn keeps the sign of its worst token
    return out


def parse_schedule(schedule: Any) -> dict[str, dict[str, Any]]:
    """`priority_schedule` as a dict (a JSON string is accepted), each entry checked for its keys and kind."""
    if schedule is None:
        return {}
    if isinstance(schedule, str):
        try:
            schedule = json.loads(schedule)
        except json.JSONDecodeError as error:
            raise ValueError(f"`priority_schedule` is not valid JSON ({error.msg}): {schedule!r}.") from None
    if not isinstance(schedule, Mapping):
        raise ValueError(
            "`priority_schedule` maps hyperparameters to schedules, e.g. "
            """{"ratio": {"end": 0.6, "kind": "cosine"}}; got """
            f"{type(schedule).__name__}."
        )
    parsed = {}
    for name, entry in schedule.items():
        if not isinstance(entry, Mapping) or "end" not in entry:
            raise ValueError(f"`priority_schedule['{name}']` needs at least an `end` value, got {entry!r}.")
        unknown = set(entry) - {"start", "end", "kind", "at"}
        if unknown:
            raise ValueError(
                f"`priority_schedule['{name}']` has unknown keys {sorted(unknown)}; valid: start, end, kind, at."
            )
        kind = entry.get("kind", "linear")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"`priority_schedule['{name}']`: kind {kind!r} is not one of {list(SCHEDULE_KINDS)}.")
        parsed[name] = {
            "kind": kind,
            "at": float(entry.get("at", 0.5)),
            **{k: entry[k] for k in ("start", "end") if k in entry},
        }
    return parsed
