"""The objective: Φ-weighted likelihood, bounded unlearning for negative Φ, and the extra terms methods declare.

    L = [ Σ_{t: Φ_t ≥ 0} Φ_t · (−log π_θ(y_t))  +  Σ_{t: Φ_t < 0} |Φ_t| · U(π_θ(y_t)) ] / N
        + Σ_terms w_term · Σ_t term_t / N

N is TRL's own denominator (`num_items_in_batch`): every supervised token of the optimizer step, across
gradient-accumulation steps and processes, each token counted once whatever its sign. Sparse or signed Φ therefore
never changes the effective learning rate behind the user's back.

U, the loss on a token to unlearn, is set by `PrioritySFTConfig.negative_loss`:

| `negative_loss`   | U(p)                | gradient on the logits z     | pushes hardest on   | bounded below |
|-------------------|---------------------|------------------------------|---------------------|---------------|
| `"unlikelihood"`  | −log(1 − p)         | p·(e_y − q), ‖·‖₁ = 2p ≤ 2    | confident tokens    | yes, by 0     |
| `"ascent"`        | log p               | e_y − π, ‖·‖₁ = 2(1 − p) ≤ 2  | unlikely tokens     | no (→ −∞)     |

(p = π_θ(y_t), e_y the one-hot of the label, q the policy renormalised over the other tokens, q_v = π_v / (1 − p).)

Unlikelihood (Welleck et al. 2020, arXiv 1908.04319) is the default: once a token is unlikely it stops pushing, so many
negative tokens cannot drive the loss to −∞ or wreck the model. Plain gradient ascent on the NLL is what some papers
write (Forgetting's official code); it is there only when asked for. The two push on opposite ends: unlikelihood's
logit gradient grows with p (a confidently wrong token, the "confident hallucination" that `forgetting`, `ignorance`
and a negative `verifier` weight exist to unlearn, gets the full push, ≈ 2 in L1, and a token already unlikely gets
none), ascent's with 1 − p (it keeps pushing down tokens that are already unlikely and barely moves a confident one).
For `forgetting`, whose negatives are the tokens with the lowest excess loss L_θ − L_ref (those the policy already
predicts better than the reference, often confidently), unlikelihood spends its push on the ones still likely and
lets go of each once unlikely, while the paper's ascent keeps pushing hardest on those it has already made unlikely,
with no floor on the loss: the reason `forgetting` defaults to unlikelihood and offers ascent only when asked.

How U is computed, and why its gradient is bounded. From log p alone, log(1 − p) is lost once p rounds to 1 (float32
rounds log p = z_y − logsumexp z to 0.0 once 1 − p is below the resolution of the log-sum-exp, about 1e-6 for
logits near 10), and its gradient with respect to log p, p/(1 − p),
explodes just below. The trainer therefore computes it from the logits, in the LM-head pass (`unlikelihood_term`, a
`DistributionTerm` the trainer adds for every signed method, at the positions with Φ < 0 only):

    log(1 − p_y) = logsumexp_{v≠y} z_v − logsumexp_v z_v

in float32, which is exact for every p < 1 representable by the logits, and whose gradient p·(e_y − q) is computed
from two softmaxes, never from 1 − p. That gradient is bounded by construction: its L1 norm is 2p ≤ 2, the NLL's own
bound, so a confident negative token weighs in a clipped step as much as a badly predicted positive one and never
more; no clamp is needed. The loss value −log(1 − p) still grows (linearly in the logit margin) as p → 1; only its
slope is bounded. `unlikelihood(logps)` keeps a form from log p for callers that have nothing else (see there).

Two kinds of extra terms, added by the trainer without knowing the method:
- `LossTerm`: a function of per-token statistics (`(B, T-1)` each; `logps` and `entropy` keep their gradient).
- `DistributionTerm`: a function of the whole next-token distribution at each supervised position, `(n, V)`
  log-probabilities with gradient, computed in chunks by the package's LM-head pass (a KL anchor, a soft target).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trl_priority.signatures import hyperparameter_names, statistic_parameters


NegativeLoss = Literal["unlikelihood", "ascent"]


# Beyond p = 1 − UNLIKELIHOOD_LINEAR_FROM, `unlikelihood(logps)` continues linearly in log p (see there)
UNLIKELIHOOD_LINEAR_FROM = 1e-3


def log1m_p(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(1 − p_y) = logsumexp_{v≠y} z_v − logsumexp_v z_v for rows of logits (or log-probabilities) `(n, V)`.

    Stable for every p_y: 1 − p_y is never formed, so a confident label (p_y = 1 − 1e-8 in float32, where log p_y
    rounds to 0) keeps its exact value, and autograd's gradient, p_y·(e_y − q) with q the softmax over the other
    tokens, comes from two softmaxes. Shift-invariant in each row. Returns `(n,)`.
    """
    others = logits.scatter(1, labels[:, None], float("-inf"))  # (n, V): the label left out
    return others.logsumexp(-1) - logits.logsumexp(-1)  # (n,)


def unlikelihood_term(logprobs: torch.Tensor, labels: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """|Φ_t|·U(p_t) = −|Φ_t|·log(1 − p_θ(y_t)) on the tokens with Φ_t < 0, from a chunk's logits: `(n,)`.

    The `DistributionTerm` through which the trainer applies `negative_loss="unlikelihood"` to a signed method (module
    docstring): its per-token logit gradient is |Φ_t|·p_t·(e_y − q), of L1 norm 2·|Φ_t|·p_t ≤ 2·|Φ_t|.
    """
    weight = (-priority).clamp(min=0)  # (n,): |Φ| on the tokens to unlearn, 0 elsewhere
    unlearn = -log1m_p(logprobs, labels)  # (n,)
    return torch.where(weight > 0, weight * unlearn, 0.0)  # (n,); `where`: an infinite U off the negatives stays out


def unlikelihood(logps: torch.Tensor) -> torch.Tensor:
    """U(p) = −log(1 − p) from log p alone, continued linearly in log p beyond p = 1 − δ, δ = 1e-3.

    For callers that have only log p (the trainer computes U from the logits instead: `unlikelihood_term`). From log p
    the gradient dU/dlog p = p/(1 − p) explodes as p → 1 and float32 loses 1 − p altogether, so beyond p = 1 − δ
    (U = 6.9) U continues along its tangent: slope (1 − δ)/δ, the value and slope continuous. The push never stops
    (no flat region, unlike a clamp) and its logit gradient, slope·(e_y − π), has L1 norm ≤ 2·(1 − δ)·(1 − p)/δ ≤ 2.
    """
    delta = UNLIKELIHOOD_LINEAR_FROM
    edge = math.log1p(-delta)  # log p where the tangent takes over
    inside = logps.clamp(max=edge)
    # log(1 − p) = log(−expm1(log p)): exact for p near 0, where 1 − exp(log p) would cancel
    exact = -torch.log(-torch.expm1(inside))
    tangent = -math.log(delta) + (1 - delta) / delta * (logps - edge)
    return torch.where(logps > edge, tangent, exact)


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
        negative_loss: U for the tokens with Φ < 0 (see the module docstring); "unlikelihood" from `logps` here
            (`unlikelihood`). The trainer passes only Φ ≥ 0 when it unlearns in the LM-head pass (`unlikelihood_term`).
    """
    positive = priority.clamp(min=0)  # (B, T-1)
    per_token_loss = -logps * positive  # (B, T-1)
    negative = (-priority).clamp(min=0)  # (B, T-1): |Φ| where Φ < 0
    if bool((negative > 0).any()):
        # Positions without a negative Φ (ignored labels among them) are replaced before U sees them, so that no
        # clamp or infinity there can reach the gradient through the `where`
        safe_logps = torch.where(negative > 0, logps, -1.0)  # (B, T-1)
        if negative_loss == "ascent":
            unlearn = safe_logps  # −(−log p): gradient ascent on the NLL
        else:
            unlearn = unlikelihood(safe_logps)
        per_token_loss = per_token_loss + torch.where(negative > 0, negative * unlearn, 0.0)
    return per_token_loss.sum() / torch.as_tensor(num_items).clamp(min=1)


def weighted_nll(logps: torch.Tensor, priority: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Σ_t Φ_t · (−logps_t) / N, for a non-negative Φ (kept for code written against the first API)."""
    return priority_loss(logps, priority, num_items)


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
        return statistic_parameters(self.fn)

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        return hyperparameter_names(self.fn)


@dataclass(frozen=True)
class DistributionTerm:
    """A differentiable term of the whole next-token distribution, summed over the supervised positions.

    `fn(logprobs, labels, ..., *, <hyperparameters>)` receives, for a chunk of n supervised positions:

    - `logprobs`: `(n, V)` float32 log π_θ(· | y_<t), **with gradient**;
    - `labels`: `(n,)` the observed tokens;
    - further positional parameters by name: `ref_logprobs` (`(n, V)` log-probabilities of the reference, no
      gradient; the trainer then runs the reference's backbone), or any per-token statistic of the vocabulary
      (`priority` for Φ, `logps`, `ref_logps`, a data statistic, ...) as `(n,)` rows, no gradient;

    A term that reads `priority` or a policy statistic gets the values of the same forward: the package's LM-head pass
    (`trl_priority.statistics.lm_head`) computes the statistics, then the trainer's Φ, then the Φ-weighted NLL and every term
    with their gradient (the policy's head projected twice, as TRL's fused head does; a reference whose statistics
    come from its distribution projects its head once more). It returns `(n,)` per-position values. The trainer adds
    `priority_args[weight] · Σ_t term_t / N` to the loss, logs `loss/<name>`, and never builds a
    `(batch, seq, vocab)` tensor: the logits exist one chunk at a time, inside the model's forward (so the LM head is
    gathered under ZeRO-3 and FSDP), in float32.

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
        return statistic_parameters(self.fn)[2:]

    @functools.cached_property
    def statistics(self) -> tuple[str, ...]:
        """The per-token statistics it reads (everything but the reference distribution)."""
        return tuple(name for name in self.inputs if name != "ref_logprobs")

    @property
    def needs_reference_distribution(self) -> bool:
        return "ref_logprobs" in self.inputs

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        return hyperparameter_names(self.fn)

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


# The term through which the trainer applies the default `negative_loss` to a signed method, computed in the LM-head
# pass at the positions with Φ < 0 (logged as `loss/unlikelihood`)
UNLIKELIHOOD_TERM = DistributionTerm("unlikelihood", unlikelihood_term)


def priority_objective(
    priority,
    outputs,
    phi: torch.Tensor,
    statistics: Mapping[str, Any],
    request,
    num_items_in_batch,
    step_args: Mapping[str, Any],
    negative_loss: NegativeLoss,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss for one micro-batch, before the trainer's process and MoE adjustments: the Φ-weighted NLL
    (`priority_loss`, or the LM-head pass's `request.objective` when it served the forward), plus the declared
    per-token terms, each Σ_t term_t / N, with N `num_items_in_batch` (TRL's step-wide count) or this batch's
    supervised tokens.

    Returns `(loss, term_values)`: `term_values` maps `loss/<term>` to each term's detached value, the distribution
    terms' (computed in the LM-head pass, in `request.objective` already) included, for the log.
    """
    num_items = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    denominator = torch.as_tensor(num_items).clamp(min=1)
    # The negatives' unlikelihood, when the method is signed, is a term computed from the logits (below)
    if request.objective is not None:
        # The package's LM-head pass computed the Φ-weighted NLL (and the distribution terms) with its gradient
        if any(name in ("logps", "entropy") for term in priority.token_terms for name in term.statistics):
            raise NotImplementedError(
                f"Priority '{priority.name}' has a per-token loss term reading `logps` or `entropy` with "
                "gradient, and reads the whole next-token distribution, whose LM-head pass gives them without "
                "gradient: such a term is not supported yet."
            )
        loss = request.objective / denominator
    else:
        loss = priority_loss(outputs.log_probs, phi, num_items, negative_loss)

    # Declared extra terms, generically. Per-token terms: statistics (logps and entropy with gradient) and Φ
    term_inputs = {**statistics, "logps": outputs.log_probs, "entropy": outputs.entropy, "priority": phi}
    term_values = {}
    for term in priority.token_terms:
        per_token = term.fn(
            *(term_inputs[name] for name in term.statistics),
            **{name: step_args[name] for name in term.hyperparameters},
        )  # (B, T-1)
        weight = 1.0 if term.weight is None else step_args[term.weight]
        term_loss = weight * per_token.sum() / denominator
        term_values[f"loss/{term.name}"] = term_loss.detach()
        loss = loss + term_loss
    # Distribution terms, computed in the LM-head pass (in `request.objective` already): their logged values
    for term, weight in zip(request.terms, request.term_weights):  # the same terms on every process
        term_values[f"loss/{term.name}"] = weight * request.term_values[term.name].sum() / denominator
    return loss, term_values
