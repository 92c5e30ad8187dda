"""Φ as a pure function: `compute_phi(settings, statistics, progress)`, callable without a trainer.

The trainer, the viewer (`trl-priority inspect`) and the tests form Φ here, in one order:

1. **hyperparameter schedule** (`step_hyperparameters`): the method's hyperparameters at this `progress`. First,
   because everything after reads them: the selection's kept fraction (Rho-1's `ratio` on a cosine schedule), the
   priority's own thresholds. It depends on the step alone, so the trainer computes it once per optimizer step and
   passes it in (`step_args`); it is computed here when not given.
2. **selection** (a method declaring `selection=TopFraction(...)`): the top fraction of the supervised tokens by the
   method's score, over its scope: the batch, each example (`scope="example"`), or the whole optimizer step
   (`scope="step"`: either `selected`, made ahead over every micro-batch of the step, or, for a step of one
   micro-batch, `over_processes`, a selection across the processes). Before Φ, because the priority reads the
   selection as its `selected` statistic.
3. **Φ = priority(statistics)**: the registered function, its contract checked (shape, finite, regime, sign).
4. **pooling over words or spans** (`granularity` "word" or "span"): Φ replaced on each token by the max / mean / min
   over its unit, so a kept unit is kept whole (`schedules.pool_over_groups`). After Φ, since it pools Φ itself, and
   before the warm-up, so that the warm-up blends the pooled Φ (blending first and pooling after would let max pooling
   undo the blend: a word with one uniform-blended token would take the larger, blended value everywhere).
5. **warm-up blend with uniform** (`warmup_ratio`): Φ_eff = (1 − w)·1 + w·Φ, w = min(1, progress / warmup_ratio), and
   w·Φ for a negative Φ (`schedules.blend_with_uniform`). Last, because it is what the loss sees: at w = 0 every
   supervised token has exactly Φ = 1, plain SFT, whatever the selection and pooling made.

`PhiSettings` holds the method's Φ settings (priority, resolved hyperparameters, schedule, granularity, pooling,
warm-up ratio), built once from the config: `PhiSettings.from_config(args, priority, priority_args)`.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trl_priority.priorities import Priority, get_priority
from trl_priority.priorities.schedules import (
    blend_with_uniform,
    parse_schedule,
    pool_over_groups,
    schedule_value,
    unit_groups,
    warmup_weight,
)
from trl_priority.priorities.selection import select_in_batch, select_in_examples, select_over_step


# `over_processes(scores, masks, fraction) -> selected`, each a list with one `(B, T-1)` tensor per micro-batch
OverProcesses = Callable[[list[torch.Tensor], list[torch.Tensor], float], list[torch.Tensor]]


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)
class PhiSettings:
    """What shapes Φ for a method, fixed for a run: everything `compute_phi` needs besides the statistics and the step.

    Attributes:
        priority: the registered `Priority` (a name, callable or composition is looked up by `from_config`).
        args: its resolved hyperparameters (`Priority.resolve_args`), before any schedule.
        schedule: the parsed `priority_schedule` (`schedules.parse_schedule`): hyperparameter → {start, end, kind, at}.
        granularity: "token", "word" or "span" (`priority_granularity`).
        pooling: "max", "mean" or "min" over a word or span (`priority_pooling`).
        warmup_ratio: the fraction of training over which Φ blends from uniform into the method.
    """

    priority: Priority
    args: Mapping[str, Any] = field(default_factory=dict)
    schedule: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    granularity: str = "token"
    pooling: str = "max"
    warmup_ratio: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "args", _frozen(self.args))
        object.__setattr__(
            self, "schedule", _frozen({k: _frozen(v) for k, v in parse_schedule(self.schedule).items()})
        )

    @classmethod
    def from_config(cls, config, priority=None, priority_args: Mapping[str, Any] | None = None) -> PhiSettings:
        """The settings of a `PrioritySFTConfig`. `priority` (default `config.priority`) may be a name, a callable, a
        composition or a `Priority`; `priority_args` are its *resolved* hyperparameters (the trainer's
        `priority_args`); when None, `config.priority_args` are resolved here."""
        priority = get_priority(config.priority if priority is None else priority)
        if priority_args is None:
            priority_args = priority.resolve_args(config.priority_args)
        return cls(
            priority=priority,
            args=priority_args,
            schedule=config.priority_schedule or {},
            granularity=config.priority_granularity,
            pooling=config.priority_pooling,
            warmup_ratio=config.priority_warmup_ratio,
        )

    def step_args(self, progress: float) -> dict[str, Any]:
        """The hyperparameters at `progress`: `step_hyperparameters` of these settings."""
        return step_hyperparameters(self.priority, self.args, self.schedule, progress)


def step_hyperparameters(
    priority: Priority,
    priority_args: Mapping[str, Any],
    schedule: Mapping[str, Mapping[str, Any]] | None,
    progress: float,
) -> dict[str, Any]:
    """The method's hyperparameters at `progress` ∈ [0, 1]: `priority_args`, with each scheduled one moved from its
    `start` (default: its configured value) to its `end` (`schedules.schedule_value`), rounded for an integer one.

    Args:
        priority: the method (for the kind of each hyperparameter).
        priority_args: its resolved hyperparameters.
        schedule: the parsed `priority_schedule`, hyperparameter → {start, end, kind, at}; None or empty: none.
        progress: the fraction of training done.

    Returns:
        A new dict; `priority_args` is not changed.
    """
    args = dict(priority_args)
    for name, entry in (schedule or {}).items():
        start = entry.get("start", priority_args[name])
        value = schedule_value(start, entry["end"], entry.get("kind", "linear"), progress, entry.get("at", 0.5))
        args[name] = round(value) if priority.hyperparameters[name].kind is int else value
    return args


def selection_scores(priority: Priority, statistics: Mapping[str, Any], step_args: Mapping[str, Any]) -> torch.Tensor:
    """The `(B, T-1)` score of the method's selection (higher is kept), with the `signal` switch applied."""
    return priority.selection_scores(statistics, step_args)


def _as_over_processes(over_processes: OverProcesses | Any | None) -> OverProcesses:
    """A callable `(scores, masks, fraction) -> selected` from a callable, an `Accelerator` or None (this process)."""
    if over_processes is None or hasattr(over_processes, "num_processes"):
        return functools.partial(select_over_step, accelerator=over_processes)
    return over_processes


def select_over_step_batches(
    priority: Priority,
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    step_args: Mapping[str, Any],
    progress: float,
    over_processes: OverProcesses | Any | None = None,
) -> list[torch.Tensor]:
    """A step-wide selection: the top kept fraction of every supervised token of the step's micro-batches (their
    `selection_scores` and masks, in order), over the processes when `over_processes` is given (a callable as in
    `compute_phi`, or an `Accelerator`). One `(B, T-1)` bool per micro-batch, to pass to `compute_phi` as `selected`."""
    fraction = priority.selection.kept_fraction(step_args, progress)
    return _as_over_processes(over_processes)(list(scores), list(masks), fraction)


def select_tokens(
    priority: Priority,
    statistics: Mapping[str, Any],
    step_args: Mapping[str, Any],
    progress: float,
    over_processes: OverProcesses | Any | None = None,
) -> torch.Tensor:
    """The method's selection on one batch (step 2 of `compute_phi`): per example for `scope="example"` (examples
    named by `statistics["_example"]` when present, else one per row), over the processes for `scope="step"` when
    `over_processes` is given, over this batch otherwise."""
    selection = priority.selection
    scores = selection_scores(priority, statistics, step_args)
    fraction = selection.kept_fraction(step_args, progress)
    mask = statistics["mask"]
    scope = selection.scope_of(step_args)
    if scope == "example":
        return select_in_examples(scores, mask, fraction, statistics.get("_example"))
    if scope == "step" and over_processes is not None:
        return _as_over_processes(over_processes)([scores], [mask], fraction)[0]
    return select_in_batch(scores, mask, fraction)


def compute_phi(
    settings: PhiSettings,
    statistics: dict[str, Any],
    progress: float = 0.0,
    *,
    step_args: Mapping[str, Any] | None = None,
    selected: torch.Tensor | None = None,
    over_processes: OverProcesses | Any | None = None,
) -> torch.Tensor:
    """Φ `(B, T-1)` from the statistics, in the order of the module docstring: schedule → selection → priority →
    pooling → warm-up.

    Args:
        settings: the method and its Φ settings (`PhiSettings`).
        statistics: the per-token `(B, T-1)` statistics the method reads, with `mask`; `progress` (a 0-d tensor), and
            `state`, `_unit` (word or span id, for a pooled granularity) and `_example` (example index, for pooling
            and per-example selection) where the method needs them. When the method selects, the selection is written
            into it as `selected` (the priority reads it as a statistic, and a caller reports it); nothing else in it
            is changed.
        progress: the fraction of training done, for the schedule, the kept fraction and the warm-up.
        step_args: the hyperparameters at this step, when already computed (`step_hyperparameters`, computed once
            per step by the trainer); None: computed here from `settings.schedule`.
        selected: a selection made ahead for this batch (a step-wide one, `select_over_step_batches`); None: made
            here (`select_tokens`).
        over_processes: for a `scope="step"` selection made here (a step of one micro-batch): `fn(scores, masks,
            fraction) -> selected` over every process (`selection.select_over_step` with an accelerator), or an
            `Accelerator`; None: over this batch.

    Returns:
        Φ, float32, without gradient, 0 where `mask` is False.
    """
    priority = settings.priority
    if step_args is None:
        step_args = settings.step_args(progress)
    if priority.selection is not None:
        if selected is None:
            selected = select_tokens(priority, statistics, step_args, progress, over_processes)
        statistics["selected"] = selected
    phi = priority(statistics, step_args)  # (B, T-1)
    mask = statistics["mask"]
    if settings.granularity != "token":
        # Whole words or spans: one Φ per (example, unit), pooled over its supervised tokens
        groups = unit_groups(statistics["_example"], statistics["_unit"], settings.granularity)  # (B, T-1)
        phi = pool_over_groups(phi, groups, mask, settings.pooling)
    return blend_with_uniform(phi, mask, warmup_weight(progress, settings.warmup_ratio))


def step_selections(
    priority: Priority,
    statistics_of_batches: Iterable[Mapping[str, Any]],
    step_args: Mapping[str, Any],
    progress: float,
    over_processes: Callable,
) -> list[dict[str, Any]]:
    """A step-wide selection made ahead: the statistics of every micro-batch of the optimizer step (gathered without
    gradient, one at a time as the iterable is consumed) are scored, the top fraction of every process's supervised
    tokens is kept over all of them (`select_over_step_batches`), and each micro-batch gets its `selected` mask and
    the reference statistics already computed (None when there are none)."""
    scores, masks, references = [], [], []
    for statistics in statistics_of_batches:
        scores.append(selection_scores(priority, statistics, step_args))
        masks.append(statistics["mask"])
        references.append({k: v for k, v in statistics.items() if k.startswith("ref_")} or None)
    selected = select_over_step_batches(priority, scores, masks, step_args, progress, over_processes)
    return [{"selected": s, "reference": r} for s, r in zip(selected, references)]
