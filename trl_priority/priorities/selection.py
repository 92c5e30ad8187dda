"""Top-fraction selection, over a micro-batch or over the whole optimizer step.

Hard-selection methods (Rho-1, Forgetting's token split, EntroDrop) keep the top fraction of tokens by a score. Chosen
per micro-batch on each process, the kept set depends on the gradient-accumulation steps and the number of GPUs; the
paper's selection is over the batch the optimizer sees. A method declares its selection once:

```python
@register_priority(regime="hard", selection=TopFraction(excess_loss, fraction="ratio", scope="scope"))
def rho1(selected, mask, *, ratio: Fraction = 0.6, scope: Literal["step", "micro_batch"] = "step"):
    return selected.float() * mask
```

and the trainer computes `selected` generically. With `scope="step"` it scores every micro-batch of the optimizer step
before the first one trains (one extra forward without gradient, in eval mode; the reference statistics of that pass
are kept and reused, so the reference still runs once per micro-batch), gathers the scores of every process, and keeps
the top `fraction` of all of them: 2 accumulation steps of 2 select exactly what one batch of 4 selects. A step of a
single micro-batch (no gradient accumulation) needs no scoring pass: the selection is made, over every process, from
the training forward's own scores (in training mode: with dropout active they carry its noise, where the pass's
eval-mode scores do not). With
`scope="example"` each example keeps the top `fraction` of its own tokens (TokenCleaning's and ssToken's per-sample
selection): the trainer then carries the `example_index` of every token, so that padding-free and packed rows, which
hold several examples, are split correctly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trl_priority.signatures import hyperparameter_names, statistic_parameters


@dataclass(frozen=True)
class TopFraction:
    """Keep the top `fraction` of the supervised tokens by `score`.

    Attributes:
        score: a pure function of statistics (positional parameters from the vocabulary, keyword-only ones from the
            method's hyperparameters) returning a `(B, T-1)` score; higher is kept.
        fraction: the name of the method's hyperparameter holding the kept fraction, or `fn(args, progress) -> float`
            for a fraction that follows a schedule over training.
        scope: the name of the method's hyperparameter whose value is "step", "micro_batch" or "example" (or that
            literal value).
    """

    score: Callable[..., torch.Tensor]
    fraction: str | Callable[[Mapping[str, Any], float], float]
    scope: str = "scope"

    @functools.cached_property
    def statistics(self) -> tuple[str, ...]:
        return statistic_parameters(self.score)

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        return hyperparameter_names(self.score)

    def kept_fraction(self, args: Mapping[str, Any], progress: float) -> float:
        value = args[self.fraction] if isinstance(self.fraction, str) else self.fraction(args, progress)
        return min(1.0, max(0.0, float(value)))

    def scope_of(self, args: Mapping[str, Any]) -> str:
        return args[self.scope] if self.scope in args else self.scope

    def scores(self, statistics: Mapping[str, Any], args: Mapping[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            score = self.score(
                *(statistics[name] for name in self.statistics), **{hp: args[hp] for hp in self.hyperparameters}
            )
        return score.float()


def num_kept(fraction: float, num_tokens: int) -> int:
    """k = round(fraction · n), half up; at least 1 when the fraction and n are positive."""
    if num_tokens == 0 or fraction <= 0:
        return 0
    return min(num_tokens, max(1, int(fraction * num_tokens + 0.5)))


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the k = round(fraction · n) largest of the 1-D `scores`; ties go to the earlier position.

    NaN scores are never kept before a finite one.
    """
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = num_kept(fraction, scores.numel())
    if k > 0:
        # A stable sort, unlike topk, breaks ties by position, so the selection is reproducible
        order = torch.nan_to_num(scores.float(), nan=-torch.inf).sort(descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep


def select_in_batch(scores: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """`(B, T-1)` bool: the top fraction of the supervised tokens of one batch (row-major order breaks ties)."""
    selected = torch.zeros_like(mask)
    selected[mask] = top_fraction(scores[mask], fraction)
    return selected


def select_in_examples(
    scores: torch.Tensor, mask: torch.Tensor, fraction: float, example_index: torch.Tensor | None = None
) -> torch.Tensor:
    """`(B, T-1)` bool: the top fraction of the supervised tokens of each example, chosen within the example.

    `example_index` `(B, T-1)` names the example of each position's label (padding-free and packed rows hold several
    examples); None: each row is one example. Each example keeps k = round(fraction · n_example), at least 1; ties go
    to the earlier position.
    """
    if example_index is None:
        example_index = torch.arange(mask.size(0), device=mask.device)[:, None].expand_as(mask)  # (B, T-1)
    selected = torch.zeros_like(mask)
    for example in example_index[mask].unique().tolist():
        members = mask & (example_index == example)  # (B, T-1)
        selected[members] = top_fraction(scores[members], fraction)
    return selected


def select_over_step(
    scores: list[torch.Tensor], masks: list[torch.Tensor], fraction: float, accelerator=None
) -> list[torch.Tensor]:
    """The top fraction of the supervised tokens of every micro-batch of a step, on every process.

    `scores[i]`, `masks[i]` are micro-batch i's `(B, T-1)` score and mask on this process. The supervised scores are
    concatenated in micro-batch order (row-major inside each), then across processes in rank order, and one selection
    is made over all of them; each process gets back its own part, as one `(B, T-1)` bool mask per micro-batch.
    """
    local = torch.cat([score[mask] for score, mask in zip(scores, masks)]) if scores else torch.zeros(0)  # (n,)
    offset, everything = 0, local
    if accelerator is not None and accelerator.num_processes > 1:
        sizes = accelerator.gather(torch.tensor([local.numel()], device=local.device)).tolist()
        if max(sizes) == 0:  # no process has a supervised token in this step: nothing to keep (and nothing to gather)
            return [torch.zeros_like(mask) for mask in masks]
        padded = accelerator.pad_across_processes(local, dim=0, pad_index=float("nan"))
        gathered = accelerator.gather(padded).view(len(sizes), -1)
        everything = torch.cat([row[:size] for row, size in zip(gathered, sizes)])
        offset = sum(sizes[: accelerator.process_index])
    keep = top_fraction(everything, fraction)[offset : offset + local.numel()]
    out, start = [], 0
    for mask in masks:
        selected = torch.zeros_like(mask)
        count = int(mask.sum())
        selected[mask] = keep[start : start + count]
        out.append(selected)
        start += count
    return out
