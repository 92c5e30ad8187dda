"""Loss terms: the weighted negative log-likelihood every method uses, and the extra terms some methods add.

    L = Σ_t Φ_t · (−log π_θ(y_t | y_<t)) / N  +  Σ_terms w_term · Σ_t term_t / N

N is TRL's own denominator (`num_items_in_batch`): every supervised token of the optimizer step, across
gradient-accumulation steps and processes. Sparse or signed Φ therefore never changes the effective learning rate
behind the user's back; a method that wants another normaliser says so in its own options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


def weighted_nll(logps: torch.Tensor, priority: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Σ_t Φ_t · (−logps_t) / N.

    Args:
        logps: `(B, T-1)` log π_θ(y_t), with gradient, 0 where ignored.
        priority: `(B, T-1)` Φ, no gradient, 0 where ignored.
        num_items: N; clamped to 1 so that a batch without supervised tokens gives a finite 0, not 0/0.
    """
    per_token_loss = -logps * priority  # (B, T-1)
    return per_token_loss.sum() / torch.as_tensor(num_items).clamp(min=1)


@dataclass(frozen=True)
class LossTerm:
    """An extra term of a method's objective, added to Φ·NLL by the trainer without knowing the method.

    `fn` is a pure function like a priority: its positional parameters are named from the statistic vocabulary
    (`trl_priority.statistics`) plus `priority` (the Φ just computed); for a loss term, `logps` and `entropy` keep
    their gradient. Its keyword-only parameters are read from the method's hyperparameters. It returns a per-token
    `(B, T-1)` tensor, 0 where ignored; the trainer adds `priority_args[weight] · Σ_t term_t / N` to the loss and logs
    the term as `loss/<name>`.

    ```python
    def unlikelihood(logps, priority, mask):  # −log(1 − p) on the tokens to unlearn: bounded, unlike −(−log p)
        return torch.where((priority < 0) & mask, -torch.log1p(-logps.exp().clamp(max=1 - 1e-6)), 0.0)

    @register_priority(regime="signed", loss_terms=(LossTerm("unlikelihood", unlikelihood, weight="lam"),))
    def forgetting(..., *, lam: float = 1.0): ...
    ```
    """

    name: str
    fn: Callable[..., torch.Tensor]
    weight: str

    @functools.cached_property
    def statistics(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)
