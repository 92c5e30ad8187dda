"""Reference priorities: Φ compares the policy with a frozen reference model, or reads the reference alone.

The reference statistics (`ref_logps`, `ref_mass`, ...) come from whatever reference the trainer was given: a
separate frozen model, the LoRA base with the adapter switched off, or a user's callback (see
`trl_priority.references.sources`). The functions below only see tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

from trl_priority.priorities.registry import Fraction, Probability, register_priority
from trl_priority.priorities.selection import TopFraction


def excess_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_Δ(t) = L_θ(t) − L_ref(t) = ref_logps_t − logps_t: how much worse the policy does than the reference."""
    return (ref_logps - logps) * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Lin et al. 2024, Rho-1: Not All Tokens Are What You Need, arXiv 2404.07965 (NeurIPS 2024)",
    reference="explicit",
    selection=TopFraction(excess_loss, fraction="ratio", scope="scope"),
)
def rho1(
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: Fraction = 0.6,
    scope: Literal["step", "micro_batch"] = "step",
) -> torch.Tensor:
    """Rho-1 (Selective Language Modeling): train on the tokens with the highest excess loss over a reference.

    Paper: Lin et al. 2024, "Rho-1: Not All Tokens Are What You Need", arXiv 2404.07965, Eq. 3-5.

        L_Δ(t) = L_θ(t) − L_ref(t) = ref_logps_t − logps_t        (excess loss, `excess_loss`)
        Φ_t    = 1[t is among the top k = round(ratio · n) supervised tokens of the batch by L_Δ]

    The reference is a model trained on curated, high-quality data; against the starting model every excess loss is
    0 at step 0, so this method requires an explicit reference (`ref_model=` or `ref_model_name_or_path`).
    `ratio` = 0.6 is the paper's value for its 1.1B model (0.7 for 7B).

    Choices (the paper released no training code): the batch is the optimizer step's (`scope="step"`, the default):
    every micro-batch of the step on every process is scored first (without gradient, in eval mode; with a single
    micro-batch per step, in its training forward, no extra pass), and the top k of all their supervised tokens are
    kept, so the selection does not depend on gradient accumulation or the number of GPUs; `scope="micro_batch"`
    selects within each micro-batch on each process, without the scoring pass. k =
    round(ratio · n), at least 1, exactly k tokens kept, ties broken by position. The paper divides the loss by the
    kept count k; here it is divided by all supervised tokens, like every method: a constant factor 1/ratio, which
    AdamW's update does not see (it normalises the gradient's scale away), so the paper's learning rate applies as is.

    Against the position paper (Shen et al. 2026, arXiv 2602.01227, Table 1): the table writes Rho-1 as
    Φ = 1[L_θ < L_ref], a fixed threshold at zero excess loss. This follows the Rho-1 paper, which keeps the top
    fraction of tokens by L_θ − L_ref: tokens the policy finds harder than the reference, kept at a set ratio
    whatever the sign of their excess loss.
    """
    return selected.float() * mask  # (B, T-1)


@register_priority(
    regime="soft",
    paper="Wang, Li, Salzmann, Frossard 2026, PriFT: Prior-Support Guided SFT, arXiv 2606.09396",
)
def prift_prob(ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PriFT-prob: weight each token by its probability under the frozen pretrained model.

    Paper: Wang et al. 2026, "PriFT: Prior-Support Guided Supervised Fine-Tuning", arXiv 2606.09396; code
    github.com/wang-kee/PriFT (`prift_weights.py`).

        Φ_t = q(y_t) = exp(ref_logps_t),   q = the frozen model the fine-tuning starts from

    Tokens the prior already supports are reinforced; tokens outside its support (often noise) barely move it. By
    default the reference is the starting model: with LoRA, the base with the adapter off.
    """
    return ref_logps.exp() * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Wang, Li, Salzmann, Frossard 2026, PriFT: Prior-Support Guided SFT, arXiv 2606.09396",
)
def prift_mass(ref_mass: torch.Tensor, mask: torch.Tensor, *, threshold: Probability = 0.5) -> torch.Tensor:
    """PriFT-mass: keep the tokens that lie inside the bulk of the frozen prior's next-token distribution.

    Paper: Wang et al. 2026, "PriFT: Prior-Support Guided Supervised Fine-Tuning", arXiv 2606.09396; code
    github.com/wang-kee/PriFT (`prift_weights.py`).

        u_t = Σ_v q(v)·1[q(v) < q(y_t)] + q(y_t)      (the `ref_mass` statistic)
        Φ_t = 1[u_t ≥ threshold],  threshold = 0.5

    u_t is the prior probability of drawing a token no more likely than y_t: 1 for the prior's argmax, near 0 for a
    token deep in the tail. Ties follow the official code (strict <, plus the label's own mass); its README writes ≤,
    which differs only for tokens with exactly equal probability. Needs the reference's full distribution: computed
    in chunks of positions.
    """
    return (ref_mass >= threshold).float() * mask  # (B, T-1)


def retrospective_excess_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REL(t) = L_his(t) − L_θ(t) = logps_t − ref_logps_t: how much the policy has gained on the token since the
    history model (the reference)."""
    return (logps - ref_logps) * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Qin et al. 2025, ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning, "
    "arXiv 2510.18250 (ICLR 2026)",
    selection=TopFraction(retrospective_excess_loss, fraction="data_prop", scope="scope"),
)
def sstoken(
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    data_prop: Fraction = 0.6,
    scope: Literal["example", "step", "micro_batch"] = "example",
) -> torch.Tensor:
    """ssToken, self-modulated selection: train on the tokens the policy has gained most on since a history model.

    Paper: Qin et al. 2025, "ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning",
    arXiv 2510.18250 (ICLR 2026); code github.com/jianke0604/ssToken (`scripts/finetune.py`,
    `filter_tokens_with_attention_loss`; `bash_src/finetune.sh`).

        REL(t) = L_his(t) − L_θ(t) = logps_t − ref_logps_t      (retrospective excess loss, `retrospective_excess_loss`)
        Φ_t    = 1[t is among the top k = round(data_prop · n_e) supervised tokens of its example e by REL]

    The history model is the reference. By default it is the starting model (a frozen copy, or the LoRA base with the
    adapter off): the paper's main setting, and the official code's (it reads the base model's precomputed losses).
    Pass an earlier checkpoint as the reference (`ref_model_name_or_path`) for a later history model. At step 0 the
    policy is the history model, so every REL is 0 and each example keeps its first k tokens (ties go to the earlier
    position); from the first update on, REL ranks the tokens.

    Defaults, from the official code: `data_prop` = 0.6 (ρ, its `--data_prop`, the same name here so that its γ,
    `--ratio`, is not mistaken for it); the selection is made within each example (`scope="example"`), as its
    `filter_tokens_with_attention_loss` does per sample. `scope="step"` ranks the raw REL over the optimizer step's
    tokens instead (every micro-batch and process, as `rho1`), `"micro_batch"` over each micro-batch.

    Choices:
    - The self-modulated signal alone, the paper's score with γ = 1. The full score is γ·Norm(REL) + (1 − γ)·AttnScore
      with γ = 0.5 (`--ratio`), Norm the min-max over the example's response tokens, and AttnScore the last layer's
      head-averaged attention from the token to the example's prompt, summed over prompt positions. Norm is
      increasing, so with γ = 1 the per-example selection is the REL ranking. The attention term is left out: it
      needs the last layer's attention weights, which the fused forward (sdpa, flash attention) never materialises.
      Adding it would take a new policy statistic computed inside the forward, as the official
      `finetune_with_hook.py` does: a hook on the last decoder layer that reruns its self-attention eagerly with
      `output_attentions` (memory B·heads·T² for that layer; specific to the architecture's layer signature), plus
      the prompt boundary of each example (`response_mask`, and `example_index` under packing) and a per-example
      min-max normalisation inside the score.
    - k = round(ρ·n_e) half up, at least 1; the official code keeps ceil(ρ·n_e): at most one token per example
      differs.
    - The official loop selects by attention alone until it meets a sample index ≥ 10000 (`pre_ratio = 0`), in
      practice its first batch; not reproduced.
    - The paper's optional EMA history model (θ_his ← α·θ_his + (1 − α)·θ) is not built: the reference is frozen.
    - The loss is divided by all supervised tokens, not by the kept ones (the official code's mean over the kept
      labels): a factor of about 1/ρ, which AdamW's update does not see.
    - No `signal` switch: on the reference's own statistics REL would be 0 for every token.
    """
    return selected.float() * mask  # (B, T-1)


def cleaning_influence(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *, pipeline: str = "fixed_model"
) -> torch.Tensor:
    """Infl(t) = L_base(t) − L_tuned(t): with `pipeline="fixed_model"` the policy stands in for the base and the
    reference is the tuned model (ref_logps − logps); with `"self_evolving"` the policy is the tuned model of the
    previous round and the reference is the original base (logps − ref_logps)."""
    influence = ref_logps - logps if pipeline == "fixed_model" else logps - ref_logps
    return influence * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Pang et al. 2025, Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning, "
    "arXiv 2502.01968 (ICML 2025)",
    reference="explicit",
    selection=TopFraction(cleaning_influence, fraction="data_prop", scope="scope"),
)
def token_cleaning(
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    data_prop: Fraction = 0.6,
    scope: Literal["step", "example", "micro_batch"] = "step",
    pipeline: Literal["fixed_model", "self_evolving"] = "fixed_model",
) -> torch.Tensor:
    """Token Cleaning: train on the tokens whose loss a model tuned on clean warm-up data lowered most from the base.

    Paper: Pang et al. 2025, "Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning",
    arXiv 2502.01968 (ICML 2025); code github.com/UCSC-REAL/TokenCleaning (`scripts/generate_token_label.py`,
    `fixed_model_cleaning.sh`, `self_evolving_cleaning.sh`, `get_ref_model.sh`).

        Infl(t) = L_base(t) − L_tuned(t)                                   (`cleaning_influence`)
        Φ_t     = 1[t is among the top k = round(data_prop · n) supervised tokens by Infl]

    `pipeline="fixed_model"` (`fixed_model_cleaning.sh`): the reference is the model tuned on a small clean warm-up
    subset (`recipes/token_cleaning_reference.yaml`, as `get_ref_model.sh`), and the policy, which starts from the
    base, stands in for the base: Infl = L_θ − L_ref = ref_logps − logps. `pipeline="self_evolving"` (one round of
    `self_evolving_cleaning.sh`): the policy starts from the previous round's model, which the official round both
    scores with and trains from, and the reference is the original base: Infl = L_ref − L_θ = logps − ref_logps.
    Rounds are successive runs, each on the next subset of the data from the model the last one saved
    (`recipes/token_cleaning.yaml` shows the commands).

    Defaults, from the official scripts: `data_prop` = 0.6, selection over all tokens (`select_token_level=global`,
    here `scope="step"`: the optimizer step's tokens on every process); `scope="example"` is its `sample` level, the
    top fraction of each example's tokens; `"micro_batch"` selects within each micro-batch.

    Choices:
    - Online: the official code scores every token once, before training, with the fixed base and tuned models; here
      the policy's side of Infl is the policy when the token is trained: exact at step 0, then drifting as training
      goes on. With `pipeline="fixed_model"` the score is then Rho-1's excess loss, so `token_cleaning` with
      `scope="step"` selects exactly what `rho1` with the same reference and `ratio` selects; the methods differ in
      the reference (a warm-up subset of the same data), the per-example level and the self-evolving pipeline.
    - `global` ranks the whole dataset offline; online the widest batch is the optimizer step's.
    - k = round(ρ·n) half up, at least 1; the official code keeps int(ρ·n), rounding down (a 1-token completion keeps
      none at the sample level).
    - The loss is divided by all supervised tokens, not by the kept ones (the official code's mean over the kept
      labels): a factor of 1/ρ, which AdamW's update does not see.
    """
    return selected.float() * mask  # (B, T-1)
