"""External priorities: Φ from the structure of the data or from labels in it, not from any model.

- `wit`: prompt and response weighted apart; `robustft`: a per-example noise score;
- `sftkey`: SFT, then the final-answer tokens only (found after a marker, or given as spans);
- `faithful`: spans labelled non-factual are masked or down-weighted;
- `verifier`: a checker (`trl_priority.priorities.verifiers`) marks spans verified, wrong or unknown.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from trl_priority.priorities import verifiers
from trl_priority.priorities.registry import NonNegative, PriorityError, Probability, Range, register_priority
from trl_priority.statistics import register_data_statistic


register_data_statistic(
    "noise",
    level="example",
    hint="RobustFT reads one noise score per example (a number >= 0, 0 for a clean response) from a 'noise' column "
    "(builtin:gsm8k-noisy has one)",
)


def _check_wit_weights(args: dict) -> None:
    if args["prompt_weight"] == 0 and args["response_weight"] == 0:
        raise PriorityError(
            "priority_args for 'wit': prompt_weight and response_weight are both 0, so no token would train. Set "
            "response_weight > 0 (the paper recommends 0.5 to 1)."
        )


@register_priority(
    regime="soft",
    paper="Chatterjee et al. 2025, On the Effect of Instruction Tuning Loss on Generalization (WIT), TACL 13, "
    "arXiv 2507.07817",
    trains_prompt_tokens=lambda args: args["prompt_weight"] > 0,
    validate=_check_wit_weights,
)
def wit(
    response_mask: torch.Tensor,
    mask: torch.Tensor,
    *,
    prompt_weight: Probability = 0.4,
    response_weight: Probability = 0.6,
) -> torch.Tensor:
    """WIT (Weighted Instruction Tuning): train on the prompt too, with its own weight.

    Paper: Chatterjee, Renduchintala, Bhatia, Chakraborty 2025, "On the Effect of Instruction Tuning Loss on
    Generalization", TACL 13:1360-1380, arXiv 2507.07817; code github.com/kowndinya-renduchintala/WIT.

        Φ_t = λ_r = response_weight   on response (completion) tokens
        Φ_t = λ_p = prompt_weight     on prompt tokens

    With λ_p > 0, prompt tokens keep their labels during data preparation (`completion_only_loss` is turned off),
    and the `response_mask` statistic tells them apart, so the dataset must be prompt-completion. Defaults 0.4 / 0.6
    are the official run scripts' values; the paper recommends λ_p in [0, 0.5] and λ_r in [0.5, 1]. Both must lie
    in [0, 1], the range of the paper's grid: a weight above 1 only scales the step (raise `learning_rate` instead),
    and a typo such as 1e9 would blow the run up.

    The loss is divided by the tokens with a non-zero weight, as in the paper: with λ_p > 0 every prompt and response
    token; with λ_p = 0 the prompt tokens are not supervised at all (their labels are masked, as with
    `completion_only_loss`), so N counts the response tokens only and (0, 1) is exactly conventional completion-only
    instruction tuning (tested against `SFTTrainer`). (1, 1) is continued pre-training on every token. Both weights 0
    is an error (nothing would train).
    """
    weights = torch.where(response_mask.bool(), response_weight, prompt_weight)  # (B, T-1)
    return weights * mask


@register_priority(
    regime="soft",
    paper="Luo et al. 2024, RobustFT: Robust Supervised Fine-tuning for LLMs under Noisy Response, arXiv 2412.14922",
)
def robustft(
    noise: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: NonNegative = 1.0,
    max_noise: Annotated[float, Range(0, None)] = math.inf,
) -> torch.Tensor:
    """RobustFT (soft form): down-weight every token of an example by how noisy its response is judged to be.

    Paper: Luo et al. 2024, "RobustFT: Robust Supervised Fine-tuning for Large Language Models under Noisy Response",
    arXiv 2412.14922; code github.com/luo-junyu/RobustFT (`robustft.py`).

        Φ_t = exp(−gamma · noise_e) · 1[noise_e ≤ max_noise],   e = the example of token t

    `noise` is an example-level column (one number ≥ 0 per example, broadcast to its tokens before truncation and
    packing): 0 for a response judged clean. The official pipeline detects noisy responses by consistency (the
    labelled answer must agree with the model's direct and reasoning-enhanced answers), relabels them with retrieved
    context, scores each relabelled response by its mean token NLL ("entropy") and keeps a relabelled example only if
    that score is below the median; the rest are dropped, and plain SFT follows. Its weights are thus 0 or 1.

    Choices: this is a soft adaptation of that selection: noise = 0 for clean examples and the relabelled response's
    score otherwise, gamma = 1 by default (the paper has no gamma: it is ours), and `max_noise` reproduces the paper's
    hard selection exactly (set it to the median score; gamma = 0 then gives Φ ∈ {0, 1}). The detection and
    relabelling stages are data preparation, outside the trainer. The loss is divided by all supervised tokens.
    """
    weight = torch.exp(-gamma * noise)  # (B, T-1)
    return torch.where(noise <= max_noise, weight, 0.0) * mask


# ------------------------------------------------------------------------------------------------------------------
# Labelled spans: the final answer (SFTKey), non-factual spans (F2), a checker's verdicts (veridical priority)
# ------------------------------------------------------------------------------------------------------------------
def _key_spans(completion: str, args) -> list[list[int]]:
    """The Key portion: from the last `marker` (itself included unless `include_marker` is false) to the end."""
    marker = args.get("marker", "####")
    at = completion.rfind(marker)
    if at < 0:
        return []
    start = at if args.get("include_marker", True) else at + len(marker)
    return [[start, len(completion)]]


register_data_statistic(
    "key_answer",
    column="key_spans",
    level="span",
    derive=_key_spans,
    hint="SFTKey finds the final answer after `marker` in each completion; a dataset may instead give a "
    "'key_spans' column of [start, end] character spans of the answer in each completion",
)


def _check_marker(args: dict) -> None:
    if not args["marker"]:
        raise PriorityError(
            "priority_args for 'sftkey': `marker` is empty. Give the text that opens the final answer ('####' for "
            "GSM8K, '<Answer>' for the paper's tagged format, '\\boxed{' for MATH)."
        )


@register_priority(
    regime="hard",
    paper="Shi et al. 2025, Rethinking Supervised Fine-Tuning: Emphasizing Key Answer Tokens for Improved LLM "
    "Accuracy (SFTKey), arXiv 2512.21017",
    validate=_check_marker,
)
def sftkey(
    key_answer: torch.Tensor,
    progress: torch.Tensor,
    mask: torch.Tensor,
    *,
    marker: str = "####",
    include_marker: bool = True,
    key_from: Probability = 0.5,
) -> torch.Tensor:
    """SFTKey: plain SFT first, then the final-answer ("Key") tokens only.

    Paper: Shi, Kou, Li, Zhou 2025, "Rethinking Supervised Fine-Tuning: Emphasizing Key Answer Tokens for Improved
    LLM Accuracy", arXiv 2512.21017 (read: its abstract and introduction, and summaries of its method that give both
    stage losses).

        Φ_t = 1                           while progress < key_from   (stage 1: SFT on the whole response)
        Φ_t = 1[y_t in the Key portion]   from progress = key_from on (stage 2: the answer only)

    The paper tags each response `<Thinking> … </Thinking><Answer> … </Answer>`, trains stage 1 with the plain NLL
    over the whole tagged response until it has converged, then continues with L_Answer = −Σ_{t > T_i} log p(y_t),
    T_i the last token of `</Thinking>`: every token after the reasoning, the `<Answer>` opener, the answer and the
    closing tag, is the Key portion; the reasoning stays as context without gradient.

    Here the Key portion is found by `marker`: from its last occurrence in the completion to the end of the completion
    as the model sees it (the end-of-turn token included, like the paper's closing tag), with the marker itself
    (`include_marker=True`, the analogue of the paper's `<Answer>` opener) or only what follows it. Defaults: marker
    "####" (GSM8K's final-answer line); "<Answer>" reproduces the paper's tagged format. A dataset may give the spans
    instead, in a 'key_spans' column of [start, end] character offsets into each completion (the conversational
    assistant content starts at offset 0); examples whose column is None fall back to the marker. An example without
    the marker has no Key tokens, so it trains in stage 1 only.

    Choices: both stages run in one training run, switched by `progress` (global_step / max_steps) at `key_from`
    (default 0.5, ours: the stage lengths were not in what we could read; with `num_train_epochs: 2`, 0.5 is one epoch
    of each, the same data twice as in the paper). `key_from=0` is stage 2 alone (start from an SFT-trained model);
    `priority_warmup_ratio` gives a linear blend from SFT instead of a hard switch. The loss is divided by all
    supervised tokens (N) in both stages, as everywhere here; the paper's stage-2 sum over the Key tokens differs
    by a constant factor per batch that AdamW's update does not see.
    """
    stage_two = bool(torch.as_tensor(progress) >= key_from)
    phi = (key_answer != 0).float() if stage_two else torch.ones_like(mask, dtype=torch.float32)  # (B, T-1)
    return phi * mask


register_data_statistic(
    "nonfactual",
    level="span",
    hint="add a 'nonfactual' column: per completion, a list of [start, end] character spans (offsets into the "
    "completion text; for conversational data, into the assistant message's content) of the non-factual claims, [] "
    "when none (builtin:gsm8k-noisy-spans marks its corrupted numbers this way)",
)


@register_priority(
    regime="soft",
    paper="Hu et al. 2024, Mitigating Large Language Model Hallucination with Faithful Finetuning (F2), "
    "arXiv 2406.11267 (the masking of labelled non-factual spans; F2 itself up-weights hallucination-prone spans)",
)
def faithful(nonfactual: torch.Tensor, mask: torch.Tensor, *, nonfactual_weight: Probability = 0.0) -> torch.Tensor:
    """Faithful fine-tuning on labelled data: do not learn the spans the data marks as non-factual.

    Paper: Hu, He, Wang, Li, Ma, King 2024, "Mitigating Large Language Model Hallucination with Faithful Finetuning"
    (F2), arXiv 2406.11267 (read: the arXiv abstract and introduction, and summaries of its method).

        Φ_t = nonfactual_weight   on tokens that overlap a span of the `nonfactual` column
        Φ_t = 1                   elsewhere

    `nonfactual` is a span column: per completion, [start, end] (or [start, end, value]: any non-zero value marks,
    0 unmarks) character offsets into the completion text. Default weight 0: the labelled spans are masked (they stay
    context, without gradient); a weight in (0, 1) down-weights them instead.

    What the paper does and this does not: F2 is a multi-objective fine-tuning for QA that adds an internal
    fact-retrieval loss (generate the grounding fact from the question) to fact-grounded answering, and *up-weights*
    "hotspots", the hallucination-prone spans of the answer found by entity and attention heuristics, while
    fine-tuning only hallucination-prone layers. This method is the data-labelled form of its token priority, with
    the labels pointing the other way: spans known to be non-factual are not imitated. Up-weighting spans is
    `faithful`'s opposite and not offered here; the fact-retrieval objective needs a data format of its own. The
    loss is divided by all supervised tokens (N), masked ones included, so masking does not raise the learning rate.
    """
    return torch.where(nonfactual != 0, nonfactual_weight, 1.0) * mask  # (B, T-1)


register_data_statistic(
    "verdict",
    level="span",
    derive=verifiers.verdict_spans,
    hint="the verifier runs the checker named by `checker` over each completion (see trl_priority.priorities.verifiers)",
)


def _check_checker(args: dict) -> None:
    message = verifiers.unknown_checker_message(args["checker"])
    if message is not None:
        raise PriorityError(f"priority_args for 'verifier': {message}")


@register_priority(
    regime="signed",
    paper="Shen et al. 2026, Supervised Fine-Tuning Needs to Unlock the Potential of Token Priority (position paper), "
    "arXiv 2602.01227, appendix A.2 (veridical priority)",
    validate=_check_checker,
)
def verifier(
    verdict: torch.Tensor,
    mask: torch.Tensor,
    *,
    checker: str = "arithmetic",
    wrong_weight: Annotated[float, Range(-1, 1)] = 0.0,
    verified_weight: NonNegative = 1.0,
    unknown_weight: NonNegative = 1.0,
) -> torch.Tensor:
    """Veridical priority: a checker reads each completion and marks its spans verified, wrong or unknown.

    Paper: Shen et al. 2026, "Supervised Fine-Tuning Needs to Unlock the Potential of Token Priority", position paper,
    arXiv 2602.01227, appendix A.2 ("The Epistemic Reliability Gap"). The appendix names the problem and leaves the
    method open: proxies such as loss, entropy or a reference's likelihood conflate confidence with correctness
    (confident hallucinations get a high Φ), and it calls for grounding Φ in verified truth ("veridical priority")
    through scalable, reference-free checks such as logical-consistency checks, rather than in likelihood. It gives no
    Φ formula, no weights and no checker; everything below (the spans, the three weights, the arithmetic checker) is
    this library's reading of that call, and signed Φ on wrong spans follows the table's Regime II (Φ < 0 on tokens
    to correct), not anything the appendix prescribes.

        Φ_t = wrong_weight      on tokens of a span the checker marks "wrong"     (default 0; negative: unlearn)
        Φ_t = verified_weight   on tokens of a "verified" span                     (default 1)
        Φ_t = unknown_weight    on tokens of an "unknown" span, and on text no span covers   (default 1)

    The checker is picked by name (`checker`, default "arithmetic": recomputes every `a op b = c` step of a worked
    solution and marks the results, see `trl_priority.priorities.verifiers.arithmetic`); register your own with
    `trl_priority.priorities.verifiers.register_checker(name, fn)`, `fn(completion_text) -> [(start, end, verdict), ...]`. An
    unknown name is an error when the config is made, naming the closest checker. The checker runs once per example
    during data preparation, over the completion as the model sees it (tokens decoded, end token included); a token
    that overlaps a wrong span is wrong, whatever else overlaps it.

    Choices: wrong results get Φ = 0 by default (not imitated, kept as context), or a negative Φ down to −1 to
    unlearn them with the objective's bounded unlikelihood −log(1 − p) (`negative_loss: ascent` for plain gradient
    ascent); the method is registered signed for that. `unknown_weight = 0` trains only what was verified (outside
    the checked spans too). Each token counts once in the normaliser N.
    """
    phi = torch.where(verdict > 0, verified_weight, unknown_weight)  # (B, T-1)
    phi = torch.where(verdict < 0, wrong_weight, phi)
    return phi * mask
