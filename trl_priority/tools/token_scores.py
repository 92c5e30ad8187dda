"""Offline per-token scores: dataset columns computed once with models, then read by priorities as data statistics.

Some token priorities compare models that are not the policy or its one reference slot (a model fine-tuned on correct
solutions against one fine-tuned on wrong ones), or need a forward the training pass does not make (the completion
without its prompt). Their scores are computed once, before training, and stored as a per-token column that the
priority reads as a registered token-level data statistic:

| function                    | column                  | read by                   | scores                                  |
|-----------------------------|-------------------------|---------------------------|-----------------------------------------|
| `contrastive_token_scores`  | `contrastive_score`     | `critical`                | softmax((1 + β)·z_pos − β·z_neg)[y_i]   |
| `information_gain`          | `information_gain`      | `tshirt`                  | log p(y_i ∣ x, y_<i) − log p(y_i ∣ y_<i) |
| `counterfactual_impact`     | `counterfactual_impact` | `critical_counterfactual` | NLL of the later completion tokens with y_i deleted − with it |

Each function takes a `datasets.Dataset` as the trainer accepts it (raw prompt-completion, conversational or not, or
already tokenized with `input_ids`) and returns the same dataset with one more column: one value per token of the
`input_ids` the trainer makes from the row, the value at index i scoring token i given the tokens before it (index 0,
which nothing predicts, holds 0), the layout of `ColumnReference`'s `ref_<name>` columns. Raw rows are tokenized by
`tokenize_like_trainer`, which runs TRL's own `SFTTrainer` preparation (chat template, EOS, prompt/completion split),
so the column lines up with the tokens the trainer makes from the same rows with the same tokenizer. Pass the
training config as `args` when it changes the tokenization (`assistant_only_loss`, `dataset_text_field`); a column
of the wrong length is an error at training time that names the example.

From the command line (writes `<output>/train.jsonl`, loadable as `--dataset_name <output>`):

    python -m trl_priority.tools.token_scores contrastive --positive P --negative N --dataset builtin:gsm8k-contrast \
        --output data/critical
    python -m trl_priority.tools.token_scores information-gain --model builtin:smollm2-135m-instruct \
        --dataset builtin:gsm8k --output data/tshirt
    python -m trl_priority.tools.token_scores counterfactual --model builtin:smollm2-135m-instruct \
        --dataset builtin:gsm8k --output data/critical_counterfactual
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from trl_priority.references.sources import eval_mode
from trl_priority.tools.scoring_io import (
    load_dataset,
    load_model,
    pad_token_id,
    right_padded_logits,
    tokenize_like_trainer,
    with_column,
    write_scored,
)


def completion_positions(row: dict[str, Any]) -> list[int]:
    """Token positions of a tokenized row's completion: `completion_mask` = 1, else the supervised `labels`."""
    if "completion_mask" in row:
        return [i for i, bit in enumerate(row["completion_mask"]) if bit]
    if "labels" in row:
        return [i for i, label in enumerate(row["labels"]) if label != -100]
    raise ValueError(
        "A tokenized row needs `completion_mask` (or `labels` with -100 on the prompt) to tell the completion from "
        "the prompt; prompt-completion datasets get it from the trainer's tokenization."
    )


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _next_token_logprobs(model: torch.nn.Module, sequences: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """`(B, L, V)` float32 log-softmax of the next-token logits of right-padded `sequences` (position j predicts
    token j + 1)."""
    return right_padded_logits(model, list(sequences), pad_id).float().log_softmax(-1)


def contrastive_token_scores(
    positive_model: torch.nn.Module,
    negative_model: torch.nn.Module,
    dataset: Dataset,
    tokenizer,
    *,
    beta: float = 1.0,
    column: str = "contrastive_score",
    batch_size: int = 4,
    args: Any = None,
) -> Dataset:
    """Critical-token contrastive estimation (Lin et al. 2024, arXiv 2411.19943): one score per token.

        s_i = softmax_v((1 + β)·z_pos,i−1(v) − β·z_neg,i−1(v))[y_i]      β = 1

    z_pos, z_neg are the next-token logits of a model fine-tuned on correct solutions and of one fine-tuned on
    incorrect solutions, over the whole sequence (prompt and completion). Since the log-softmax of each model shifts
    its logits by a constant per position, s_i is the probability of y_i under p_pos^(1+β) / p_neg^β, renormalised
    over the vocabulary: near 1 where the correct-solution model predicts y_i and the incorrect-solution one does not,
    near 0 on a *critical token*, one that only incorrect reasoning produces. Exactly the official
    `calculate_ce_score` (github.com/chenzhiling9954/Critical-Tokens-Matter, src/pipeline.py L224-234:
    `cd_logits = (1 + 1) * pos_logits - 1 * neg_logits`, softmax, gathered at `input_ids[1:]`). Both models must
    share the tokenizer. Index 0 holds 0.

    Returns `dataset` with the column `column` (read by the `critical` priority).
    """
    rows = tokenize_like_trainer(dataset, tokenizer, args)
    sequences = [list(ids) for ids in rows["input_ids"]]
    pad_id = pad_token_id(tokenizer)
    values: list[list[float]] = []
    with eval_mode(positive_model), eval_mode(negative_model):
        for batch in _batches(sequences, batch_size):
            positive = _next_token_logprobs(positive_model, batch, pad_id)  # (B, L, V)
            negative = _next_token_logprobs(negative_model, batch, pad_id).to(positive.device)  # (B, L, V)
            contrast = ((1 + beta) * positive - beta * negative).log_softmax(-1)  # (B, L, V)
            for row, ids in enumerate(batch):
                targets = torch.tensor(ids[1:], device=contrast.device)  # (L_row - 1,)
                scores = contrast[row, : len(ids) - 1].gather(-1, targets[:, None]).squeeze(-1).exp()  # (L_row - 1,)
                values.append([0.0, *scores.tolist()])
    return with_column(dataset, column, values)


def information_gain(
    model: torch.nn.Module,
    dataset: Dataset,
    tokenizer,
    *,
    column: str = "information_gain",
    batch_size: int = 4,
    prefix: list[int] | None = None,
    args: Any = None,
) -> Dataset:
    """T-SHIRT's per-token information gain of the prompt (Fu et al. 2025, arXiv 2506.01317): one value per token.

        Δ_i = log p(y_i | x, y_<i) − log p(y_i | y_<i) = CE(y_i | y_<i) − CE(y_i | x, y_<i)

    on the completion tokens y (the prompt x is everything before them); 0 on the prompt. The conditional term comes
    from the sequence as the trainer sees it, the unconditional one from a second forward over the completion tokens
    alone, after `prefix` (default: the tokenizer's BOS token, as the official code's `tokenizer(response)` starts
    with BOS for tokenizers that add one; none if the tokenizer has no BOS token, and then the first completion
    token, which nothing predicts without the prompt, gets Δ = 0, as the official code leaves it out). Δ > 0: the
    prompt makes the token more likely.

    Sign: Δ is the gain of conditioning on x. The official code stores its negative, `pmi = cond_loss − uncond_loss`
    (github.com/Dynamite321/T-SHIRT, token_loss.py L117-137), and selects by |pmi| (compute_stat.py L61, L69): the
    token mask is the same either way. The official code scores with GPT-2 and NEFTune-perturbed copies of the
    embeddings; this is its clean (noise-free) row, with any causal LM sharing the trainer's tokenizer (the starting
    model, typically).

    Returns `dataset` with the column `column` (read by the `tshirt` priority).
    """
    rows = tokenize_like_trainer(dataset, tokenizer, args)
    if prefix is None:
        prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences = [list(ids) for ids in rows["input_ids"]]
    completions = [completion_positions(row) for row in rows]
    pad_id = pad_token_id(tokenizer)
    values: list[list[float]] = []
    with eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            positions = completions[start : start + batch_size]
            alone = [prefix + [ids[i] for i in where] for ids, where in zip(batch, positions)]
            conditional = _next_token_logprobs(model, batch, pad_id)  # (B, L, V)
            unconditional = (
                _next_token_logprobs(model, [seq or [pad_id] for seq in alone], pad_id).to(conditional.device)
                if any(alone)
                else None
            )  # (B, L', V)
            for row, (ids, where, seq) in enumerate(zip(batch, positions, alone)):
                # the k-th completion token stands at i = where[k] in the sequence and at j = len(prefix) + k alone;
                # it is scored where something predicts it in both: i ≥ 1 and j ≥ 1
                scored = [(i, len(prefix) + k) for k, i in enumerate(where) if i >= 1 and len(prefix) + k >= 1]
                gain = torch.zeros(len(ids))  # (L_row,)
                if scored:
                    i, j = (torch.tensor(v, device=conditional.device) for v in zip(*scored))  # (n,) each
                    tokens = torch.tensor(ids, device=conditional.device)[i]  # (n,)
                    cond = conditional[row, i - 1, tokens]  # (n,) log p(y | x, y_<)
                    uncond = unconditional[row, j - 1, torch.tensor(seq, device=conditional.device)[j]]  # (n,)
                    gain[i.cpu()] = (cond - uncond).cpu()
                values.append(gain.tolist())
    return with_column(dataset, column, values)


def counterfactual_impact(
    model: torch.nn.Module,
    dataset: Dataset,
    tokenizer,
    *,
    column: str = "counterfactual_impact",
    reduction: str = "sum",
    batch_size: int = 8,
    max_tokens: int | None = 100_000,
    args: Any = None,
) -> Dataset:
    """Counterfactual impact of each completion token: how much deleting it raises the loss of the rest of the
    completion. The position paper's Table 1 reading of Critical Tokens (Shen et al. 2026, arXiv 2602.01227; Lin et
    al. 2024, arXiv 2411.19943): one value per token.

        L(z) = −Σ_{s ∈ C, s ≠ i} log p(y_s | the tokens before y_s in z)           (reduction="sum", in nats)
        impact_i = L(y without y_i) − L(y)
                 = Σ_{s ∈ C, s > i} [log p(y_s | y_<s) − log p(y_s | y_<s without y_i)]

    C is the completion (`completion_positions`); y without y_i is the trainer's sequence with the token at i deleted
    (prompt kept). The same tokens are scored in both terms, so the tokens before i cancel (the model is causal) and
    only the later completion tokens count: impact_i > 0 when y_i helps the model predict the rest of the
    completion, < 0 when the rest is likelier without it. One forward per deleted token, `batch_size` at a time, plus
    one forward per example for L(y).

    Choices:
    - L is the NLL of the *other* completion tokens, not of the whole sequence: deleting y_i removes its own term,
      which would otherwise dominate the difference (it is simply the token's own loss), and the prompt is given.
    - Sign: the table writes Φ = 1[L(y) − L(y_without_x) > δ]; that is impact > δ when L is read as the
      log-likelihood of the rest (a score), its negative when L is the NLL. The column stores the "helps" sign;
      the `critical_counterfactual` priority's `direction` chooses which tokens count as critical.
    - reduction="sum" (default) measures the impact in nats over the whole rest of the completion, so δ has one
      unit for every position; reduction="mean" divides by the number of other completion tokens |C| − 1 (the mean
      NLL of L), so δ is per token and long completions do not dominate. The two agree on the sign, hence at δ = 0.
    - The loss-difference reading only. The Critical Tokens paper (Lin et al. 2024) identifies critical tokens by
      rollouts: it samples continuations from each prefix of an incorrect solution and marks the token after which
      the continuations almost never reach the correct answer; and its training weights (cDPO) come from contrastive
      estimation (`contrastive_token_scores`, the `critical` priority). Neither rollouts nor answer checking are done
      here: this is the teacher-forced loss difference the position paper's table writes.
    - Index 0 (nothing predicts it), prompt tokens and the last completion token (nothing of the completion follows
      it) hold 0. Scores are computed on the untruncated sequence: with `max_length` the trainer cuts the column with
      the tokens, but the impact of a kept token may include tokens cut after it.
    - `max_tokens` bounds the number of deletion forwards (the completion tokens of the whole dataset, each a forward
      over its sequence): above it, a ValueError says how many are needed before any forward runs; None lifts it.

    Returns `dataset` with the column `column` (read by the `critical_counterfactual` priority).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: expected 'sum' or 'mean'")
    rows = tokenize_like_trainer(dataset, tokenizer, args)
    sequences = [list(ids) for ids in rows["input_ids"]]
    completions = [completion_positions(row) for row in rows]
    # the deletions to score: a completion token at i ≥ 1 followed by at least one completion token
    jobs = [(row, i) for row, where in enumerate(completions) for i in where if i >= 1 and i < where[-1]]
    if max_tokens is not None and len(jobs) > max_tokens:
        raise ValueError(
            f"counterfactual_impact needs {len(jobs)} forwards (one per completion token deleted) over "
            f"{len(sequences)} examples, above max_tokens={max_tokens}: pass a larger max_tokens (or None), or score "
            "a subset of the dataset."
        )
    pad_id = pad_token_id(tokenizer)
    values = [[0.0] * len(ids) for ids in sequences]
    with eval_mode(model):
        full: list[torch.Tensor] = []  # log p(y_s | y_<s) at each s ≥ 1 (index 0 holds 0), per example
        for batch in _batches(sequences, batch_size):
            logprobs = _next_token_logprobs(model, batch, pad_id)  # (B, L, V)
            for row, ids in enumerate(batch):
                targets = torch.tensor(ids[1:], device=logprobs.device)  # (L_row - 1,)
                token = logprobs[row, : len(ids) - 1].gather(-1, targets[:, None]).squeeze(-1)  # (L_row - 1,)
                full.append(torch.cat([token.new_zeros(1), token]).cpu())  # (L_row,)
        for batch in _batches(jobs, batch_size):
            deleted = [sequences[row][:i] + sequences[row][i + 1 :] for row, i in batch]
            logprobs = _next_token_logprobs(model, deleted, pad_id)  # (B, L - 1, V)
            for b, (row, i) in enumerate(batch):
                later = torch.tensor([s for s in completions[row] if s > i])  # (n,) positions in the full sequence
                targets = torch.tensor(sequences[row], device=logprobs.device)[later.to(logprobs.device)]  # (n,)
                # without y_i, the token at s stands at s − 1 and is predicted at s − 2
                without = logprobs[b, (later - 2).to(logprobs.device), targets].cpu()  # (n,)
                impact = (full[row][later] - without).sum()
                if reduction == "mean":
                    impact = impact / (len(completions[row]) - 1)
                values[row][i] = impact.item()
    return with_column(dataset, column, values)


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> Path:
    """Score a dataset and write it, with its new column, to `<output>/train.jsonl`; returns that path."""
    from transformers import AutoTokenizer

    from trl_priority.tools.builtin import resolve_model

    parser = argparse.ArgumentParser(
        prog="python -m trl_priority.tools.token_scores", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    contrastive = commands.add_parser("contrastive", help="contrastive_score for `critical`")
    contrastive.add_argument("--positive", required=True, help="model fine-tuned on correct solutions")
    contrastive.add_argument("--negative", required=True, help="model fine-tuned on incorrect solutions")
    contrastive.add_argument("--beta", type=float, default=1.0)
    gain = commands.add_parser("information-gain", help="information_gain for `tshirt`")
    gain.add_argument("--model", required=True, help="the scoring model, e.g. the starting model")
    impact = commands.add_parser("counterfactual", help="counterfactual_impact for `critical_counterfactual`")
    impact.add_argument("--model", required=True, help="the scoring model, e.g. the starting model")
    impact.add_argument("--reduction", choices=("sum", "mean"), default="sum")
    impact.add_argument("--max_tokens", type=int, default=100_000, help="most deletion forwards; 0: no bound")
    for command in (contrastive, gain, impact):
        command.add_argument("--dataset", required=True, help="builtin:<name>, a hub id or a local folder")
        command.add_argument("--output", required=True, help="folder to write train.jsonl into")
        command.add_argument("--tokenizer", default=None, help="default: the (positive) model's")
        command.add_argument("--batch_size", type=int, default=4)
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(argv)

    dataset = load_dataset(options.dataset)
    if options.command == "contrastive":
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(options.tokenizer or options.positive))
        positive = load_model(options.positive, options.device)
        negative = load_model(options.negative, options.device)
        dataset = contrastive_token_scores(
            positive, negative, dataset, tokenizer, beta=options.beta, batch_size=options.batch_size
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(options.tokenizer or options.model))
        model = load_model(options.model, options.device)
        if options.command == "counterfactual":
            dataset = counterfactual_impact(
                model,
                dataset,
                tokenizer,
                reduction=options.reduction,
                batch_size=options.batch_size,
                max_tokens=options.max_tokens or None,
            )
        else:
            dataset = information_gain(model, dataset, tokenizer, batch_size=options.batch_size)
    return write_scored(dataset, options.output)


__all__ = [
    "completion_positions",
    "contrastive_token_scores",
    "counterfactual_impact",
    "information_gain",
    "main",
    "tokenize_like_trainer",
]


if __name__ == "__main__":
    main()
