"""The objective: Φ-weighted likelihood, bounded unlearning for negative Φ, and the extra terms methods declare.

    L = [ Σ_{t: Φ_t ≥ 0} Φ_t · (−log π_θ(y_t))  +  Σ_{t: Φ_t < 0} |Φ_t| · U(π_θ(y_t)) ] / N
        + Σ_terms w_term · Σ_t term_t / N

N is TRL's own denominator (`num_items_in_batch`): every supervised token of the optimizer step, across
gradient-accumulation steps and processes, each token counted once whatever its sign. Sparse or signed Φ therefore
never changes the effective learning rate behind the user's back.

U, the loss on a token to unlearn, is set by `PrioritySFTConfig.negative_loss`:

| `negative_loss`   | U(p)                | gradient as p → 0 | bounded below |
|-------------------|---------------------|-------------------|---------------|
| `"unlikelihood"`  | −log(1 − p)         | vanishes          | yes, by 0     |
| `"ascent"`        | log p               | stays 1 / token   | no (→ −∞)     |

Unlikelihood (Welleck et al. 2020, arXiv 1908.04319) is the default: once a token is unlikely it stops pushing, so many
negative tokens cannot drive the loss to −∞ or wreck the model. Plain gradient ascent on the NLL is what some papers
write (Forgetting's official code); it is there only when asked for.

Two kinds of extra terms, added by the trainer without knowing the method:
- `LossTerm`: a function of per-token statistics (`(B, T-1)` each; `logps` and `entropy` keep their gradient).
- `DistributionTerm`: a function of the whole next-token distribution at each supervised position, `(n, V)`
  log-probabilities with gradient, computed in chunks inside the model's forward (a KL anchor, a soft target).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch


NegativeLoss = Literal["unlikelihood", "ascent"]


def unlikelihood(logps: torch.Tensor) -> torch.Tensor:
    """U(p) = −log(1 − p), from log p; finite for every p < 1 (p = 1 is clamped just below)."""
    # log(1 − p) = log(−expm1(log p)): exact for p near 0, where 1 − exp(log p) would cancel
    return -torch.log(-torch.expm1(logps.clamp(max=-1e-6)))


def priority_loss(
    logps: torch.Tensor,
    priority: torch.Tensor,
    num_items: torch.Tensor | int,
    negative_loss: NegativeLoss = "unlikelihood",
) -> torch.Tensor:
    """[Σ_{Φ≥0} Φ·(−logps) + Σ_{Φ<0} |Φ|·U(p)] / N.

    Args:
        logps: `(B, T-1)` log π_θ(y_t), with gradient, 0 where ignored.
        priority: `(B, T-1)` Φ, no gradient, 0 where ignored.
        num_items: N; clamped to 1 so that a batch without supervised tokens gives a finite 0, not 0/0.
        negative_loss: U for the tokens with Φ < 0 (see the module docstring).
    """
    positive = priority.clamp(min=0)  # (B, T-1)
    per_token_loss = -logps * positive  # (B, T-1)
    negative = (-priority).clamp(min=0)  # (B, T-1): |Φ| where Φ < 0
    if bool((negative > 0).any()):
        if negative_loss == "ascent":
            unlearn = logps  # −(−log p): gradient ascent on the NLL
        else:
            unlearn = unlikelihood(logps)
        per_token_loss = per_token_loss + torch.where(negative > 0, negative * unlearn, 0.0)
    return per_token_loss.sum() / torch.as_tensor(num_items).clamp(min=1)


def weighted_nll(logps: torch.Tensor, priority: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Σ_t Φ_t · (−logps_t) / N, for a non-negative Φ (kept for code written against the first API)."""
    return priority_loss(logps, priority, num_items)


def _positional(fn: Callable) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _keyword_only(fn: Callable) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)


@dataclass(frozen=True)
class LossTerm:
    """An extra per-token term of a method's objective, added to the Φ-weighted loss by the trainer.

    `fn` is a pure function like a priority: its positional parameters are named from the statistic vocabulary
    (`trl_priority.statistics`) plus `priority` (the Φ just computed); for a loss term, `logps` and `entropy` keep
    their gradient. Its keyword-only parameters are read from the method's hyperparameters. It returns a per-token
    `(B, T-1)` tensor, 0 where ignored; the trainer adds `priority_args[weight] · Σ_t term_t / N` to the loss (weight
    1 when `weight` is None) and logs the term's value as `loss/<name>`.

    ```python
    def entropy_bonus(entropy, mask):  # keep the policy from collapsing: −H, with gradient
        return -entropy * mask

    @register_priority(loss_terms=(LossTerm("entropy_bonus", entropy_bonus, weight="beta"),))
    def sft_with_entropy(mask, *, beta: float = 0.01): ...
    ```
    Tokens to unlearn need no term: give them a negative Φ (`regime="signed"`), and the objective applies a bounded U.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    weight: str | None = None

    @functools.cached_property
    def statistics(self) -> tuple[str, ...]:
        return _positional(self.fn)

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        return _keyword_only(self.fn)


@dataclass(frozen=True)
class DistributionTerm:
    """A differentiable term of the whole next-token distribution, summed over the supervised positions.

    `fn(logprobs, labels, ..., *, <hyperparameters>)` receives, for a chunk of n supervised positions:

    - `logprobs`: `(n, V)` float32 log π_θ(· | y_<t), **with gradient**;
    - `labels`: `(n,)` the observed tokens;
    - further positional parameters by name: `ref_logprobs` (`(n, V)` log-probabilities of the reference, no
      gradient; the trainer then runs the reference's backbone), or any per-token statistic of the vocabulary
      (`priority` for Φ, `logps`, `ref_logps`, a data statistic, ...) as `(n,)` rows, no gradient;

    and returns `(n,)` per-position values. The trainer adds `priority_args[weight] · Σ_t term_t / N` to the loss,
    logs `loss/<name>`, and never builds a `(batch, seq, vocab)` tensor: the logits exist one chunk at a time, inside
    the model's forward (so the LM head is gathered under ZeRO-3 and FSDP), in float32.

    ```python
    def kl_to_reference(logprobs, labels, ref_logprobs):  # KL(π_ref ‖ π_θ) per position
        return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    ```
    """

    name: str
    fn: Callable[..., torch.Tensor]
    weight: str | None = None

    @functools.cached_property
    def inputs(self) -> tuple[str, ...]:
        """Positional parameters after `logprobs` and `labels`."""
        return _positional(self.fn)[2:]

    @functools.cached_property
    def statistics(self) -> tuple[str, ...]:
        """The per-token statistics it reads (everything but the reference distribution)."""
        return tuple(name for name in self.inputs if name != "ref_logprobs")

    @property
    def needs_reference_distribution(self) -> bool:
        return "ref_logprobs" in self.inputs

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        return _keyword_only(self.fn)

    def __call__(
        self,
        logprobs: torch.Tensor,
        labels: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        rows: Mapping[str, torch.Tensor],
        chunk: slice,
        args: Mapping[str, Any],
    ) -> torch.Tensor:
        inputs = [ref_logprobs if name == "ref_logprobs" else rows[name][chunk] for name in self.inputs]
        return self.fn(logprobs, labels, *inputs, **{name: args[name] for name in self.hyperparameters})
