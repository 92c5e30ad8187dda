"""Soft reweighting priorities (Φ ≥ 0) from the policy's uncertainty or from a teacher's judgement.

- `entropy`: up-weight the high-entropy "forking" tokens (arXiv 2506.01939), mean weight 1 over the batch.
- `selectkd`: a teacher (the reference) verifies each target token; accepted tokens train, rejected ones are masked or
  down-weighted (arXiv 2510.24021).
- `swift`: a sigmoid of the gap between the policy's and the teacher's probability of the token (SWiFt, as tabulated
  by arXiv 2602.01227; from Le et al., NeurIPS 2025).
- `srft`: SRFT's entropy-aware weight on the demonstration (SFT) loss, sg(exp(−H)) (arXiv 2506.19767).

Every function here is pure: per-token tensors in, Φ out, shapes `(B, T-1)`. The trainer calls them under
`torch.no_grad()`, so Φ is a stop-gradient weight (sg(·) in the formulas).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch

from trl_priority.priorities.registry import (
    Fraction,
    NonNegative,
    PriorityError,
    Probability,
    Range,
    register_priority,
)
from trl_priority.priorities.selection import TopFraction


def _supervised_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the supervised tokens of the whole batch (0-dim); 0 when no token is supervised."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)  # ()


# ------------------------------------------------------------------------------------------------------------------
# Entropy: the high-entropy minority ("forking" tokens)
# ------------------------------------------------------------------------------------------------------------------
def token_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The selection score of `entropy` with mode="top": H(π_θ(· | y_<t)); higher is kept."""
    return entropy * mask  # (B, T-1)


def _entropy_kept_fraction(args: Mapping[str, Any], progress: float) -> float:
    return args["ratio"] if args["mode"] == "top" else 1.0


def _check_entropy_args(args: dict) -> None:
    if args["mode"] == "power" and args["scope"] == "step":
        raise PriorityError(
            "priority_args for 'entropy': scope='step' selects the top `ratio` over the optimizer step, which only "
            "mode='top' does; mode='power' weights every token and needs no selection. Use scope='micro_batch'."
        )


@register_priority(
    name="entropy",
    regime="soft",
    paper="Wang et al. 2025, Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for LLM "
    "Reasoning, arXiv 2506.01939 (NeurIPS 2025)",
    selection=TopFraction(token_entropy, fraction=_entropy_kept_fraction, scope="scope"),
    validate=_check_entropy_args,
    signal_switch=True,
)
def entropy_weight(
    entropy: torch.Tensor,
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Literal["power", "top"] = "power",
    alpha: NonNegative = 1.0,
    ratio: Fraction = 0.2,
    normalize: bool = True,
    scope: Literal["micro_batch", "step"] = "micro_batch",
) -> torch.Tensor:
    """Entropy weighting: train hardest on the high-entropy "forking" tokens, where the reasoning path branches.

    Paper: Wang, Yu, Gao et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
    Reinforcement Learning for LLM Reasoning", arXiv 2506.01939 (NeurIPS 2025). The paper restricts the RLVR policy
    gradient (DAPO) to the top 20% of tokens of each batch by the policy's entropy, and finds this matches or beats
    the full gradient; here that rule weights the SFT loss instead (the paper has no SFT experiment: the transfer to
    SFT is ours). Only the abstract and secondary summaries could be read; no code was fetched.

        H_t = H(π_θ(· | y_<t)) = −Σ_v π_θ(v) log π_θ(v)          (the fused-head `entropy` statistic)
        mode="power" (default, ours):   Φ_t = H_t^alpha / mean_{s supervised}(H_s^alpha)        alpha = 1
        mode="top" (the paper's rule):  Φ_t = 1[t among the top `ratio` of supervised tokens by H_t] / ratio
                                                                                                   ratio = 0.2
    Defaults and where they come from: `ratio` = 0.2 is the paper's top-20% ("80/20"); `alpha` = 1 (ours: weight
    proportional to the entropy); mode="power" is ours, a soft version of the paper's hard cut, asked for by the
    project (soft reweighting).

    Choices (ours): `normalize` (default True) keeps the mean weight over the supervised tokens of the batch at 1, so
    the loss keeps SFT's scale and learning rate: in "power" mode the mean is over this micro-batch's supervised tokens
    (each micro-batch then sums its Φ to its own token count, so the optimizer step's mean is also 1); when every
    supervised token has H = 0 all get Φ = 1. In "top" mode the kept tokens get 1/ratio, so that the mean over the
    selection's scope is 1 (exactly when ratio·n is whole; k = round(ratio·n) otherwise). `normalize=False` gives the
    raw H^alpha, or the paper's plain 0/1 mask in "top" mode. The selection in "top" mode is deterministic (ties by
    position, at least one token kept); `scope="micro_batch"` selects within each micro-batch, `scope="step"` over
    every micro-batch of the optimizer step and every process (the paper's batch; one extra no-grad forward).
    With `signal="reference"` the entropy is the frozen starting model's instead.
    """
    if mode == "top":
        kept = (selected & mask).float()  # (B, T-1)
        return kept / ratio if normalize else kept
    powered = entropy.clamp(min=0).pow(alpha)  # (B, T-1)
    if not normalize:
        return powered * mask
    mean = _supervised_mean(powered, mask)  # ()
    return torch.where(mean > 0, powered / mean.clamp(min=torch.finfo(powered.dtype).tiny), 1.0) * mask  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# SelecTKD
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="soft",
    paper="Huang, Song, Zhang, Ren 2025, SelecTKD: Selective Token-Weighted Knowledge Distillation for LLMs, "
    "arXiv 2510.24021 (CVPR 2026)",
    reference="explicit",
)
def selectkd(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    verify: Literal["teacher", "speculative"] = "teacher",
    threshold: Probability = 0.0,
    rejected_weight: Probability = 0.0,
    teacher_weight: bool = True,
) -> torch.Tensor:
    """SelecTKD: a teacher verifies each target token; accepted tokens train, rejected ones are masked or down-weighted.

    Paper: Huang, Song, Zhang, Ren 2025, "SelecTKD: Selective Token-Weighted Knowledge Distillation for LLMs",
    arXiv 2510.24021 (CVPR 2026). The student proposes tokens, the teacher verifies them ("propose-and-verify", from
    speculative decoding: a greedy Top-k and a non-greedy Spec-k verifier); accepted tokens get weight 1, rejected
    ones β (0 = masked), i.e. Φ ∈ {0, β, 1}. Only the abstract and secondary summaries could be read (no code is
    released), so the verifiers below are ours, written from that description. Here the proposed token is the
    dataset's target y_t (off-policy SFT data), and the teacher is the reference:

        q_t = p_T(y_t) = exp(ref_logps_t),   p_t = p_θ(y_t) = exp(logps_t)
        verify="teacher" (default):      a_t = 1[q_t ≥ threshold]                    threshold = 0 (accept all)
        verify="speculative":            a_t = min(1, q_t / p_t)  (speculative sampling's acceptance probability,
                                                                  used in expectation, not sampled)
        w_t = a_t + β·(1 − a_t)                                                       β = `rejected_weight` = 0
        Φ_t = w_t · q_t   if `teacher_weight` (default)   else   w_t

    The defaults give Φ_t = p_T(y_t): the teacher's confidence in the token as a soft weight (as tabulated by the
    position paper arXiv 2602.01227); `threshold` > 0 masks the tokens the teacher finds unlikely.
    `teacher_weight=False` gives the paper's hard weights {β, 1} (with `verify="speculative"`, their expectation).

    Choices (ours): the paper's Top-k verifier (the token is among the teacher's k most likely) is not implemented: it
    needs the label's rank under the teacher, which no statistic provides; the teacher-probability threshold stands
    in for it. The reference is `explicit`: SelecTKD distils a separate, larger teacher (its setting is a large
    teacher-student capacity gap), and against the starting model the rule would be PriFT-prob (`prift_prob`).
    No `signal` switch: the verifier compares the policy with the teacher, so reading both from the reference would
    accept everything.
    """
    teacher = ref_logps.exp()  # (B, T-1)
    if verify == "teacher":
        accepted = (teacher >= threshold).float()  # (B, T-1)
    else:
        accepted = (ref_logps - logps).clamp(max=0).exp()  # (B, T-1): min(1, q/p)
    weight = accepted + rejected_weight * (1 - accepted)  # (B, T-1)
    return (weight * teacher if teacher_weight else weight) * mask  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# SWiFt
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="soft",
    paper="SWiFt as tabulated in Shen et al. 2026, Supervised Fine-Tuning Needs to Unlock the Potential of Token "
    "Priority, arXiv 2602.01227 (Table 1); method: Le et al. 2025, Token-Level Self-Play with Importance-Aware "
    "Guidance for LLMs (SWIFT), NeurIPS 2025",
    reference="explicit",
)
def swift(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: Annotated[float, Range(0, None, low_open=True)] = 1.0,
    space: Literal["prob", "logprob"] = "prob",
) -> torch.Tensor:
    """SWiFt: weight each token by a sigmoid of how much more likely the policy finds it than the teacher does.

    Paper: the position paper Shen, Qin, Hu et al. 2026, "Supervised Fine-Tuning Needs to Unlock the Potential of
    Token Priority", arXiv 2602.01227, lists SWiFt in its Table 1 (positive, soft priority) as

        Φ_t = σ(p_θ(y_t) − p_ref(y_t))

    (Table 1, soft reweighting rows: proxy signal "Self-Play Gap", an intrinsic signal; section 5.1 describes it as a
    self-play extension of DFT-style reweighting that optimises preferences implicitly), citing Le, Tran Vuong, Tran,
    Ngo Van, Harandi, Le 2025, "Token-Level Self-Play with Importance-Aware Guidance for Large Language Models"
    (SWIFT, Self-Play Weighted Fine-Tuning; NeurIPS 2025, openreview 3VvdoCcVPU), whose token weights are estimated
    from a stronger teacher model. The table's formula is read from the position paper's full text; the SWIFT paper's
    own method section was not at hand and no code was fetched, so the formula is the table's, with two knobs of ours:

        d_t = p_θ(y_t) − p_ref(y_t)                 space="prob" (the table's form, default)
        d_t = log p_θ(y_t) − log p_ref(y_t)         space="logprob" (a log-ratio, SPIN/DPO's implicit reward)
        Φ_t = σ(scale · d_t)                        scale = 1 (the table's form)

    With probabilities, d ∈ [−1, 1] and Φ ∈ [0.27, 0.73]: a mild reweighting around 1/2; `scale` sharpens it.
    Choices (ours): the reference is `explicit`, the stronger teacher of SWIFT: against the starting model d = 0 at
    step 0 and every token gets 1/2. No `signal` switch: the rule compares the policy with the reference, and reading
    both from the reference would give σ(0) = 1/2 everywhere. Φ is a stop-gradient weight on the NLL; SWIFT's
    self-play part (its rejected, self-generated responses) is out of scope.
    """
    gap = logps - ref_logps if space == "logprob" else logps.exp() - ref_logps.exp()  # (B, T-1)
    return torch.sigmoid(scale * gap) * mask  # (B, T-1)


# ------------------------------------------------------------------------------------------------------------------
# SRFT
# ------------------------------------------------------------------------------------------------------------------
@register_priority(
    regime="soft",
    paper="Fu et al. 2025, SRFT: A Single-Stage Method with Supervised and Reinforcement Fine-Tuning for Reasoning, "
    "arXiv 2506.19767 (ICLR 2026)",
    signal_switch=True,
)
def srft(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    coefficient: NonNegative = 0.5,
    scope: Literal["batch", "token"] = "batch",
) -> torch.Tensor:
    """SRFT (its SFT part): weight the demonstration loss by sg(exp(−H)), less when the policy is uncertain.

    Paper: Fu, Chen, Chai, Wang, Tu, Yin, Lin, Zhang, Zhu, Zhao 2025, "SRFT: A Single-Stage Method with Supervised and
    Reinforcement Fine-Tuning for Reasoning", arXiv 2506.19767 (ICLR 2026), Sec. 4. SRFT trains one stage on
    demonstrations and on self-rollouts:

        L_SRFT = L_SFT^demo + L_RL^demo + L_RL^self-rollout
        L_SFT^demo = w_SFT · E_{(x,y) ~ D_demo}[−log π_θ(y | x)],   w_SFT = c · sg(exp(−H(π_θ)))

    so that high policy entropy (uncertainty) damps the SFT update. This priority is that first term:

        scope="batch" (default):  Φ_t = c · exp(−mean_{s supervised}(H_s))    one weight for the micro-batch
        scope="token":            Φ_t = c · exp(−H_t)                          per token (ours)
        H_t = H(π_θ(· | y_<t)), the fused-head `entropy` statistic;  c = `coefficient` = 0.5

    Sources: the paper's abstract and a transcription of its equations (github.com/Amier2/logseq_note,
    pages/SRFT.md: w_SFT = 0.5·stopgrad(exp(−H(π_θ))), L_SFT^demo as above); the paper's own text could not be read
    and no official code was found. c = 0.5 is from that transcription (c = 1 is the bare sg(exp(−H))); a constant
    factor on the whole loss is nearly invisible to AdamW.

    Choices: the paper writes w_SFT outside the expectation and H(π_θ) without a position, so the default is one
    weight per micro-batch, from the mean entropy of its supervised tokens (on this process); `scope="token"` is
    the per-token reading. Out of scope: SRFT's RL terms, L_RL^demo (off-policy PPO-clipped loss on demonstrations)
    and L_RL^self-rollout (w_RL-weighted likelihood of correct rollouts, unlikelihood of wrong ones), which need
    rollouts and rewards. With `signal="reference"` the entropy is the frozen starting model's instead.
    """
    if scope == "token":
        return coefficient * torch.exp(-entropy) * mask  # (B, T-1)
    mean = _supervised_mean(entropy, mask)  # ()
    return coefficient * torch.exp(-mean) * mask.float()  # (B, T-1)
