"""Intrinsic priorities: Φ computed from the policy's own per-token statistics, no reference and no data labels.

Every function here is pure: per-token tensors in, Φ out, shapes `(B, T-1)`. The trainer calls them under
`torch.no_grad()`, so Φ is a stop-gradient weight (sg(·) in the formulas).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch

from trl_priority.priorities.registry import NonNegative, PriorityError, Probability, Range, register_priority


@register_priority(regime="hard", paper="standard supervised fine-tuning (maximum likelihood)")
def sft(mask: torch.Tensor) -> torch.Tensor:
    """Plain SFT: every supervised token has weight 1.

    Φ_t = 1. The loss is then exactly TRL's `SFTTrainer` negative log-likelihood.
    """
    return mask.float()  # (B, T-1)


@register_priority(
    regime="soft", paper="Wu et al. 2025, On the Generalization of SFT (DFT), arXiv 2508.05629", signal_switch=True
)
def dft(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DFT (Dynamic Fine-Tuning): weight each token by its own probability under the current policy.

    Paper: Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
    Rectification", arXiv 2508.05629, Eq. 9; code github.com/yongliang-wu/DFT.

        Φ_t = sg(p_θ(y_t)) = exp(logps_t)

    Normalised, like every method here, by the supervised-token count; this is TRL's `loss_type="dft"` exactly.
    With `signal="reference"` the weight is the frozen reference's probability, exp(ref_logps): PriFT-prob.

    Against the position paper (Shen et al. 2026, arXiv 2602.01227, Table 1): the table writes DFT as inverse
    probability weighting, Φ = 1 − P_θ(x). This follows DFT's own paper and code instead, Φ = sg(P_θ): DFT multiplies
    the NLL by the token's (stop-gradient) probability, which down-weights unlikely tokens, the opposite of 1 − P_θ.
    """
    return logps.exp() * mask  # (B, T-1)


def _check_profit_thresholds(args: dict) -> None:
    if args["strategy"] == "middle" and not args["tau"] < args["tau_upper"]:
        raise PriorityError(
            f"priority_args for 'profit': strategy='middle' keeps tau < p < tau_upper, so tau ({args['tau']}) must be "
            f"below tau_upper ({args['tau_upper']})."
        )


@register_priority(
    regime="hard",
    paper="Liu et al. 2026, ProFit, arXiv 2601.09195 (Findings of ACL 2026)",
    validate=_check_profit_thresholds,
    signal_switch=True,
)
def profit(
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: Probability = 0.1,
    strategy: Literal["higher", "lower", "middle"] = "higher",
    tau_upper: Probability = 0.7,
) -> torch.Tensor:
    """ProFit: train only on tokens the policy already finds likely; low-probability tokens are mostly style.

    Paper: Liu et al. 2026, "ProFit: Leveraging High-Value Signals in SFT via Probability-Guided Token Selection",
    arXiv 2601.09195, Eq. 4-5; code github.com/Utaotao/ProFit (`_profit_cross_entropy`).

        p_t = sg(p_θ(y_t))
        higher (the method):  Φ_t = 1[p_t > tau]                 tau = 0.1
        lower  (ablation):    Φ_t = 1[p_t < tau]
        middle (ablation):    Φ_t = 1[tau < p_t < tau_upper]     e.g. tau = 0.3, tau_upper = 0.7

    Choices: the inequalities are strict, as in the paper ("strictly enforcing p > τ"); the official code keeps
    p ≥ τ, which differs only on exact ties. The code's "random" ablation is not included. The loss is divided by
    all supervised tokens (the paper's 1/T), not by the kept ones.
    """
    probs = logps.exp()  # (B, T-1)
    if strategy == "higher":
        keep = probs > tau
    elif strategy == "lower":
        keep = probs < tau
    else:
        keep = (probs > tau) & (probs < tau_upper)
    return (keep & mask).float()  # (B, T-1)


@register_priority(
    regime="soft",
    paper="Diao et al. 2026, Entropy-Adaptive Fine-Tuning (EAFT), arXiv 2601.02151",
    signal_switch=True,
)
def eaft(
    topk_entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: Annotated[int, Range(2, None)] = 20,
    alpha: NonNegative = 1.0,
) -> torch.Tensor:
    """EAFT: down-weight tokens the policy is confident about ("confident conflicts"), keep uncertain ones.

    Paper: Diao et al. 2026, "Entropy-Adaptive Fine-Tuning: Resolving Confident Conflicts to Mitigate Forgetting",
    arXiv 2601.02151, Eq. 2-3; authors' code merged as LLaMA-Factory `_eaft_cross_entropy`.

        p̃_t = softmax over the k largest next-token logits of π_θ     (renormalised top-k, k = 20)
        H_t  = −Σ_i p̃_t,i log p̃_t,i                                 (the `topk_entropy` statistic)
        Φ_t  = (H_t / ln k)^alpha                                     alpha = 1

    Φ is in [0, 1]. Choices: the paper's normaliser ln k is used exactly; the authors' code writes it as the constant
    3.0 (≈ ln 20 = 2.996, a 0.14% difference). alpha generalises the paper's ablation exponent (EAFT², EAFT³).
    Needs the full next-token distribution: computed in chunks of positions, never as (batch, seq, vocab).
    """
    return (topk_entropy / math.log(k)).clamp(min=0).pow(alpha) * mask  # (B, T-1)
