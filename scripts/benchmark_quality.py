"""Quality of priority methods on GSM8K: learning from noisy demonstrations, and unlearning wrong solutions.

Each method fine-tunes SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, offline) with LoRA (r 16, alpha 32,
all linear layers) for one epoch at batch 8, once per seed, and every run is scored on GSM8K test-split problems it
never trained on. Baselines in the same table: the base model untrained, TRL's `SFTTrainer(loss_type="nll")`
(`trl_sft`) and `SFTTrainer(loss_type="dft")` (`trl_dft`). `sft` and `dft` of this library reproduce those two bit for
bit, so the default runs them only as TRL's. Every metric of every method is reported as a difference to `trl_sft`
with a paired bootstrap 95% interval over the held-out problems; a `*` marks the differences whose interval excludes 0.

    python scripts/benchmark_quality.py --dry-run        # the plan and its time estimate, nothing trained
    python scripts/benchmark_quality.py                  # the default table: hours on 2 CPU cores, resumable
    python scripts/benchmark_quality.py --methods asft,verifier --seeds 0,1     # add rows to the same table
    python scripts/benchmark_quality.py --full           # every method, 3 seeds, larger slices: for a GPU
    python scripts/benchmark_quality.py --methods trl_sft,verifier,prift_prob,verified_prift   # a composition

A composed priority runs under its recipe's name (`verified_prift`: verifier × PriFT-prob, `COMPOSED_RECIPES`),
with the recipe's `priority_args` unless `--priority-args` gives its own.

Data. GSM8K's train.jsonl gives the noisy task's training problems. example_model_solutions.jsonl (1,000 GSM8K
test-split questions with ground truths) gives everything held out, split by file order into three disjoint parts
(`split_test_rows`): rows 0-399 (the first 40%) are the noisy task's held-out problems and the generated questions,
rows 400-699 (the next 30%) the unlearn task's training questions, rows 700-999 (the last 30%) its held-out pairs. No
run trains on a question it is scored on, and the two tasks never share a question.

Task "noisy" (learning from noisy demonstrations). Training data: the first `--train-size` problems of train.jsonl,
with a share `--noise-share` (30%) of the solutions corrupted by `builtin:gsm8k-noisy`'s own corruption
(`trl_priority.tools.builtin.load_gsm8k_noisy`, fixed `--noise-seed`): the final answer N is replaced by a wrong number
N + k (k in 1..9) wherever it stands as a whole number, that is in the last calculation's result (`<<a*b=N>>N`), the
closing sentence and the `#### N` line; earlier intermediate results are unchanged. The record of which rows were
corrupted is the example-level column `noise` (1 corrupted, 0 clean), given to the methods that read it: `robustft`
reads `noise`, `forgetting_data` and `critical` read the same record as `unlearn`, `faithful` and `ignorance` read the
corrupted numbers as character spans (`nonfactual`, `made_up`, from `load_gsm8k_noisy_spans`). The other methods see
only the text. Held-out data: the first `--eval-size` problems of the test file's first part, the ground truth's last
line `A: N` written `#### N` as in train.jsonl, each with a copy corrupted the same way (problems whose answer is not
a whole number, which the corruption cannot change, are left out). For a held-out problem e with clean solution c_e
and corrupted copy w_e, and completion tokens y_1..y_n (the solution and the chat template's end-of-turn tokens, as
`SFTTrainer` supervises them), NLL(s) = −(1/n) Σ_t log p_θ(y_t | prompt, y_<t):

- `nll_clean`   = mean_e NLL(c_e)                                  (lower: the model imitates correct work)
- `nll_corrupt` = mean_e NLL(w_e)
- `margin`      = mean_e [NLL(w_e) − NLL(c_e)] = nll_corrupt − nll_clean   (higher: prefers the clean solution)
- `pref`        = share of e with NLL(w_e) > NLL(c_e)               (JSON only)
- `result_acc`  = teacher-forced result accuracy on the clean solutions: of all results, the numbers written right
  after `=` (`<<48/2=24>>` and `48/2 = 24` alike) or after `####`, the share whose every overlapping token is the
  model's argmax prediction given the gold prefix, pooled over problems: Σ_e hits_e / Σ_e results_e.
- `answer_acc`  = final-answer accuracy by greedy generation (batched, `--max-new-tokens` 256) on the first
  `--generate` held-out questions of the noisy task (0 by default: slow on a CPU); the answer is the number after the
  last `####`, else the last number of the text, compared as numbers (commas stripped) with the ground truth's.

Task "unlearn" (unlearning real wrong solutions). `builtin:gsm8k-contrast:<file>` pairs each question of the test
file that has an incorrect model solution with its first incorrect one. Methods train on the first
`--unlearn-train-size` such questions of the file's second part and are scored on the first `--unlearn-eval-size`
pairs of its third part. A method that reads `unlearn` (`forgetting_data`, `critical`) trains on both solutions of
each question (`unlearn` 0 on the ground truth, 1 on the wrong one); any other method trains on the ground truths
alone (learning the wrong ones would be the opposite of the task). With g_e the ground truth and w_e the incorrect
solution of held-out question e (NLL as above):

- `unlearn_nll_correct` = mean_e NLL(g_e)                          (lower: correct work stays likely)
- `unlearn_margin`      = mean_e [NLL(w_e) − NLL(g_e)]             (higher: wrong solutions less likely than right)
- `unlearn_pref`        = share of e with NLL(w_e) > NLL(g_e)       (JSON only)
- `answer_acc` as above.

Each run is scored on its own task's metrics and `answer_acc` ("—" elsewhere); the untrained base on all of them.

Methods needing more than the data. A trained ("explicit") reference (`rho1`, `forgetting`, `token_cleaning`,
`selectkd`, `swift`) gets a model trained first, once per task and seed, in a clearly labelled step: LoRA SFT with the
same settings on the rows the record marks clean (noisy task) or on the ground truths (unlearn task), merged. `critical`
gets its `contrastive_score` column from that model and one trained the same way on the corrupted / wrong rows
(`trl_priority.tools.token_scores.contrastive_token_scores`); `tshirt` gets `information_gain` and
`critical_counterfactual` gets `counterfactual_impact` from the base model (`trl_priority.tools.token_scores`). These
columns use the record of corrupted rows, like `robustft`.

Differences and intervals. Every metric above is a ratio of sums over held-out problems, Σ_e num_e / Σ_e den_e (a
mean when den_e = 1; pooled result accuracy when den_e counts results), and each run keeps its per-problem values in
the JSON. The difference of a run to `trl_sft` of its task (the base model: to the noisy task's `trl_sft`, and to the
unlearn task's for the unlearn metrics) comes with a paired bootstrap 95% percentile interval (`paired_bootstrap`,
`--resamples` 2,000): each resample draws the held-out problems with replacement, the same draw for both runs, and
recomputes both metrics as ratios of sums on it. With several seeds, each resample also draws each run's seeds with
replacement and averages the metric over them, so the seeds add their spread. `*` marks an interval that excludes 0:
that difference is resolved at this size; the others are not.

Resumable runs. Each finished (task, method, seed) row is appended at once to `quality_runs.jsonl` in
`--output-dir`, with its per-problem values and a key of the settings that change its numbers (model, data files,
sizes, training settings, the method's priority_args); the table, JSON and chart are rewritten after each row. A rerun
with the same settings skips the finished rows (`--force` reruns them; the newest row wins), so a killed run keeps
its rows and a long table can be filled across sessions, a few `--methods` at a time. Rows of other settings stay in
the file and are left out of the table.

Time estimate. Before training, the script prints the plan and its estimated time: the tokens each remaining training
and evaluation handles (counted with the model's tokenizer) divided by per-token rates, and the generation steps
times a per-step time. The rates are measured on this output's finished rows when it has some, else the constants
below, measured on a shared 2-core CPU (see CPU_RATES); the output says which. `--dry-run` prints it and stops.

Outputs in `--output-dir`: `quality.md` (the values, then the differences to `trl_sft` with their intervals),
`quality.json` (every run with its per-problem values, the summary, the settings, the corrupted rows), `quality.png`
(one panel per metric: each method's difference to `trl_sft` and its interval), `quality_runs.jsonl` (the finished
rows). One file on purpose: a benchmark is read and run in one place.

The default list ends with `verified_prift`, the composed verifier × PriFT-prob of `recipes/verified_prift.yaml`
(`COMPOSED_RECIPES`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

from trl_priority import PrioritySFTConfig, PrioritySFTTrainer, available_priorities, get_priority
from trl_priority.statistics import DATA_STATISTICS
from trl_priority.tools import builtin, token_scores


REPO = Path(__file__).resolve().parents[1]
BASELINES = {"trl_sft": "nll", "trl_dft": "dft"}  # TRL's own SFTTrainer, by loss_type
REFERENCE = "trl_sft"  # every difference is taken to this method, on the same task
# Composed priorities, by the recipe that names them: method -> (`priority`, default `priority_args`) of the recipe
COMPOSED_RECIPES = ("verified_prift",)


def _composition(recipe: str) -> tuple[dict, dict]:
    import yaml

    settings = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    return settings["priority"], settings.get("priority_args") or {}


COMPOSED = {recipe: _composition(recipe) for recipe in COMPOSED_RECIPES}


def priority_of(method: str):
    """What `PrioritySFTConfig.priority` is for a method of this benchmark: its name, or a recipe's composition."""
    return COMPOSED[method][0] if method in COMPOSED else method


def args_of(method: str, priority_args: dict[str, Any]) -> dict | None:
    """The method's `priority_args`: given on the command line, else a composition's recipe's."""
    return priority_args.get(method, COMPOSED[method][1] if method in COMPOSED else None)


# (key, column header, better direction): the table's columns, in order
METRICS = (
    ("nll_clean", "NLL clean ↓", "lower"),
    ("nll_corrupt", "NLL corrupted", None),
    ("margin", "margin ↑", "higher"),
    ("result_acc", "result acc. ↑", "higher"),
    ("answer_acc", "answer acc. ↑", "higher"),
    ("unlearn_nll_correct", "unlearn: NLL correct ↓", "lower"),
    ("unlearn_margin", "unlearn: margin ↑", "higher"),
)
UNLEARN_METRICS = ("unlearn_nll_correct", "unlearn_margin", "unlearn_pref")
# Every metric as a ratio of sums over held-out problems: metric -> (per-problem values it reads, (num_e, den_e))
METRIC_PARTS = {
    "nll_clean": (("nll_clean",), lambda clean: (clean, 1.0)),
    "nll_corrupt": (("nll_corrupt",), lambda corrupt: (corrupt, 1.0)),
    "margin": (("nll_clean", "nll_corrupt"), lambda clean, corrupt: (corrupt - clean, 1.0)),
    "pref": (("nll_clean", "nll_corrupt"), lambda clean, corrupt: (corrupt > clean, 1.0)),
    "result_acc": (("result_hits", "results"), lambda hits, results: (hits, results)),
    "answer_acc": (("answer_right",), lambda right: (right, 1.0)),
    "unlearn_nll_correct": (("unlearn_nll_correct",), lambda correct: (correct, 1.0)),
    "unlearn_margin": (("unlearn_nll_correct", "unlearn_nll_wrong"), lambda correct, wrong: (wrong - correct, 1.0)),
    "unlearn_pref": (("unlearn_nll_correct", "unlearn_nll_wrong"), lambda correct, wrong: (wrong > correct, 1.0)),
}
# Columns each task's dataset carries (the record of corrupted / wrong rows), and columns computed on demand
TASK_COLUMNS = {"noisy": ("noise", "unlearn", "nonfactual", "made_up"), "unlearn": ("unlearn",)}
COMPUTED_COLUMNS = ("contrastive_score", "information_gain", "counterfactual_impact")

# The default table: the base model (always evaluated, once), TRL's two losses, and the methods for noisy data
DEFAULT_METHODS = [
    "base", "trl_sft", "trl_dft", "prift_prob", "prift_mass", "eaft", "profit", "target_sft", "asft", "verifier",
    "robustft", "verified_prift",
]  # fmt: skip

PRESETS = {
    # Sized to resolve differences of a few points (issue 22): 128 training problems (38 corrupted), one epoch at
    # batch 8 (16 steps), 160 held-out problems (~730 results) and 160 unlearn pairs. Hours on a 2-core CPU (print
    # the estimate with --dry-run); one seed, since the paired bootstrap over problems already gives an interval.
    "default": dict(
        methods=",".join(DEFAULT_METHODS),
        unlearn_methods="trl_sft,forgetting_data",
        seeds="0",
        train_size=128,
        epochs=1,
        batch_size=8,
        learning_rate=5e-4,
        eval_size=160,
        unlearn_train_size=128,
        unlearn_eval_size=160,
        generate_size=0,
    ),
    # Every registered method, 3 seeds, a larger slice: for a GPU (days on a CPU)
    "full": dict(
        methods=",".join(["trl_sft", "trl_dft", *available_priorities(), *COMPOSED]),
        unlearn_methods="trl_sft,trl_dft,forgetting_data,critical",
        seeds="0,1,2",
        train_size=1024,
        epochs=1,
        batch_size=8,
        learning_rate=2e-4,
        eval_size=400,
        unlearn_train_size=250,
        unlearn_eval_size=250,
        generate_size=250,
    ),
}
# Per-token rates for the time estimate when the output has no finished rows yet. Training and scoring: the default
# table of 2026-12-04 (docs/benchmarks/quality_runs.jsonl, its one-thread rows), two processes of one thread each on
# the 2-core AMD EPYC VM, torch 2.13.0+cpu, SmolLM2-135M: 448,133 training tokens in 8,495 s (15 LoRA runs, model
# loading included), 1,262,400 scored tokens in 5,510 s. Generation (not in that run): the earlier run of 2026-12, a
# batch of 6 questions, 256 new tokens, in 44 s on average.
CPU_RATES = {"train_tokens_per_s": 53.0, "score_tokens_per_s": 229.0, "generate_s_per_step": 0.17}


# ------------------------------------------------------------------------------------------------------------------
# Metrics: pure functions of text, token offsets and per-token predictions
# ------------------------------------------------------------------------------------------------------------------
NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
RESULT = re.compile(rf"(?:=|####)\s*\$?\s*({NUMBER})")


def result_spans(solution: str) -> list[tuple[int, int]]:
    """Character spans of the results of a worked solution: each number right after `=` or `####` (an optional `$`
    and spaces between). `<<48/2=24>>24` has one result (the annotation's 24; the copy after `>>` follows no `=`)."""
    return [match.span(1) for match in RESULT.finditer(solution)]


def result_hits(
    offsets: list[tuple[int, int]], correct: list[bool | None], spans: list[tuple[int, int]]
) -> tuple[int, int]:
    """(results predicted exactly, results): a result counts when every scored token overlapping its span is the
    argmax prediction. `offsets[i]` is token i's character span and `correct[i]` whether the argmax given the gold
    prefix equals token i (None: not scored, e.g. a prompt token). A span that no scored token overlaps is skipped."""
    hits = total = 0
    for start, end in spans:
        flags = [ok for (s, e), ok in zip(offsets, correct) if ok is not None and s < end and e > start]
        if flags:
            total += 1
            hits += all(flags)
    return hits, total


def final_answer(text: str) -> float | None:
    """The number after the last `####`, else the last number of the text (commas stripped); None if none."""
    marker = text.rfind("####")
    found = re.findall(NUMBER, text[marker:] if marker >= 0 else text)
    if not found:
        return None
    value = found[0] if marker >= 0 else found[-1]
    return float(value.replace(",", ""))


def nll_margin(nll_wrong: list[float], nll_right: list[float]) -> tuple[float, float]:
    """(mean_e [NLL(wrong_e) − NLL(right_e)], share of e where the wrong one has the higher NLL): positive margin =
    the model prefers the right solution."""
    gaps = [w - r for w, r in zip(nll_wrong, nll_right, strict=True)]
    return statistics.fmean(gaps), sum(gap > 0 for gap in gaps) / len(gaps)


# ------------------------------------------------------------------------------------------------------------------
# Scoring a model
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One question and solution as the trainer sees them: the chat template's text, tokenized with offsets."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    first: int  # index of the first completion token (everything after the generation prompt is supervised)
    spans: list[tuple[int, int]]  # result spans, in characters of the whole text


def encode(tokenizer, question: str, solution: str) -> Encoded:
    """Tokenize like `SFTTrainer` does a conversational prompt-completion row: the prompt with the generation prompt,
    then the rest of the full conversation (the solution and the end-of-turn tokens) as the completion."""
    prompt = [{"role": "user", "content": question}]
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": solution}], tokenize=False)
    if not text.startswith(prompt_text) or text.find(solution, len(prompt_text)) != len(prompt_text):
        raise ValueError("The chat template does not put the assistant's solution right after the generation prompt.")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    first = next(i for i, (start, _) in enumerate(offsets) if start >= len(prompt_text))
    spans = [(len(prompt_text) + s, len(prompt_text) + e) for s, e in result_spans(solution)]
    return Encoded(encoding["input_ids"], offsets, max(first, 1), spans)


@torch.no_grad()
def score(model, items: list[Encoded], pad_id: int, batch_size: int) -> list[tuple[list[float], list[bool]]]:
    """Per completion token: NLL −log p(y_t | y_<t) and whether the argmax is y_t, one pair of lists per item."""
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # similar lengths: little padding
    results: list[Any] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        batch = [items[i] for i in order[start : start + batch_size]]
        width = max(len(item.input_ids) for item in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros_like(ids)  # (B, T)
        for row, item in enumerate(batch):
            ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            attention[row, : len(item.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()  # (B, T, V)
        targets = ids[:, 1:].to(device)  # (B, T-1): position t predicts token t + 1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # (B, T-1)
        correct = logits[:, :-1].argmax(-1) == targets  # (B, T-1)
        for row, item in enumerate(batch):
            span = slice(item.first - 1, len(item.input_ids) - 1)  # the predictions of the completion tokens
            results[order[start + row]] = (nll[row, span].tolist(), correct[row, span].tolist())
    return results


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of the questions (chat template, generation prompt), batched with left padding."""
    device = next(model.parameters()).device
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )  # (B, prompt + new)
            new = generated[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


@dataclass
class EvalSet:
    """What every run is scored on, encoded once."""

    clean: list[Encoded] = field(default_factory=list)  # noisy task: held-out clean solutions
    corrupt: list[Encoded] = field(default_factory=list)  # ... and their corrupted copies
    correct: list[Encoded] = field(default_factory=list)  # unlearn task: held-out ground truths
    wrong: list[Encoded] = field(default_factory=list)  # ... and the incorrect model solutions
    questions: list[str] = field(default_factory=list)  # greedy generation
    answers: list[float | None] = field(default_factory=list)


def evaluate(
    model, tokenizer, evalset: EvalSet, which: tuple[str, ...], cli, seconds: dict | None = None
) -> dict[str, list[float]]:
    """Per held-out problem, in the evaluation set's order, the values the metrics are pooled from (METRIC_PARTS):
    `nll_clean`, `nll_corrupt`, `result_hits`, `results` (task "noisy" in `which`), `unlearn_nll_correct`,
    `unlearn_nll_wrong` (task "unlearn"), `answer_right` (when there are questions to generate for). `seconds`, when
    given, receives the time each part took, to the millisecond (the estimate divides by it)."""
    seconds = {} if seconds is None else seconds
    clock = time.perf_counter()
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_problem: dict[str, list[float]] = {}

    def scored(items):
        return score(model, items, pad_id, cli.eval_batch_size)

    if "noisy" in which and evalset.clean:
        clean = scored(evalset.clean)
        per_problem["nll_clean"] = [statistics.fmean(nll) for nll, _ in clean]
        per_problem["nll_corrupt"] = [statistics.fmean(nll) for nll, _ in scored(evalset.corrupt)]
        # per-token flags aligned with the tokens; None on the prompt, which is not scored
        counts = [result_hits(i.offsets, [None] * i.first + ok, i.spans) for i, (_, ok) in zip(evalset.clean, clean)]
        per_problem["result_hits"] = [float(hits) for hits, _ in counts]
        per_problem["results"] = [float(total) for _, total in counts]
        seconds["noisy"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()
    if "unlearn" in which and evalset.correct:
        per_problem["unlearn_nll_correct"] = [statistics.fmean(nll) for nll, _ in scored(evalset.correct)]
        per_problem["unlearn_nll_wrong"] = [statistics.fmean(nll) for nll, _ in scored(evalset.wrong)]
        seconds["unlearn"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()
    if evalset.questions:
        texts = generate_answers(model, tokenizer, evalset.questions, cli.max_new_tokens, cli.eval_batch_size)
        per_problem["answer_right"] = [
            float(gold is not None and (got := final_answer(text)) is not None and math.isclose(got, gold))
            for text, gold in zip(texts, evalset.answers)
        ]
        seconds["generate"] = round(time.perf_counter() - clock, 3)
    return per_problem


def metric_parts(per_problem: dict[str, list[float]], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(num, den), each (n,) over held-out problems, such that the metric is Σ num / Σ den; None when the run lacks a
    value the metric reads."""
    reads, parts = METRIC_PARTS[metric]
    if not all(name in per_problem for name in reads):
        return None
    num, den = parts(*(np.asarray(per_problem[name], dtype=float) for name in reads))
    num = np.asarray(num, dtype=float)
    return num, np.broadcast_to(np.asarray(den, dtype=float), num.shape)


def metrics_of(per_problem: dict[str, list[float]]) -> dict[str, float]:
    """Every metric the per-problem values allow, as the ratio of sums over all problems (nan where Σ den = 0)."""
    metrics = {}
    for metric in METRIC_PARTS:
        parts = metric_parts(per_problem, metric)
        if parts is not None:
            metrics[metric] = float(parts[0].sum() / parts[1].sum()) if parts[1].sum() else math.nan
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# Differences to TRL's SFT: the paired bootstrap
# ------------------------------------------------------------------------------------------------------------------
def ratio_of_sums(num: np.ndarray, den: np.ndarray, problems: np.ndarray) -> np.ndarray:
    """Σ num / Σ den over each resample's problems: num, den (S, n) per seed; problems (R, n) indices -> (S, R)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without any result gives nan, dropped later
        return num[:, problems].sum(-1) / den[:, problems].sum(-1)  # (S, R)


def paired_bootstrap(
    run: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """The difference run − reference of a ratio-of-sums metric, and its paired bootstrap percentile interval.

    `run` and `reference` are (num, den), each (S, n): S seeds (the two may differ) by n held-out problems in the same
    order; the metric of one seed is Σ_e num_e / Σ_e den_e, and a run's is the mean over its seeds. Each of the
    `resamples` draws n problems with replacement, the same for both runs, so the problems' own spread (an easy
    problem is easy for every method) cancels from the difference; a run with several seeds also draws S of its
    seeds with replacement, so the seeds add their spread. Returns (difference on all problems, lower, upper) for the
    central `level` interval. Identical runs give (0, 0, 0) exactly.
    """
    rng = np.random.default_rng(seed)
    n = run[0].shape[1]
    problems = rng.integers(0, n, size=(resamples, n))  # (R, n), shared: the pairing
    means = []
    for num, den in (run, reference):
        per_seed = ratio_of_sums(num, den, problems)  # (S, R)
        if len(num) > 1:  # seeds as a second source of spread
            drawn = rng.integers(0, len(num), size=(len(num), resamples))  # (S, R)
            per_seed = np.take_along_axis(per_seed, drawn, axis=0)
        means.append(per_seed.mean(0))  # (R,)
    every = np.arange(n)[None]  # (1, n): all problems once
    point = ratio_of_sums(*run, every).mean() - ratio_of_sums(*reference, every).mean()
    tail = 100 * (1 - level) / 2
    lower, upper = np.nanpercentile(means[0] - means[1], [tail, 100 - tail])
    return float(point), float(lower), float(upper)


def reference_task(task: str, metric: str) -> str:
    """Which task's `trl_sft` a run is compared with on `metric`: the metric's own task for the base model."""
    if task == "base":
        return "unlearn" if metric in UNLEARN_METRICS else "noisy"
    return task


def stacked_parts(members: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(num, den), each (S, n), of the seeds of one (task, method); None if a seed lacks the metric."""
    parts = [metric_parts(m["per_problem"], metric) for m in members]
    if any(p is None for p in parts):
        return None
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def differences(groups: dict[tuple[str, str], list[dict]], resamples: int) -> dict[tuple[str, str], dict]:
    """Per (task, method) and metric: the difference to `trl_sft` with its interval, and whether it is resolved."""
    found: dict[tuple[str, str], dict] = {}
    for (task, method), members in groups.items():
        found[(task, method)] = {}
        for metric in METRIC_PARTS:
            reference = groups.get((reference_task(task, metric), REFERENCE))
            if method == REFERENCE or reference is None:
                continue
            run_parts, reference_parts = stacked_parts(members, metric), stacked_parts(reference, metric)
            if run_parts is None or reference_parts is None:
                continue
            if run_parts[0].shape[1] != reference_parts[0].shape[1]:
                raise ValueError(f"{task} {method}: {metric} has other held-out problems than {REFERENCE}'s.")
            diff, lower, upper = paired_bootstrap(run_parts, reference_parts, resamples)
            found[(task, method)][metric] = {
                "diff": diff,
                "low": lower,
                "high": upper,
                "resolved": bool(lower > 0 or upper < 0),
            }
    return found


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """A training set: rows (conversational prompt-completion plus record columns) and which columns it has."""

    name: str
    rows: Dataset
    columns: tuple[str, ...]
    learn_only_unless_unlearn: bool  # methods that do not read `unlearn` train on the rows to learn only


def read_jsonl(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [line for line in handle if line.strip()]


def write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def split_test_rows(n_rows: int) -> dict[str, range]:
    """The test file's rows in three disjoint parts by file order: the first 40% for the noisy task's held-out problems
    (and the generated questions), the next 30% for the unlearn task's training questions, the last 30% for its
    held-out pairs. For the 1,000 rows of example_model_solutions.jsonl: 0-399, 400-699, 700-999."""
    first, second = n_rows * 4 // 10, n_rows * 7 // 10
    return {
        "noisy_heldout": range(0, first),
        "unlearn_train": range(first, second),
        "unlearn_heldout": range(second, n_rows),
    }


def as_train_format(line: str) -> str:
    """A test-file row as a train.jsonl row: `question`, and the ground truth as `answer` with its last line `A: N`
    written `#### N`, so that held-out solutions end like the training ones (and the corruption finds the answer)."""
    row = json.loads(line)
    answer = re.sub(r"\nA: ([^\n]*)\s*$", r"\n#### \1", row["ground_truth"])
    return json.dumps({"question": row["question"], "answer": answer})


def build_data(cli, tokenizer, workdir: Path) -> tuple[list[Task], EvalSet, dict[str, Any]]:
    """The noisy and unlearn training sets, the held-out evaluation set, and a record of what was used."""
    data_dir = Path(cli.data_dir)
    train_file = data_dir / "train.jsonl"
    if not train_file.is_file():
        train_file = Path(str(files("trl_priority") / "assets" / "gsm8k_train_256.jsonl"))
        print(f"[data] {data_dir / 'train.jsonl'} not found: using the package's 256-problem slice {train_file}")
    lines = read_jsonl(train_file)
    if cli.train_size > len(lines):
        raise ValueError(f"--train-size {cli.train_size} exceeds the {len(lines)} problems of {train_file}.")
    solutions = Path(cli.solutions or data_dir / "example_model_solutions.jsonl")
    if not solutions.is_file():
        raise FileNotFoundError(
            f"{solutions} not found: the held-out problems are GSM8K test-split questions from openai/grade-school-"
            "math's example_model_solutions.jsonl; give --solutions PATH or --data-dir."
        )
    test_lines = read_jsonl(solutions)
    parts = split_test_rows(len(test_lines))
    record: dict[str, Any] = {
        "train_file": str(train_file),
        "solutions_file": str(solutions),
        "test_split": {name: [rows.start, rows.stop - 1] for name, rows in parts.items()},
    }
    tasks, evalset = [], EvalSet()

    # Noisy: the first train_size problems of train.jsonl, a share corrupted
    train_path = write_jsonl(workdir / "noisy_train.jsonl", lines[: cli.train_size])
    noisy = builtin.load_gsm8k_noisy_spans(train_path, share=cli.noise_share, seed=cli.noise_seed)
    noisy = noisy.add_column("unlearn", noisy["noise"])  # the same record, for the signed methods
    record["corrupted_rows"] = [i for i, flag in enumerate(noisy["noise"]) if flag]
    tasks.append(Task("noisy", noisy, TASK_COLUMNS["noisy"], False))

    # ... held out: test problems of the first part, each clean and corrupted
    heldout_lines = [as_train_format(test_lines[i]) for i in parts["noisy_heldout"]]
    heldout_path = write_jsonl(workdir / "noisy_heldout.jsonl", heldout_lines)
    clean = builtin.load_gsm8k(heldout_path)
    corrupt = builtin.load_gsm8k_noisy(heldout_path, share=1.0, seed=cli.noise_seed)
    kept = [i for i, flag in enumerate(corrupt["noise"]) if flag][: cli.eval_size]  # answers the corruption changes
    if len(kept) < cli.eval_size or cli.generate_size > len(kept):
        raise ValueError(
            f"--eval-size {cli.eval_size} and --generate {cli.generate_size} must each be at most {len(kept)}: the "
            f"usable problems of {solutions}'s rows {parts['noisy_heldout'].start}-{parts['noisy_heldout'].stop - 1}."
        )
    for i in kept:
        question = clean[i]["prompt"][0]["content"]
        evalset.clean.append(encode(tokenizer, question, clean[i]["completion"][0]["content"]))
        evalset.corrupt.append(encode(tokenizer, question, corrupt[i]["completion"][0]["content"]))
    record["heldout_rows"] = [parts["noisy_heldout"].start + i for i in kept]
    record["results"] = sum(len(item.spans) for item in evalset.clean)
    generated = kept[: cli.generate_size]
    evalset.questions = [clean[i]["prompt"][0]["content"] for i in generated]
    evalset.answers = [final_answer(clean[i]["completion"][0]["content"]) for i in generated]

    # Unlearn: ground truth / first incorrect solution pairs; training questions from the second part, held-out
    # pairs from the third
    def pairs_of(part: str) -> Dataset:
        path = write_jsonl(workdir / f"{part}.jsonl", [test_lines[i] for i in parts[part]])
        return builtin.load_gsm8k_contrast(path)  # rows 2i (unlearn 0) and 2i + 1 (unlearn 1)

    if cli.unlearn_methods:
        train_pairs, heldout_pairs = pairs_of("unlearn_train"), pairs_of("unlearn_heldout")
        if 2 * cli.unlearn_train_size > len(train_pairs) or 2 * cli.unlearn_eval_size > len(heldout_pairs):
            raise ValueError(
                f"{solutions}: --unlearn-train-size must be at most {len(train_pairs) // 2} and --unlearn-eval-size "
                f"at most {len(heldout_pairs) // 2} (the questions with an incorrect solution in each part)."
            )
        rows = train_pairs.select(range(2 * cli.unlearn_train_size))
        tasks.append(Task("unlearn", rows, TASK_COLUMNS["unlearn"], True))
        for pair in range(cli.unlearn_eval_size):
            right, wrong = heldout_pairs[2 * pair], heldout_pairs[2 * pair + 1]
            question = right["prompt"][0]["content"]
            evalset.correct.append(encode(tokenizer, question, right["completion"][0]["content"]))
            evalset.wrong.append(encode(tokenizer, question, wrong["completion"][0]["content"]))
    return tasks, evalset, record


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------
def columns_read(method: str, priority_args: dict | None) -> tuple[str, ...]:
    """The dataset columns a method reads (not those the trainer makes or derives from the text)."""
    if method in BASELINES:
        return ()
    priority = get_priority(priority_of(method))
    names = priority.statistics_from("data", priority.resolve_args(priority_args))
    specs = (DATA_STATISTICS[name] for name in names)
    return tuple(spec.column for spec in specs if not spec.generated and spec.column != "completion_mask")


def missing_columns(method: str, task: str, priority_args: dict | None) -> str | None:
    """Why `method` cannot run on `task` (a column it reads that the task lacks), or None."""
    missing = [
        c for c in columns_read(method, priority_args) if c not in TASK_COLUMNS[task] and c not in COMPUTED_COLUMNS
    ]
    if not missing:
        return None
    return (
        f"method '{method}' reads the column(s) {missing}, which the {task} task does not have (it has "
        f"{list(TASK_COLUMNS[task])}): run it in the other task (--methods for noisy, --unlearn-methods for unlearn) "
        "or leave it out"
    )


def lora() -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def optimizer_steps(rows: int, cli) -> int:
    """`--steps` when given, else `--epochs` passes over `rows` examples at `--batch-size` (the last batch partial)."""
    return cli.steps or math.ceil(rows / cli.batch_size) * cli.epochs


def train(method: str, dataset: Dataset, cli, seed: int, model_path: str, tokenizer, ref_model=None):
    """Fine-tune a fresh copy of the base model with LoRA; return the trained model, adapter merged."""
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    steps = optimizer_steps(len(dataset), cli)
    with tempfile.TemporaryDirectory(prefix="quality-") as output_dir:  # nothing is saved; TRL wants a folder
        common = dict(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=cli.batch_size,
            learning_rate=cli.learning_rate,
            lr_scheduler_type="linear",
            max_length=cli.max_length,
            seed=seed,
            bf16=torch.cuda.is_available(),
            gradient_checkpointing=False,  # a 135M model needs no recomputation
            report_to="none",
            save_strategy="no",
            logging_steps=max(1, steps // 4),
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        if method in BASELINES:
            args = SFTConfig(**common, loss_type=BASELINES[method])
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora()
            )
        else:
            args = PrioritySFTConfig(
                **common, priority=priority_of(method), priority_args=args_of(method, cli.priority_args)
            )
            trainer = PrioritySFTTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=lora(),
                ref_model=ref_model,
            )
        trainer.train()
    trained = trainer.model.merge_and_unload()  # one plain model: faster to score and generate with
    del trainer
    gc.collect()
    return trained


class Prepared:
    """Models and columns some methods need first, made once per task (and seed) and labelled in the log."""

    def __init__(self, cli, model_path: str, tokenizer):
        self.cli, self.model_path, self.tokenizer = cli, model_path, tokenizer
        self.models: dict[tuple, Any] = {}
        self.columns: dict[tuple, Dataset] = {}

    def model(self, task: Task, seed: int, rows: str):
        """LoRA SFT (TRL's, same settings) on the task's rows to learn ("clean") or to unlearn ("wrong"), merged."""
        key = (task.name, seed, rows)
        if key not in self.models:
            keep = 0.0 if rows == "clean" else 1.0
            subset = task.rows.filter(lambda row: row["unlearn"] == keep)
            print(f"[prep] {task.name} seed {seed}: SFT on the {len(subset)} {rows} rows ", end="", flush=True)
            start = time.perf_counter()
            subset = subset.select_columns(["prompt", "completion"])
            self.models[key] = train("trl_sft", subset, self.cli, seed, self.model_path, self.tokenizer)
            print(f"({time.perf_counter() - start:.0f}s)", flush=True)
        return self.models[key]

    def column(self, task: Task, seed: int, name: str, dataset: Dataset) -> Dataset:
        key = (task.name, seed if name == "contrastive_score" else None, name)
        if key not in self.columns:
            start = time.perf_counter()
            if name == "contrastive_score":  # Critical Tokens: SFT on correct vs on wrong solutions
                positive, negative = self.model(task, seed, "clean"), self.model(task, seed, "wrong")
                scored = token_scores.contrastive_token_scores(positive, negative, dataset, self.tokenizer)
            elif name == "counterfactual_impact":  # the starting model, one forward per deleted token: no bound
                base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
                scored = token_scores.counterfactual_impact(base, dataset, self.tokenizer, max_tokens=None)
            else:  # T-SHIRT: the starting model's information gain
                base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
                scored = token_scores.information_gain(base, dataset, self.tokenizer)
            self.columns[key] = scored
            print(f"[prep] {task.name}: column {name} ({time.perf_counter() - start:.0f}s)", flush=True)
        return self.columns[key]

    def release(self, seed: int) -> None:
        for key in [key for key in self.models if key[1] == seed]:
            del self.models[key]
        gc.collect()


def rows_of(task: Task, which: str) -> Dataset:
    """A task's rows: "all", those to learn ("clean": `unlearn` 0) or those to unlearn ("wrong": `unlearn` 1)."""
    if which == "all":
        return task.rows
    keep = 0.0 if which == "clean" else 1.0
    return task.rows.filter(lambda row: row["unlearn"] == keep)


def trained_rows(method: str, task: Task, cli) -> str:
    """Which rows a method trains on (see `rows_of`): on the unlearn task, the wrong solutions too only for methods
    that read `unlearn`."""
    if task.learn_only_unless_unlearn and "unlearn" not in columns_read(method, args_of(method, cli.priority_args)):
        return "clean"
    return "all"


def dataset_for(method: str, task: Task, cli, seed: int, prepared: Prepared) -> Dataset:
    """The task's rows with exactly the columns the method reads (TRL's trainer gets prompt and completion only)."""
    reads = columns_read(method, args_of(method, cli.priority_args))
    rows = rows_of(task, trained_rows(method, task, cli))
    problem = missing_columns(method, task.name, args_of(method, cli.priority_args))
    if problem:
        raise ValueError(problem[0].upper() + problem[1:] + ".")
    keep = ["prompt", "completion", *(c for c in reads if c not in COMPUTED_COLUMNS)]
    dataset = rows.select_columns(keep)
    for name in (c for c in reads if c in COMPUTED_COLUMNS):
        with_column = prepared.column(task, seed, name, rows.select_columns(["prompt", "completion"]))
        dataset = dataset.add_column(name, with_column[name])
    return dataset


def prepared_models(method: str, cli) -> tuple[str, ...]:
    """The models `Prepared` trains before `method` can run: SFT on the "clean" rows, on the "wrong" rows."""
    if method in ("base", *BASELINES):
        return ()
    needs = ["clean"] if get_priority(priority_of(method)).reference == "explicit" else []
    if "contrastive_score" in columns_read(method, args_of(method, cli.priority_args)):
        needs += ["clean", "wrong"]
    return tuple(dict.fromkeys(needs))


# ------------------------------------------------------------------------------------------------------------------
# Finished rows on disk: resumable runs
# ------------------------------------------------------------------------------------------------------------------
# The settings that change a run's numbers; rows made under others are not mixed into one table
RESULT_SETTINGS = (
    "model", "train_size", "noise_share", "noise_seed", "epochs", "steps", "batch_size", "learning_rate", "max_length",
    "eval_size", "unlearn_train_size", "unlearn_eval_size", "generate_size", "max_new_tokens",
)  # fmt: skip
ROWS_FILE = "quality_runs.jsonl"


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def settings_key(cli, record: dict) -> str:
    """A short hash of RESULT_SETTINGS and the data files' contents (not their paths: a later session may read the
    same files from another checkout)."""
    fields = {name: getattr(cli, name) for name in RESULT_SETTINGS}
    fields["data"] = [file_digest(record["train_file"]), file_digest(record["solutions_file"])]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def row_id(row: dict) -> tuple[str, str, int | None]:
    return row["task"], row["method"], row["seed"]


def read_rows(path: Path, key: str) -> tuple[dict[tuple, dict], int]:
    """The finished rows of `path` made under settings `key`, by (task, method, seed), the newest winning; and how many
    lines were left out (other settings, or a last line cut short by a killed run)."""
    rows: dict[tuple, dict] = {}
    left_out = 0
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                left_out += 1
                continue
            if row.get("settings_key") == key:
                rows.pop(row_id(row), None)  # re-inserted: a rerun row moves to the end, like its line
                rows[row_id(row)] = row
            else:
                left_out += 1
    return rows, left_out


def append_row(path: Path, row: dict) -> None:
    """One finished row, on disk before the next run starts (flushed and synced: a kill loses no finished row)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def plan_runs(cli) -> list[tuple[str, str, int | None]]:
    """Every (task, method, seed) the command asks for, in run order: the base model once, then seed by seed."""
    plan: list[tuple[str, str, int | None]] = [] if cli.no_base else [("base", "base", None)]
    for seed in cli.seeds:
        plan += [("noisy", method, seed) for method in cli.methods]
        plan += [("unlearn", method, seed) for method in cli.unlearn_methods]
    return plan


def still_to_run(plan: list[tuple], finished: dict[tuple, dict], cli, unlearn_scored: bool) -> list[tuple]:
    """The planned runs without a finished row of the same priority_args (all of them with `--force`). A base row
    made while the unlearn task was skipped is made again once the task is on (`unlearn_scored`)."""

    def done(run: tuple) -> bool:
        row = finished.get(run)
        # a composition's row holds its recipe's priority_args, which the command line does not repeat
        if row is None or row.get("priority_args") != args_of(run[1], cli.priority_args):
            return False
        return not (unlearn_scored and run[0] == "base" and "unlearn_nll_correct" not in row["per_problem"])

    return list(plan) if cli.force else [run for run in plan if not done(run)]


# ------------------------------------------------------------------------------------------------------------------
# The time estimate
# ------------------------------------------------------------------------------------------------------------------
def sequence_tokens(tokenizer, rows: Dataset, max_length: int) -> list[int]:
    """Tokens of each row as the trainer sees it (chat template, prompt and completion), cut at max_length."""
    return [
        min(len(encode(tokenizer, row["prompt"][0]["content"], row["completion"][0]["content"]).input_ids), max_length)
        for row in rows
    ]


def run_tokens(tokens: list[int], cli) -> int:
    """Tokens one training run processes: its optimizer steps times the batch, at the mean sequence length."""
    if not tokens:
        return 0
    return round(optimizer_steps(len(tokens), cli) * min(cli.batch_size, len(tokens)) * statistics.fmean(tokens))


def scored_tokens(evalset: EvalSet, which: tuple[str, ...]) -> int:
    items = (evalset.clean + evalset.corrupt if "noisy" in which else []) + (
        evalset.correct + evalset.wrong if "unlearn" in which else []
    )
    return sum(len(item.input_ids) for item in items)


def generate_steps(evalset: EvalSet, cli) -> int:
    """Decoding steps of one evaluation's greedy generation, at most max_new_tokens per batch."""
    return math.ceil(len(evalset.questions) / cli.eval_batch_size) * cli.max_new_tokens


def evaluated_tasks(task: str) -> tuple[str, ...]:
    return ("noisy", "unlearn") if task == "base" else (task,)


def measured_rates(rows: list[dict]) -> dict[str, float] | None:
    """Per-token rates from finished rows (their own tokens and seconds), or None if there are none to measure."""
    trained = [row for row in rows if row.get("train_tokens") and row.get("train_s")]
    scored = [row for row in rows if row.get("score_tokens")]
    score_s = sum(row["eval_parts_s"].get("noisy", 0) + row["eval_parts_s"].get("unlearn", 0) for row in scored)
    if not trained or not score_s:
        return None
    generated = [row for row in rows if row.get("generate_steps")]
    return {
        "train_tokens_per_s": sum(r["train_tokens"] for r in trained) / sum(r["train_s"] for r in trained),
        "score_tokens_per_s": sum(r["score_tokens"] for r in scored) / score_s,
        "generate_s_per_step": (
            sum(r["eval_parts_s"]["generate"] for r in generated) / sum(r["generate_steps"] for r in generated)
            if generated
            else CPU_RATES["generate_s_per_step"]
        ),
    }


def estimate(todo: list[tuple], tasks: dict[str, Task], evalset: EvalSet, cli, tokenizer, rates: dict) -> dict:
    """Tokens and seconds of the runs still to make: trainings (with the models some methods need first), scoring,
    generation."""
    tokens: dict[tuple[str, str], list[int]] = {}

    def tokens_of(task: str, which: str) -> list[int]:
        if (task, which) not in tokens:
            tokens[(task, which)] = sequence_tokens(tokenizer, rows_of(tasks[task], which), cli.max_length)
        return tokens[(task, which)]

    train_tokens, prepared = 0, set()
    for task, method, seed in todo:
        if method == "base":
            continue
        train_tokens += run_tokens(tokens_of(task, trained_rows(method, tasks[task], cli)), cli)
        for which in prepared_models(method, cli):
            if (task, seed, which) not in prepared:
                prepared.add((task, seed, which))
                train_tokens += run_tokens(tokens_of(task, which), cli)
    score_tokens = sum(scored_tokens(evalset, evaluated_tasks(task)) for task, _, _ in todo)
    steps = generate_steps(evalset, cli) * len(todo)
    seconds = (
        train_tokens / rates["train_tokens_per_s"]
        + score_tokens / rates["score_tokens_per_s"]
        + steps * rates["generate_s_per_step"]
    )
    return {
        "runs": len(todo),
        "trainings": sum(method != "base" for _, method, _ in todo) + len(prepared),
        "train_tokens": train_tokens,
        "score_tokens": score_tokens,
        "generate_steps": steps,
        "seconds": seconds,
    }


def describe_estimate(found: dict, rates: dict, source: str) -> str:
    hours, minutes = divmod(round(found["seconds"] / 60), 60)
    return (
        f"[estimate] {found['runs']} runs to make ({found['trainings']} trainings, {found['train_tokens']:,} training "
        f"tokens; {found['score_tokens']:,} scored tokens; {found['generate_steps']:,} generation steps): about "
        f"{hours} h {minutes:02d} min at {rates['train_tokens_per_s']:.0f} training tokens/s, "
        f"{rates['score_tokens_per_s']:.0f} scored tokens/s, {rates['generate_s_per_step']:.2f} s per generation step "
        f"({source})"
    )


# ------------------------------------------------------------------------------------------------------------------
# Summary and outputs
# ------------------------------------------------------------------------------------------------------------------
def label(task: str, method: str) -> str:
    if method == "base":
        return "base (untrained)"
    if task == "unlearn":
        return f"{method} [unlearn: {'+ wrong' if 'unlearn' in columns_read(method, None) else 'correct only'}]"
    return method


def reads(method: str, priority_args: dict | None) -> list[str]:
    """What a run uses besides the text: the columns it reads, and a reference trained on the record's clean rows."""
    if method in ("base", *BASELINES):
        return []
    used = [f"`{column}`" for column in columns_read(method, priority_args)]
    if get_priority(priority_of(method)).reference == "explicit":
        used.append("reference: SFT on the clean rows")
    if "contrastive_score" in columns_read(method, priority_args):
        used.append("scored by SFT on the clean vs the wrong rows")
    return used


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs by (task, method), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["method"]), []).append(run)
    return groups


def summarize(runs: list[dict], resamples: int) -> list[dict]:
    """Per (task, method): mean, min, max, std over seeds of every metric, and its difference to `trl_sft` with the
    paired bootstrap interval (`differences`)."""
    groups = group_runs(runs)
    found = differences(groups, resamples)
    rows = []
    for (task, method), members in groups.items():
        row = {"task": task, "method": method, "label": label(task, method), "seeds": [m["seed"] for m in members]}
        row["reads"] = members[0]["reads"]
        for key in sorted({k for m in members for k in m["metrics"]}):
            values = [m["metrics"][key] for m in members if not math.isnan(m["metrics"].get(key, math.nan))]
            if values:
                row[key] = {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
        row["differences"] = found[(task, method)]
        rows.append(row)
    return rows


def markdown_table(summary: list[dict]) -> str:
    """The values (mean over seeds ± half the min-max range), then the differences to `trl_sft` with intervals."""
    header = "| method | reads | " + " | ".join(title for _, title, _ in METRICS) + " |"
    # a table filled a few runs at a time can have more seeds on some rows than on others: each row then says how many
    mixed = len({len(row["seeds"]) for row in summary if row["method"] != "base"}) > 1
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for row in summary:
        cells = []
        for key, _, _ in METRICS:
            if key not in row:
                cells.append("—")
            elif row[key]["n"] == 1:
                cells.append(f"{row[key]['mean']:.3f}")
            else:
                cells.append(f"{row[key]['mean']:.3f} ± {(row[key]['max'] - row[key]['min']) / 2:.3f}")
        n = len(row["seeds"])
        seeds = f" ({n} seed{'s' if n > 1 else ''})" if mixed and row["method"] != "base" else ""
        lines.append(f"| {row['label']}{seeds} | {', '.join(row['reads']) or '—'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Difference to `{REFERENCE}` of the same task, [paired bootstrap 95% interval over held-out problems]; "
        "`*`: the interval excludes 0 (resolved).",
        "",
        "| method | " + " | ".join(title for _, title, _ in METRICS) + " | resolved |",
        "|" + "---|" * (len(METRICS) + 2),
    ]
    for row in summary:
        shown = row["differences"]
        cells = []
        for key, _, _ in METRICS:
            if row["method"] == REFERENCE and key in row:
                cells.append("reference")
            elif key in shown:
                d = shown[key]
                cells.append(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{' *' if d['resolved'] else ''}")
            else:
                cells.append("—")
        tallied = [shown[key] for key, _, _ in METRICS if key in shown]  # the table's metrics, not pref
        resolved = f"{sum(d['resolved'] for d in tallied)} of {len(tallied)}" if tallied else "—"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {resolved} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """One panel per metric: each run's difference to `trl_sft` (a point) and its 95% interval (a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m[0] in row["differences"] for row in summary)]
    if not metrics:
        return
    cols = min(4, len(metrics))
    rows_ = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 0.4 * len(summary) * rows_ + 1.5), squeeze=False)
    for ax, (key, title, better) in zip(axes.flat, metrics):
        present = [row for row in summary if key in row["differences"]]
        shown = [row["differences"][key] for row in present]
        colors = ["#c0392b" if d["resolved"] else "#7f8c8d" for d in shown]
        y = list(range(len(present)))
        ax.hlines(y, [d["low"] for d in shown], [d["high"] for d in shown], colors=colors)
        ax.scatter([d["diff"] for d in shown], y, c=colors, s=14, zorder=3)
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks(y, [row["label"] for row in present], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{title} − {REFERENCE}" + (f" ({better} is better)" if better else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(
        f"GSM8K quality: difference to {REFERENCE}, paired bootstrap 95% interval (red: excludes 0)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (
        f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores visible, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def write_outputs(runs: list[dict], cli, record: dict, output_dir: Path, command: str) -> dict:
    """quality.json, quality.md and quality.png from every finished row of these settings (this session's and
    earlier ones')."""
    summary = summarize(runs, cli.resamples)
    table = markdown_table(summary)
    settings = {k: v for k, v in vars(cli).items() if k not in ("full", "dry_run", "force")}
    hours = sum(run["train_s"] + run["eval_s"] for run in runs) / 3600
    result = {
        "command": command,
        "machine": machine(),
        "run_hours": round(hours, 2),
        "settings": settings,
        "data": record,
        "runs": runs,
        "summary": summary,
    }
    (output_dir / "quality.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(summary, output_dir / "quality.png")
    machines = sorted({run.get("machine", "?") for run in runs})
    commands = list(dict.fromkeys(run.get("command", command) for run in runs))  # a table filled across sessions
    steps = f"{cli.steps} optimizer step(s)" if cli.steps else f"{cli.epochs} epoch(s)"
    (output_dir / "quality.md").write_text(
        f"# GSM8K quality benchmark\n\n{'; '.join(f'`{c}`' for c in commands)}\n\n"
        f"{'; '.join(machines)}; {hours:.2f} h of training and "
        f"evaluation in {len(runs)} runs; {steps} at batch {cli.batch_size}, learning rate {cli.learning_rate}; "
        f"noisy task: {cli.train_size} problems, {len(record['corrupted_rows'])} corrupted; "
        f"{len(record['heldout_rows'])} held-out problems ({record['results']} results); unlearn task: "
        f"{cli.unlearn_train_size} questions, {cli.unlearn_eval_size} held-out pairs; {cli.generate_size} generated "
        f"questions; {cli.resamples} bootstrap resamples.\n\n"
        f"Mean over seeds ± half the min-max range; metric definitions in scripts/benchmark_quality.py.\n\n"
        f"{table}\n",
        encoding="utf-8",
    )
    return result


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default = PRESETS["default"]
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Runtime: the default (10 trained methods on the noisy task, 2 on the unlearn task, the base model, one "
            "seed) takes hours on 2 CPU cores; --dry-run prints the estimate for any command without training, and "
            "a run can be stopped and resumed (finished rows are kept in --output-dir/quality_runs.jsonl). --full "
            "(every method, 3 seeds, ~1,000 training problems, 400 held-out ones) is for a GPU."
        ),
    )
    parser.add_argument("--full", action="store_true", help="the preset for a GPU: every method, 3 seeds, more data")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, then stop")
    parser.add_argument("--force", action="store_true", help="rerun (task, method, seed) rows already finished")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="a model folder or builtin: name")
    parser.add_argument("--data-dir", default=str(REPO / ".." / "shared" / "data" / "gsm8k"), help="GSM8K folder")
    parser.add_argument("--solutions", help="example_model_solutions.jsonl (default: in --data-dir)")
    parser.add_argument("--output-dir", default=str(REPO / "docs" / "benchmarks"))
    parser.add_argument(
        "--methods", help=f"noisy task: registered priorities or trl_sft, trl_dft ({default['methods']})"
    )
    parser.add_argument("--unlearn-methods", help=f"unlearn task ({default['unlearn_methods']}); '' skips the task")
    parser.add_argument("--priority-args", default="{}", help='JSON: {"method": {...priority_args}}')
    parser.add_argument("--seeds", help=f"comma-separated ({default['seeds']})")
    parser.add_argument("--train-size", type=int, help=f"noisy training problems ({default['train_size']})")
    parser.add_argument("--noise-share", type=float, default=0.3, help="share of corrupted training solutions")
    parser.add_argument("--noise-seed", type=int, default=0, help="which rows are corrupted, and how (fixed)")
    parser.add_argument("--epochs", type=int, help=f"passes over the training rows ({default['epochs']})")
    parser.add_argument("--steps", type=int, help="optimizer steps per run instead of --epochs (tests, probes)")
    parser.add_argument("--batch-size", type=int, help=f"examples per step ({default['batch_size']})")
    parser.add_argument("--learning-rate", type=float, help=f"LoRA learning rate ({default['learning_rate']})")
    parser.add_argument("--max-length", type=int, default=320, help="training sequence length in tokens")
    parser.add_argument("--eval-size", type=int, help=f"held-out noisy-task problems ({default['eval_size']})")
    parser.add_argument("--unlearn-train-size", type=int, help=f"questions ({default['unlearn_train_size']})")
    parser.add_argument("--unlearn-eval-size", type=int, help=f"held-out pairs ({default['unlearn_eval_size']})")
    parser.add_argument(
        "--generate",
        "--generate-size",
        dest="generate_size",
        type=int,
        help=f"held-out questions answered by greedy generation ({default['generate_size']}: slow on a CPU)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per difference")
    parser.add_argument(
        "--no-base",
        action="store_true",
        help="leave the base model out: for all but one of several processes filling one table in parallel, each "
        "with its own --output-dir (then concatenate their quality_runs.jsonl into one and run once more)",
    )
    cli = parser.parse_args(argv)
    for key, value in PRESETS["full" if cli.full else "default"].items():
        if getattr(cli, key) is None:
            setattr(cli, key, value)
    cli.methods = [m for m in cli.methods.split(",") if m]
    cli.unlearn_methods = [m for m in cli.unlearn_methods.split(",") if m]
    cli.seeds = [int(s) for s in cli.seeds.split(",")]
    try:
        cli.priority_args = json.loads(cli.priority_args)
    except json.JSONDecodeError as error:
        parser.error(f"--priority-args is not valid JSON ({error}): give an object such as '{{\"robustft\": {{}}}}'")
    known = {"base", *BASELINES, *available_priorities(), *COMPOSED}
    unknown = [m for m in (*cli.methods, *cli.unlearn_methods) if m not in known]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(sorted(known))}")
    cli.methods = [m for m in cli.methods if m != "base"]  # the base model is always evaluated, once
    cli.unlearn_methods = [m for m in cli.unlearn_methods if m != "base"]
    # A bad priority_args or a column the task lacks fails now, not mid-run
    for task, methods in (("noisy", cli.methods), ("unlearn", cli.unlearn_methods)):
        for method in methods:
            problem = missing_columns(method, task, args_of(method, cli.priority_args))
            if problem:
                parser.error(problem)
    return cli


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    command = "python scripts/benchmark_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        import matplotlib  # noqa: F401  (the chart is drawn after each run: fail now, not after the first)
    except ImportError as error:
        raise SystemExit("The chart needs matplotlib: pip install matplotlib (or pip install -e '.[dev]').") from error
    model_path = builtin.resolve_model(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    output_dir = Path(cli.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; model {cli.model}", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        task_list, evalset, record = build_data(cli, tokenizer, Path(workdir))
    tasks = {task.name: task for task in task_list}
    print(
        f"[data] noisy: {len(tasks['noisy'].rows)} training problems, corrupted rows {record['corrupted_rows']}; "
        f"{len(evalset.clean)} held-out problems ({record['results']} results); unlearn: "
        f"{len(evalset.correct)} held-out pairs; {len(evalset.questions)} generated questions; test-file split "
        f"{record['test_split']}",
        flush=True,
    )
    key = settings_key(cli, record)
    rows_path = output_dir / ROWS_FILE
    finished, left_out = read_rows(rows_path, key)
    todo = still_to_run(plan_runs(cli), finished, cli, bool(evalset.correct))
    print(
        f"[resume] {rows_path}: {len(finished)} finished rows of these settings (key {key})"
        + (f", {left_out} other lines left out" if left_out else "")
        + f"; {len(todo)} runs to make: {', '.join(f'{t}/{m}/{s}' for t, m, s in todo) or 'none'}",
        flush=True,
    )
    rates = measured_rates(list(finished.values()))
    source = f"measured on {len(finished)} finished rows of {rows_path}"
    if rates is None:
        rates, source = CPU_RATES, "constants measured on a shared 2-core CPU, CPU_RATES in the script"
    print(describe_estimate(estimate(todo, tasks, evalset, cli, tokenizer, rates), rates, source), flush=True)
    if cli.dry_run:
        return {"settings_key": key, "todo": todo, "finished": list(finished)}

    prepared = Prepared(cli, model_path, tokenizer)

    def record_run(task, method, seed, model, train_s, train_tokens):
        start, seconds = time.perf_counter(), {}
        per_problem = evaluate(model, tokenizer, evalset, evaluated_tasks(task), cli, seconds)
        row = {
            "task": task,
            "method": method,
            "seed": seed,
            "settings_key": key,
            "priority_args": args_of(method, cli.priority_args),
            "reads": reads(method, args_of(method, cli.priority_args)),
            "metrics": metrics_of(per_problem),
            "per_problem": per_problem,
            "train_s": round(train_s, 1),
            "train_tokens": train_tokens,
            "eval_s": round(time.perf_counter() - start, 1),
            "eval_parts_s": seconds,
            "score_tokens": scored_tokens(evalset, evaluated_tasks(task)),
            "generate_steps": generate_steps(evalset, cli),
            "machine": machine(),
            "command": command,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        append_row(rows_path, row)
        finished.pop(row_id(row), None)
        finished[row_id(row)] = row
        write_outputs(list(finished.values()), cli, record, output_dir, command)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in row["metrics"].items())
        print(f"[run] {task} {method} seed {seed}: {shown} (train {train_s:.0f}s, eval {row['eval_s']:.0f}s)")
        sys.stdout.flush()

    started = time.perf_counter()
    for task_name, method, seed in todo:
        if method == "base":
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            record_run("base", "base", None, base.to("cuda") if torch.cuda.is_available() else base, 0.0, 0)
            del base
            continue
        for stale in {key[1] for key in prepared.models} - {seed}:
            prepared.release(stale)  # the models made first for an earlier seed are not needed again
        task = tasks[task_name]
        dataset = dataset_for(method, task, cli, seed, prepared)
        ref_model = None
        if method not in BASELINES and get_priority(priority_of(method)).reference == "explicit":
            ref_model = prepared.model(task, seed, "clean")
        train_tokens = run_tokens(sequence_tokens(tokenizer, dataset, cli.max_length), cli)
        start = time.perf_counter()
        model = train(method, dataset, cli, seed, model_path, tokenizer, ref_model)
        record_run(task_name, method, seed, model, time.perf_counter() - start, train_tokens)
        del model
        gc.collect()
    result = write_outputs(list(finished.values()), cli, record, output_dir, command) if finished else {}
    if result:
        print(f"\n{markdown_table(result['summary'])}\n")
    print(f"this session: {(time.perf_counter() - started) / 60:.1f} min; written to {output_dir}/quality.*")
    return result


if __name__ == "__main__":
    main()
