"""Priorities whose objective reads the whole next-token distribution: a Φ plus a `DistributionTerm`.

Φ weights the negative log-likelihood of the observed token, as for every method; the `DistributionTerm` adds what
lives on the rest of the vocabulary (a KL anchor, the off-label part of a soft target). The trainer computes the term
in the package's LM-head pass (`trl_priority.statistics.lm_head`), a chunk of supervised positions at a time, in float32: never
a `(batch, seq, vocab)` tensor. Each term function below sees one chunk:

    logprobs      (n, V)  log π_θ(· | y_<t), with gradient
    labels        (n,)    the observed tokens y_t
    ref_logprobs  (n, V)  log π_ref(· | y_<t), no gradient (None when the configuration reads no reference)

and returns `(n,)` per-position values; the trainer adds `weight · Σ_t term_t / N`, N the supervised-token count.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from trl_priority.objectives import DistributionTerm
from trl_priority.priorities.registry import NonNegative, PriorityError, Probability, Range, register_priority


# ------------------------------------------------------------------------------------------------------------------
# ASFT: DFT anchored to the starting model by a KL term
# ------------------------------------------------------------------------------------------------------------------
def kl_to_reference(logprobs: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) = Σ_v π_ref(v)·(log π_ref(v) − log π_θ(v)) at each position, with gradient through π_θ.

    Exactly the official `F.kl_div(log_softmax(student), softmax(ref), reduction="none").sum(-1)`: the forward KL,
    with the reference as the target distribution; entries with π_ref(v) = 0 count 0, also where log π_θ(v) = −inf
    (where `F.kl_div` alone gives 0·(−inf) = NaN).
    """
    target = ref_logprobs.exp()  # (n, V)
    return torch.where(target > 0, F.kl_div(logprobs, target, reduction="none"), 0.0).sum(-1)  # (n,)


@register_priority(
    regime="soft",
    paper="Zhu et al. 2025, Anchored Supervised Fine-Tuning (ASFT), arXiv 2509.23753",
    loss_terms=(DistributionTerm("kl_anchor", kl_to_reference, weight="kl_weight"),),
)
def asft(logps: torch.Tensor, mask: torch.Tensor, *, kl_weight: NonNegative = 0.1) -> torch.Tensor:
    """ASFT (Anchored SFT): DFT's probability-weighted NLL plus a KL anchor to the starting model.

    Paper: Zhu, Su, Lai, Ma, Zhang, Yang, Chen 2025, "Anchored Supervised Fine-Tuning", arXiv 2509.23753; code
    github.com/zhuchichi56/ASFT, `train_v2.py`, `EnhancedTrainer.compute_loss` (mode "asft").

        Φ_t = sg(p_θ(y_t)) = exp(logps_t)                                       (DFT, arXiv 2508.05629)
        L   = Σ_t [ Φ_t · (−log p_θ(y_t)) + kl_weight · KL(π_ref(·|y_<t) ‖ π_θ(·|y_<t)) ] / N

    The KL runs over the whole vocabulary at every supervised position (the `kl_anchor` term, logged as
    `loss/kl_anchor`, already multiplied by kl_weight), computed in chunks inside the forward.

    Defaults and choices, from the official code:
    - kl_weight = 0.1: `train_v2.py`'s default and `train_v2.sh`'s `KL_WEIGHT`; the README's example command uses 0.05.
    - The KL is forward, KL(π_ref ‖ π_θ) (`F.kl_div(log_softmax(student), softmax(ref))`), at temperature 1.
    - The reference is the model as training starts: under LoRA the base with the adapter switched off (the code's
      `model.disable_adapter()`), for full fine-tuning a frozen copy (the code reloads the starting checkpoint). It
      runs in eval mode here (the code's LoRA reference runs in the policy's train mode; with no dropout in the base,
      as in Llama, the two agree). A `ref_model` or `ref_model_name_or_path` replaces it.
    - Both parts are divided by N, the supervised tokens, as the code divides by its `valid_mask.sum()`; with
      gradient accumulation N counts the whole optimizer step (TRL's `num_items_in_batch`), where the code divides
      each micro-batch by its own count.
    - Against the position paper (Shen et al. 2026, arXiv 2602.01227, Table 1), which lists Anchored SFT among the
      hard selections as Φ = 1[D_KL(P_θ, P_anchor) < δ] (a token kept while the policy stays near the anchor): this
      follows the official code, a soft KL penalty added to the DFT-weighted loss, no token ever masked.
    """
    return logps.exp() * mask  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# Target-SFT: cross-entropy to a designed target Q_t = α_t·δ_{y_t} + (1 − α_t)·A_t
# ------------------------------------------------------------------------------------------------------------------
Trust = Literal["constant", "policy", "reference"]
Prior = Literal["uniform", "reference", "policy", "guided"]


def _log_prior(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, prior: str, eta: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log A_t over the vocabulary, without gradient: `(n, V)`, or `(n, k)` with the indices of the kept entries."""
    if prior == "policy" or (prior == "guided" and eta == 0):
        log_prior = logprobs.detach()  # (n, V)
    elif prior == "reference" or (prior == "guided" and eta == 1):
        log_prior = ref_logprobs  # (n, V)
    else:  # guided: π̃ ∝ π_θ^(1−η) · π_ref^η, normalised
        # 0 < η < 1 here: a −inf log-probability weighted by η or 1 − η stays −inf (at η ∈ {0, 1}, 0·(−inf) is NaN)
        log_prior = ((1 - eta) * logprobs.detach() + eta * ref_logprobs).log_softmax(-1)  # (n, V)
    if top_k <= 0:
        return log_prior, None
    values, index = log_prior.topk(min(top_k, log_prior.size(-1)), dim=-1)  # (n, k)
    return values.log_softmax(-1), index  # renormalised over the k kept entries


def soft_target_cross_entropy(
    logprobs: torch.Tensor,
    labels: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    priority: torch.Tensor,
    *,
    prior: str,
    eta: float,
    top_k: int,
) -> torch.Tensor:
    """(1 − α_t)·H(A_t, π_θ) = −(1 − α_t)·Σ_v A_t(v)·log π_θ(v): the part of H(Q_t, π_θ) off the one-hot.

    α_t is the Φ the trainer weights the NLL with (`priority`, `(n,)`): after warm-up and word/span pooling, so that
    Q_t = α_t·δ_{y_t} + (1 − α_t)·A_t keeps mass 1 whatever the trainer did to Φ (at warm-up weight 0, α_t = 1 and
    the loss is plain SFT). α_t and A_t carry no gradient. Entries with A_t(v) = 0 add 0, also where log π_θ(v) = −inf.
    """
    trust = priority.detach()  # (n,)
    if prior != "uniform":
        with torch.no_grad():
            log_prior, index = _log_prior(logprobs, ref_logprobs, prior, eta, top_k)  # (n, V) or (n, k)
    if prior == "uniform":
        cross = -logprobs.mean(-1)  # (n,): A = 1/V everywhere
    else:
        target = logprobs if index is None else logprobs.gather(1, index)  # (n, V) or (n, k)
        weights = log_prior.exp()
        cross = -torch.where(weights > 0, weights * target, 0.0).sum(-1)  # (n,): 0·(−inf) counts 0
    return torch.where(trust < 1, (1 - trust) * cross, 0.0)  # (n,): α_t = 1 is SFT, even where H(A_t, π_θ) = inf


def _reads_reference(args: dict) -> bool:
    return args["alpha"] == "reference" or args["prior"] in ("reference", "guided")


def _check_target_sft(args: dict) -> None:
    if args["top_k"] > 0 and args["prior"] == "uniform":
        raise PriorityError(
            "priority_args for 'target_sft': top_k keeps the k most likely entries of the prior A_t, but a uniform "
            "prior has no most likely entries. Set top_k=0, or a prior of 'reference', 'policy' or 'guided'."
        )


@register_priority(
    regime="soft",
    paper="Xie, Ban, Hong, An, Chen, Hsieh 2026, A Unifying Lens on SFT Through Target Distribution Design "
    "(Target-SFT), arXiv 2606.11189",
    loss_terms=(DistributionTerm("soft_target", soft_target_cross_entropy),),
    uses_reference=_reads_reference,
    validate=_check_target_sft,
)
def target_sft(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    alpha: Trust = "policy",
    alpha_value: Probability = 0.9,
    prior: Prior = "guided",
    eta: Probability = 0.5,
    top_k: Annotated[int, Range(0, None)] = 0,
) -> torch.Tensor:
    """Target-SFT: cross-entropy to a designed target Q_t that trusts the observed token by α_t and spreads the rest.

    Paper: Xie, Ban, Hong, An, Chen, Hsieh 2026, "A Unifying Lens on Supervised Fine-Tuning Through Target
    Distribution Design", arXiv 2606.11189; project page txie1.github.io/Target-SFT. No official code was found in public repositories.

        Q_t = α_t · δ_{y_t} + (1 − α_t) · A_t                       (the Q-target, stop-gradient)
        L   = Σ_t H(Q_t, π_θ) / N
            = Σ_t [ α_t · (−log π_θ(y_t)) + (1 − α_t) · H(A_t, π_θ) ] / N

    Here Φ_t = α_t weights the NLL of the observed token, and the `soft_target` term adds (1 − α_t)·H(A_t, π_θ) =
    −(1 − α_t)·Σ_v A_t(v)·log π_θ(v) over the whole vocabulary, computed in chunks inside the forward (logged as
    `loss/soft_target`). The gradient with respect to the logits is π_θ − Q_t. The term reads α_t as the trainer's
    Φ (`priority`), after `priority_warmup_ratio` and `priority_granularity` pooling: Q_t's mass stays 1, and at
    warm-up weight 0 (α_t = 1) the loss is plain SFT, not SFT plus (1 − α_t)·H(A_t, π_θ).

    Trust α_t (`alpha`):
        "constant"   α_t = alpha_value
        "policy"     α_t = sg(p_θ(y_t))        (the project page's Target-SFT: γ_t = p_θ(y_t), stop-gradient)
        "reference"  α_t = p_ref(y_t)
    Prior A_t over the vocabulary (`prior`), never with gradient:
        "uniform"    A_t = 1/V
        "reference"  A_t = π_ref(· | y_<t)
        "policy"     A_t = sg(π_θ(· | y_<t))
        "guided"     A_t = π̃ ∝ sg(π_θ)^(1−η) · π_ref^η, normalised  (the project page's Target-SFT)
    `top_k` > 0 keeps the k largest entries of A_t, renormalised (0: the whole vocabulary).

    Special cases (the methods the project page's table lists; the α, A and scale of the last two are derived here
    from the page's Q = π_θ − ∂L/∂z, with p_t = p_θ(y_t)):
        SFT                          alpha="constant", alpha_value=1                (any prior; the term is 0)
        label smoothing ε            alpha="constant", alpha_value=1−ε, prior="uniform"
        DFT (arXiv 2508.05629)       alpha="policy", prior="policy": H(sg(π_θ), π_θ) has zero gradient, so the
                                     gradient is sg(p_t)·∇NLL (the loss value adds (1 − p_t)·entropy)
        KD / self-distillation       alpha="constant", alpha_value=0, prior="reference": H(π_ref, π_θ), whose gradient
                                     is that of KL(π_ref ‖ π_θ); a separate teacher is `ref_model`
        SFT + λ·KL(π_ref ‖ π_θ)      Q_t = (δ + λ·π_ref)/(1 + λ), gradient scaled by 1 + λ: alpha="constant",
                                     alpha_value=1/(1+λ), prior="reference", up to that constant factor
        ASFT (arXiv 2509.23753)      Q_t = (p_t·δ + λ·π_ref)/(p_t + λ), gradient scaled by p_t + λ, a per-token
                                     factor: not a configuration here; see the `asft` method

    Defaults: alpha="policy", prior="guided", the project page's Target-SFT. eta = 0.5 is our choice: the page gives
    no default, and section 6 of the paper (Target-SFT itself) could not be read. alpha_value = 0.9 (only used with
    "constant") is label smoothing's usual ε = 0.1. Assumptions, not confirmed from the paper: Q_t carries no gradient
    (α_t and A_t are stop-gradient, as γ_t is on the page); the page's "teacher" is the frozen reference, by default
    the starting model (LoRA: the base with the adapter off; full fine-tuning: a frozen copy). A separate teacher
    sharing the policy's tokenizer can be given with `ref_model` or `ref_model_name_or_path`. Configurations that
    read no reference (alpha "constant"/"policy" with prior "uniform"/"policy") run none.

    Cost: the package's LM-head pass (`trl_priority.statistics.lm_head`) serves the forward: it projects the policy's head
    twice per supervised position (statistics, then Φ, then the loss with its gradient; TRL's fused head also
    projects twice, in its forward and its backward) and the reference's once for the term. Φ's signature reads
    `ref_logps` (used only by alpha="reference"), which must be known before Φ, so when the configuration reads the
    reference its head runs once more, in the statistics loop. Under LoRA the reference backbone is the same network
    with the adapter off.
    """
    if alpha == "constant":
        trust = torch.full_like(logps, alpha_value)  # (B, T-1)
    elif alpha == "policy":
        trust = logps.exp()  # (B, T-1)
    else:
        trust = ref_logps.exp()  # (B, T-1)
    return trust * mask  # (B, T-1)
