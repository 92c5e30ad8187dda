"""Priorities that follow training: a schedule over training progress, or a history of each token kept in state.

- `entrodrop` reads `progress` through its selection: the share of low-entropy tokens it drops grows over training.
- `t3s` reads `state`: each token's confidence at its first visit, its visit count, and a once-decided anchor flag,
  kept across steps and checkpoints (`trl_priority.statistics.state.TokenState`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch

from trl_priority.priorities.registry import PriorityError, Probability, Range, register_priority
from trl_priority.priorities.selection import TopFraction
from trl_priority.statistics.state import TokenState


# ------------------------------------------------------------------------------------------------------------------
# EntroDrop
# ------------------------------------------------------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # σ(x), without overflow for large |x|


def entrodrop_drop_rate(progress: float, *, max_drop: float, steepness: float, midpoint: float) -> float:
    """r(s) = r_max · (σ(k(s − m)) − σ(−k·m)) / (σ(k(1 − m)) − σ(−k·m)): a sigmoid rescaled to r(0) = 0, r(1) = r_max.

    s = `progress` in [0, 1] (clamped), r_max = `max_drop`, k = `steepness` (> 0), m = `midpoint`.
    """
    s = min(1.0, max(0.0, float(progress)))
    low, high = _sigmoid(-steepness * midpoint), _sigmoid(steepness * (1.0 - midpoint))
    return max_drop * (_sigmoid(steepness * (s - midpoint)) - low) / (high - low)


def _entrodrop_kept_fraction(args: Mapping[str, Any], progress: float) -> float:
    """1 − r(progress): the share of supervised tokens EntroDrop keeps at this point of training (all of them for the
    `bernoulli` variant, which draws its own)."""
    if args["variant"] == "bernoulli":
        return 1.0
    rate = entrodrop_drop_rate(
        progress, max_drop=args["max_drop"], steepness=args["steepness"], midpoint=args["midpoint"]
    )
    return 1.0 - rate


_PRIME = 2_147_483_647  # 2^31 − 1: every intermediate below stays under 2^62, so int64 never overflows


def hashed_uniform(keys: tuple[torch.Tensor, ...], seed: int) -> torch.Tensor:
    """A number in [0, 1) per element, a deterministic function of the integer `keys` (same shape) and `seed`.

    Keyed by a token's identity and the training step, not drawn from a generator: the same token at the same step
    gets the same draw whatever the batch layout (padding, packing, number of processes) and after a resume. The mix
    is a Lehmer multiplication modulo 2^31 − 1 followed by a xor-shift, twice per key; its mean is checked against the
    closed form in the tests.
    """
    mixed = torch.full_like(keys[0], seed % _PRIME + 1, dtype=torch.int64)
    for key in keys:
        mixed = (mixed * 1_103_515_245 + key.to(torch.int64) % _PRIME) % _PRIME
        for _ in range(2):
            mixed = (mixed * 48_271) % _PRIME
            mixed = mixed ^ (mixed >> 15)  # stays below 2^31
    return mixed.double() / _PRIME


def entrodrop_bernoulli(
    entropy: torch.Tensor,
    example_index: torch.Tensor,
    token_position: torch.Tensor,
    progress: torch.Tensor,
    *,
    entropy_scale: float,
    seed: int,
) -> torch.Tensor:
    """Φ_t ~ Bernoulli(1 − exp(−λ·H_t)), λ = `entropy_scale`, drawn from the token's identity and the step.

    The step enters through the bits of `progress` (global_step / max_steps, exact in float32 for the same run), so a
    token draws afresh at every step (and every epoch) and a resumed run draws what the uninterrupted one would have.
    """
    keep = -torch.expm1(-entropy_scale * entropy.clamp(min=0))  # (B, T-1): 1 − e^{−λH}
    step = progress.float().reshape(()).view(torch.int32).to(torch.int64).expand(entropy.shape)
    draw = hashed_uniform((example_index.long(), token_position.long(), step), seed)  # (B, T-1) in [0, 1)
    return (draw < keep.double()).float()  # (B, T-1)


def _check_entrodrop(args: dict) -> None:
    if args["variant"] == "bernoulli" and args["scope"] == "step":
        raise PriorityError(
            "priority_args for 'entrodrop': `scope: step` selects a top fraction over the optimizer step, which the "
            "`bernoulli` variant does not (it draws each token from its own entropy). Leave `scope` unset."
        )


def policy_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The selection score of EntroDrop: H(π_θ(· | y_<t)), the full-vocabulary entropy; higher is kept."""
    return entropy * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Wang, Hu et al. 2025, Entropy-Guided Token Dropout (EntroDrop), arXiv 2512.23422",
    selection=TopFraction(policy_entropy, fraction=_entrodrop_kept_fraction, scope="scope"),
    signal_switch=True,
    validate=_check_entrodrop,
)
def entrodrop(
    selected: torch.Tensor,
    entropy: torch.Tensor,
    example_index: torch.Tensor,
    token_position: torch.Tensor,
    progress: torch.Tensor,
    mask: torch.Tensor,
    *,
    variant: Literal["top_fraction", "bernoulli"] = "top_fraction",
    max_drop: Annotated[float, Range(0, 1, high_open=True)] = 0.5,
    steepness: Annotated[float, Range(0, None, low_open=True)] = 10.0,
    midpoint: Probability = 0.5,
    scope: Literal["micro_batch", "step"] = "micro_batch",
    entropy_scale: Annotated[float, Range(0, None, low_open=True)] = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """EntroDrop: drop the lowest-entropy (most predictable) tokens, more of them as training goes on.

    Paper: Wang, Hu, Gao et al. 2025, "Entropy-Guided Token Dropout: Training Autoregressive Language Models with
    Limited Domain Data", arXiv 2512.23422 (Renmin University). Only its abstract and secondary summaries were at
    hand: low-entropy tokens are masked out of the loss, and the masking strength ramps up over training following a
    sigmoidal curriculum, for multi-epoch training on scarce domain data. No official code was found. The position
    paper (Shen et al. 2026, arXiv 2602.01227, Table 1, soft-reweighting rows) writes EntroDrop differently, as a
    stochastic keep, Φ_t ~ Bernoulli(1 − e^{−λ·H_t}), with no schedule and no λ given: that reading is the
    `variant: bernoulli` below. The default follows the EntroDrop abstract's curriculum instead; its formula and
    every default below are OURS, not the paper's:

        H_t   = H(π_θ(· | y_<t)) = −Σ_v π_θ(v) log π_θ(v)              (the fused-head `entropy` statistic)
        s     = progress = global_step / max_steps  ∈ [0, 1)
        r(s)  = r_max · (σ(k(s − m)) − σ(−k·m)) / (σ(k(1 − m)) − σ(−k·m))   (`entrodrop_drop_rate`)
        Φ_t   = 1[t is among the top round(n · (1 − r(s))) supervised tokens by H_t]   (n tokens of the batch)

    The sigmoid is rescaled so that nothing is dropped at the start (r(0) = 0) and r_max at the end (r(1) = r_max);
    r(m) is half-way only for m = 0.5. Defaults (ours): r_max = `max_drop` = 0.5, k = `steepness` = 10,
    m = `midpoint` = 0.5, `scope` = "micro_batch".

    Choices (ours): the score is the policy's own entropy at the current step (no reference model); the drop is a
    deterministic top-fraction selection (k = round(n · (1 − r)) half up, at least 1, ties broken by position), not a
    random per-token dropout; `scope="micro_batch"` selects within each micro-batch on each process from the
    training forward itself (no extra pass), `scope="step"` over every micro-batch of the optimizer step and every
    process (one extra no-grad scoring forward per micro-batch). Dropped tokens get Φ = 0 and the loss is divided by
    all supervised tokens, like every method here, not by the kept ones.

    `variant: bernoulli` (the position paper's Table 1 form):

        Φ_t ~ Bernoulli(1 − e^{−λ·H_t}),   λ = `entropy_scale` = 1 per nat (ours: the table gives no value)

    so E[Φ_t] = 1 − e^{−λH_t}: a token of entropy ln 2 is kept half the time, a near-certain one almost never. The
    draw is a deterministic function of `seed`, the token's identity (`example_index`, `token_position`) and the
    step (`entrodrop_bernoulli`): reproducible, resumable, and independent of batching; a token draws afresh at each
    step. `max_drop`, `steepness` and `midpoint` do not apply (the table has no schedule), nor `scope: step`.
    Both variants read the identity columns, which the trainer generates.
    """
    if variant == "bernoulli":
        drawn = entrodrop_bernoulli(
            entropy, example_index, token_position, progress, entropy_scale=entropy_scale, seed=seed
        )
        return drawn * mask  # (B, T-1)
    return selected.float() * mask  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# T3S
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="hard",
    paper="Shen et al. 2026, Training-Trajectory-Aware Token Selection (T3S), arXiv 2601.10348 (ICML 2026)",
)
def t3s(
    logps: torch.Tensor,
    state: TokenState,
    mask: torch.Tensor,
    *,
    threshold: float = 0.0,
    decide_at_visit: Annotated[int, Range(2, None)] = 2,
) -> torch.Tensor:
    """T3S: stop training on the Imitation-Anchor tokens, whose confidence rose early; train the yet-to-learn ones.

    Paper: Shen, Hu, Qin et al. 2026, "Training-Trajectory-Aware Token Selection", arXiv 2601.10348 (ICML 2026).
    No official code was found; this follows the paper's description:

        c_t(θ) = log p_θ(y_t | y_<t, x)
        A      = {t : c_t(θ_b) − c_t(θ_0) > 0}      θ_0 the base model, θ_b the "imitation bottleneck" checkpoint
        Φ_t    = 0 if t ∈ A else 1                   (A computed once, then static)

    In the paper θ_b is found by a first, standard SFT run (the saved checkpoint with the lowest training accuracy),
    then training restarts from θ_0 with the anchors masked; an online variant switches to the masked loss once the
    bottleneck is detected. The threshold on the confidence gain is exactly 0 in the paper.

    This is an online version in one run, keyed by each token's identity in the `state` (`TokenState`):

        visit 1 (the token's first time in training):  store first_logps = c_t(θ at that step);  Φ_t = 1
        visit v = `decide_at_visit` (default 2):        anchor_t = 1[c_t(θ now) − first_logps > threshold], stored
                                                        once and never changed
        visits ≥ `decide_at_visit`:                     Φ_t = 1 − anchor_t

    Choices (ours, against the paper): no separate first run and no restart from θ_0: the policy keeps training;
    c_t(θ_0) is approximated by the confidence at the token's first visit (exact for tokens seen in the first step,
    otherwise after up to one epoch of training); θ_b is approximated by the model at the token's second visit, i.e.
    after about one epoch of SFT (between one and two with shuffling), instead of the checkpoint with the lowest
    training accuracy, which needs a verifier of the answers. A token with no stored first confidence is never an
    anchor. `threshold` = 0 is the paper's; `decide_at_visit` = 2 (decide at the first revisit) is ours. The method
    needs at least `decide_at_visit` epochs to change anything. Visits are counted per training forward (every
    micro-batch a token is in); evaluation and `token_priorities` read the state without writing it.
    """
    visits = state.get("visits", default=0.0) + 1  # (B, T-1): the number of this visit
    first = state.get("first_logps")  # (B, T-1), NaN before the first visit
    anchor = state.get("anchor")  # (B, T-1): 1 anchor, 0 not, NaN undecided
    state.set("first_logps", logps, where=mask & first.isnan())
    decide = mask & anchor.isnan() & (visits >= decide_at_visit) & ~first.isnan()  # (B, T-1)
    gained = ((logps - first) > threshold).float()  # (B, T-1); NaN - anything compares False
    state.set("anchor", gained, where=decide)
    anchor = torch.where(decide, gained, anchor)  # (B, T-1)
    state.set("visits", visits, where=mask)
    return torch.where(anchor == 1, 0.0, 1.0) * mask  # (B, T-1): undecided (NaN) tokens train
