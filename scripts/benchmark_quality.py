"""Quality of priority methods on GSM8K: learning from noisy demonstrations, and unlearning wrong solutions.

Each method fine-tunes SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, offline) with LoRA (r 16, alpha 32,
all linear layers) for a fixed number of optimizer steps, once per seed, and every run is scored on problems it never
trained on. Baselines in the same table: the base model untrained, TRL's `SFTTrainer(loss_type="nll")` (`trl_sft`)
and `SFTTrainer(loss_type="dft")` (`trl_dft`). `sft` and `dft` of this library reproduce those two bit for bit, so
the default runs them only as TRL's.

    python scripts/benchmark_quality.py                  # CPU default, about half an hour on 2 cores (see --help)
    python scripts/benchmark_quality.py --full           # every method, 3 seeds, larger slices: for a GPU
    python scripts/benchmark_quality.py --methods trl_sft,eaft,verifier --seeds 0,1,2
    python scripts/benchmark_quality.py --methods trl_sft,verifier,prift_prob,verified_prift   # a composition

A composed priority runs under its recipe's name (`verified_prift`: verifier × PriFT-prob, `COMPOSED_RECIPES`),
with the recipe's `priority_args` unless `--priority-args` gives its own.

Task "noisy" (learning from noisy demonstrations). Training data: the first `--train-size` problems of GSM8K's
train.jsonl, with a share `--noise-share` (30%) of the solutions corrupted by `builtin:gsm8k-noisy`'s own corruption
(`trl_priority.builtin.load_gsm8k_noisy`, fixed `--noise-seed`): the final answer N is replaced by a wrong number
N + k (k in 1..9) wherever it stands as a whole number, that is in the last calculation's result (`<<a*b=N>>N`), the
closing sentence and the `#### N` line; earlier intermediate results are unchanged. The record of which rows were
corrupted is the example-level column `noise` (1 corrupted, 0 clean), given to the methods that read it: `robustft`
reads `noise`, `forgetting_data` and `critical` read the same record as `unlearn`, `faithful` and `ignorance` read the
corrupted numbers as character spans (`nonfactual`, `made_up`, from `load_gsm8k_noisy_spans`). The other methods see
only the text. Held-out data: the last `--eval-size` problems of train.jsonl (disjoint from the training slice), with
their clean solutions and a copy corrupted the same way (every such problem; those whose answer is not a whole
number, which the corruption cannot change, are left out). For a held-out problem e with clean solution c_e and
corrupted copy w_e, and completion tokens y_1..y_n (the solution and the chat template's end-of-turn tokens, as
`SFTTrainer` supervises them), NLL(s) = −(1/n) Σ_t log p_θ(y_t | prompt, y_<t):

- `nll_clean`   = mean_e NLL(c_e)                                  (lower: the model imitates correct work)
- `nll_corrupt` = mean_e NLL(w_e)
- `margin`      = mean_e [NLL(w_e) − NLL(c_e)] = nll_corrupt − nll_clean   (higher: prefers the clean solution)
- `pref`        = share of e with NLL(w_e) > NLL(c_e)               (JSON only)
- `result_acc`  = teacher-forced result accuracy on the clean solutions: of all results, the numbers written right
  after `=` (`<<48/2=24>>` and `48/2 = 24` alike) or after `####`, the share whose every overlapping token is the
  model's argmax prediction given the gold prefix, pooled over problems: Σ_e hits_e / Σ_e results_e.
- `answer_acc`  = final-answer accuracy by greedy generation (batched, `--max-new-tokens` 256) on `--generate-size`
  questions of example_model_solutions.jsonl's second part (GSM8K test-split questions that no run trains on); the
  answer is the number after the last `####`, else the last number of the text, compared as numbers (commas
  stripped) with the ground truth's (`A: N`). Without that file: on the held-out train.jsonl questions instead.

Task "unlearn" (unlearning real wrong solutions). openai/grade-school-math's example_model_solutions.jsonl holds
1,000 GSM8K test-split questions with their ground truth and four model solutions; `builtin:gsm8k-contrast:<file>`
pairs each question that has an incorrect solution (876) with its first incorrect one. The pairs are split in two
halves by file order: methods train on the first `--unlearn-train-size` questions of the first half, and are scored on
the first `--unlearn-eval-size` pairs of the second half. A method that reads `unlearn` (`forgetting_data`,
`critical`) trains on both solutions of each question (`unlearn` 0 on the ground truth, 1 on the wrong one); any other
method trains on the ground truths alone (learning the wrong ones would be the opposite of the task). With g_e the
ground truth and w_e the incorrect solution of held-out question e (NLL as above):

- `unlearn_nll_correct` = mean_e NLL(g_e)                          (lower: correct work stays likely)
- `unlearn_margin`      = mean_e [NLL(w_e) − NLL(g_e)]             (higher: wrong solutions less likely than right)
- `unlearn_pref`        = share of e with NLL(w_e) > NLL(g_e)       (JSON only)
- `answer_acc` as above.

Each run is scored on its own task's metrics and `answer_acc` ("—" elsewhere); the untrained base on all of them.

Methods needing more than the data. A trained ("explicit") reference (`rho1`, `forgetting`, `token_cleaning`,
`selectkd`, `swift`) gets a model trained first, once per task and seed, in a clearly labelled step: LoRA SFT with the
same settings on the rows the record marks clean (noisy task) or on the ground truths (unlearn task), merged. `critical`
gets its `contrastive_score` column from that model and one trained the same way on the corrupted / wrong rows
(`trl_priority.token_scores.contrastive_token_scores`); `tshirt` gets `information_gain` from the base model
(`trl_priority.token_scores.information_gain`). These columns use the record of corrupted rows, like `robustft`.

Summary: per method, the mean over seeds and the spread, shown as ± half the min-max range (with two seeds the
interval is exactly the two values); the JSON also has min, max and the standard deviation. The base model is
deterministic and evaluated once. Outputs in `--output-dir`: `quality.md` (the table), `quality.json` (every run, the
settings, the corrupted rows), `quality.png` (one panel per metric: the mean, the min-max range and each seed).
"""

from __future__ import annotations

import argparse
import gc
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

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

from trl_priority import (
    PrioritySFTConfig,
    PrioritySFTTrainer,
    available_priorities,
    builtin,
    get_priority,
    token_scores,
)
from trl_priority.statistics import DATA_STATISTICS


REPO = Path(__file__).resolve().parents[1]
BASELINES = {"trl_sft": "nll", "trl_dft": "dft"}  # TRL's own SFTTrainer, by loss_type
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
NOISY_METRICS = ("nll_clean", "nll_corrupt", "margin", "pref", "result_acc")
UNLEARN_METRICS = ("unlearn_nll_correct", "unlearn_margin", "unlearn_pref")
# Columns each task's dataset carries (the record of corrupted / wrong rows), and columns computed on demand
TASK_COLUMNS = {"noisy": ("noise", "unlearn", "nonfactual", "made_up"), "unlearn": ("unlearn",)}
COMPUTED_COLUMNS = ("contrastive_score", "information_gain")

PRESETS = {
    # About half an hour on 2 CPU cores shared with other work: 12 LoRA runs of 6 steps x 2 examples (~220 tokens
    # each: ~1-2 min at 20-50 training tokens/s) and 13 evaluations (8 + 8 scored pairs, 6 greedy generations:
    # ~1-2 min each). A first attempt at 8 steps, 10 + 10 pairs and 8 generations projected to over an hour there.
    "default": dict(
        methods="trl_sft,trl_dft,prift_prob,robustft",
        unlearn_methods="trl_sft,forgetting_data",
        seeds="0,1",
        train_size=12,
        steps=6,
        batch_size=2,
        learning_rate=5e-4,
        eval_size=8,
        unlearn_train_size=6,
        unlearn_eval_size=8,
        generate_size=6,
    ),
    # Every registered method, 3 seeds, a larger slice: for a GPU (hours on a CPU)
    "full": dict(
        methods=",".join(["trl_sft", "trl_dft", *available_priorities(), *COMPOSED]),
        unlearn_methods="trl_sft,trl_dft,forgetting_data,critical",
        seeds="0,1,2",
        train_size=1024,
        steps=256,
        batch_size=4,
        learning_rate=2e-4,
        eval_size=200,
        unlearn_train_size=400,
        unlearn_eval_size=200,
        generate_size=250,
    ),
}


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
) -> dict[str, float]:
    """The metrics of the module docstring, for the tasks in `which` ("noisy", "unlearn"), and `answer_acc`.
    `seconds`, when given, receives the time each part took."""
    seconds = {} if seconds is None else seconds
    clock = time.perf_counter()
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics: dict[str, float] = {}

    def mean_nlls(items):
        scored = score(model, items, pad_id, cli.eval_batch_size)
        return [statistics.fmean(nll) for nll, _ in scored], scored

    if "noisy" in which and evalset.clean:
        clean, scored = mean_nlls(evalset.clean)
        corrupt, _ = mean_nlls(evalset.corrupt)
        metrics["nll_clean"], metrics["nll_corrupt"] = statistics.fmean(clean), statistics.fmean(corrupt)
        metrics["margin"], metrics["pref"] = nll_margin(corrupt, clean)
        hits = total = 0
        for item, (_, correct) in zip(evalset.clean, scored):
            # per-token flags aligned with the tokens; None on the prompt, which is not scored
            flags = [None] * item.first + correct
            h, t = result_hits(item.offsets, flags, item.spans)
            hits, total = hits + h, total + t
        metrics["result_acc"] = hits / total if total else math.nan
        seconds["noisy"], clock = round(time.perf_counter() - clock, 1), time.perf_counter()
    if "unlearn" in which and evalset.correct:
        correct, _ = mean_nlls(evalset.correct)
        wrong, _ = mean_nlls(evalset.wrong)
        metrics["unlearn_nll_correct"] = statistics.fmean(correct)
        metrics["unlearn_margin"], metrics["unlearn_pref"] = nll_margin(wrong, correct)
        seconds["unlearn"], clock = round(time.perf_counter() - clock, 1), time.perf_counter()
    if evalset.questions:
        texts = generate_answers(model, tokenizer, evalset.questions, cli.max_new_tokens, cli.eval_batch_size)
        right = [
            gold is not None and (got := final_answer(text)) is not None and math.isclose(got, gold)
            for text, gold in zip(texts, evalset.answers)
        ]
        metrics["answer_acc"] = sum(right) / len(right)
        seconds["generate"] = round(time.perf_counter() - clock, 1)
    return metrics


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


def build_data(cli, tokenizer, workdir: Path) -> tuple[list[Task], EvalSet, dict[str, Any]]:
    """The noisy and unlearn training sets, the held-out evaluation set, and a record of what was used."""
    data_dir = Path(cli.data_dir)
    train_file = data_dir / "train.jsonl"
    if not train_file.is_file():
        train_file = Path(str(files("trl_priority") / "assets" / "gsm8k_train_256.jsonl"))
        print(f"[data] {data_dir / 'train.jsonl'} not found: using the package's 256-problem slice {train_file}")
    lines = read_jsonl(train_file)
    if cli.train_size + cli.eval_size > len(lines):
        raise ValueError(
            f"--train-size {cli.train_size} + --eval-size {cli.eval_size} exceed the {len(lines)} problems of "
            f"{train_file}: lower them, or point --data-dir at GSM8K's full train.jsonl."
        )
    record: dict[str, Any] = {"train_file": str(train_file)}
    tasks, evalset = [], EvalSet()

    # Noisy: the first train_size problems, a share corrupted; held out: the last eval_size problems
    train_path = write_jsonl(workdir / "noisy_train.jsonl", lines[: cli.train_size])
    noisy = builtin.load_gsm8k_noisy_spans(train_path, share=cli.noise_share, seed=cli.noise_seed)
    noisy = noisy.add_column("unlearn", noisy["noise"])  # the same record, for the signed methods
    record["corrupted_rows"] = [i for i, flag in enumerate(noisy["noise"]) if flag]
    tasks.append(Task("noisy", noisy, TASK_COLUMNS["noisy"], False))
    heldout_path = write_jsonl(workdir / "noisy_heldout.jsonl", lines[len(lines) - cli.eval_size :])
    clean = builtin.load_gsm8k(heldout_path)
    corrupt = builtin.load_gsm8k_noisy(heldout_path, share=1.0, seed=cli.noise_seed)
    kept = [i for i, flag in enumerate(corrupt["noise"]) if flag]  # answers the corruption could change
    for i in kept:
        question = clean[i]["prompt"][0]["content"]
        evalset.clean.append(encode(tokenizer, question, clean[i]["completion"][0]["content"]))
        evalset.corrupt.append(encode(tokenizer, question, corrupt[i]["completion"][0]["content"]))
    record["heldout_rows"] = [len(lines) - cli.eval_size + i for i in kept]

    # Unlearn: ground truth / first incorrect solution pairs, split in halves by file order
    solutions = Path(cli.solutions or data_dir / "example_model_solutions.jsonl")
    if solutions.is_file() and cli.unlearn_methods:
        contrast = builtin.load_gsm8k_contrast(str(solutions))  # rows 2i (unlearn 0) and 2i + 1 (unlearn 1)
        pairs = len(contrast) // 2
        half = pairs // 2
        if cli.unlearn_train_size > half or max(cli.unlearn_eval_size, cli.generate_size) > pairs - half:
            raise ValueError(
                f"{solutions} has {pairs} questions with an incorrect solution, {half} per half: "
                f"--unlearn-train-size, --unlearn-eval-size and --generate-size must each be at most {half}."
            )
        rows = contrast.select(range(2 * cli.unlearn_train_size))
        tasks.append(Task("unlearn", rows, TASK_COLUMNS["unlearn"], True))
        seen = {row["prompt"][0]["content"] for row in rows}
        for pair in range(half, half + cli.unlearn_eval_size):
            right, wrong = contrast[2 * pair], contrast[2 * pair + 1]
            question = right["prompt"][0]["content"]
            evalset.correct.append(encode(tokenizer, question, right["completion"][0]["content"]))
            evalset.wrong.append(encode(tokenizer, question, wrong["completion"][0]["content"]))
        generate = [contrast[2 * pair] for pair in range(half, half + cli.generate_size)]
        evalset.questions = [row["prompt"][0]["content"] for row in generate]
        evalset.answers = [final_answer(row["completion"][0]["content"]) for row in generate]
        held_out = {*evalset.questions, *(contrast[2 * p]["prompt"][0]["content"] for p in range(half, pairs))}
        if seen & held_out:  # questions repeated across the halves would leak
            raise ValueError(f"{solutions}: a question of the second half is also in the first; deduplicate it.")
        record["solutions_file"] = str(solutions)
        record["generate_questions"] = "example_model_solutions.jsonl, second half (GSM8K test split)"
    else:
        if cli.unlearn_methods:
            print(f"[data] {solutions} not found: the unlearn task is skipped (give --solutions PATH)")
        cli.unlearn_methods = []
        heldout = [clean[i] for i in range(min(cli.generate_size, len(clean)))]
        evalset.questions = [row["prompt"][0]["content"] for row in heldout]
        evalset.answers = [final_answer(row["completion"][0]["content"]) for row in heldout]
        record["generate_questions"] = "held-out train.jsonl problems (no example_model_solutions.jsonl)"
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


def train(method: str, dataset: Dataset, cli, seed: int, model_path: str, tokenizer, ref_model=None):
    """Fine-tune a fresh copy of the base model with LoRA; return the trained model, adapter merged."""
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="quality-") as output_dir:  # nothing is saved; TRL wants a folder
        common = dict(
            output_dir=output_dir,
            max_steps=cli.steps,
            per_device_train_batch_size=cli.batch_size,
            learning_rate=cli.learning_rate,
            lr_scheduler_type="linear",
            max_length=cli.max_length,
            seed=seed,
            bf16=torch.cuda.is_available(),
            gradient_checkpointing=False,  # a 135M model needs no recomputation
            report_to="none",
            save_strategy="no",
            logging_steps=max(1, cli.steps // 4),
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


def dataset_for(method: str, task: Task, cli, seed: int, prepared: Prepared) -> Dataset:
    """The task's rows with exactly the columns the method reads (TRL's trainer gets prompt and completion only)."""
    reads = columns_read(method, args_of(method, cli.priority_args))
    rows = task.rows
    if task.learn_only_unless_unlearn and "unlearn" not in reads:
        rows = rows.filter(lambda row: row["unlearn"] == 0.0)
    problem = missing_columns(method, task.name, args_of(method, cli.priority_args))
    if problem:
        raise ValueError(problem[0].upper() + problem[1:] + ".")
    keep = ["prompt", "completion", *(c for c in reads if c not in COMPUTED_COLUMNS)]
    dataset = rows.select_columns(keep)
    for name in (c for c in reads if c in COMPUTED_COLUMNS):
        with_column = prepared.column(task, seed, name, rows.select_columns(["prompt", "completion"]))
        dataset = dataset.add_column(name, with_column[name])
    return dataset


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


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, method): mean, min, max, std over seeds of every metric, in run order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["method"]), []).append(run)
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
        rows.append(row)
    return rows


def markdown_table(summary: list[dict]) -> str:
    header = "| method | reads | " + " | ".join(title for _, title, _ in METRICS) + " |"
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
        lines.append(f"| {row['label']} | {', '.join(row['reads']) or '—'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m[0] in row for row in summary)]
    cols = min(4, len(metrics))
    rows_ = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 0.45 * len(summary) * rows_ + 1.5), squeeze=False)
    for ax, (key, title, better) in zip(axes.flat, metrics):
        present = [row for row in summary if key in row]
        y = list(range(len(present)))
        # Points, not bars: the axes zoom on the values, and a bar's length from a cut axis would mislead
        ax.hlines(y, [row[key]["min"] for row in present], [row[key]["max"] for row in present], color="#333333")
        ax.plot([row[key]["mean"] for row in present], y, "|", color="#1f4e79", markersize=14, markeredgewidth=2)
        for i, row in enumerate(present):
            values = [r["metrics"][key] for r in runs if (r["task"], r["method"]) == (row["task"], row["method"])]
            ax.plot(values, [i] * len(values), "o", color="#c0392b", markersize=3)
        ax.set_yticks(y, [row["label"] for row in present], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title + (f" ({better} is better)" if better else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        lo = min(row[key]["min"] for row in present)
        hi = max(row[key]["max"] for row in present)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 0.05
        ax.set_xlim(lo - pad, hi + pad)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle("GSM8K quality: mean over seeds (blue tick), min-max (line), each seed (red dots)", fontsize=10)
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


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default = PRESETS["default"]
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Runtime: the default (4 methods on the noisy task, 2 on the unlearn task, the base model, 2 seeds: 12 "
            "short LoRA runs and 13 evaluations) is sized to finish in about half an hour on 2 CPU cores, where LoRA "
            "training of this model runs at about 50 tokens/s, slower on a shared machine (measured: 28 minutes with "
            "OMP_NUM_THREADS=1 on a shared 2-core machine, docs/benchmarks_quality.md). --full (every method, 3 "
            "seeds, ~1,000 training problems, 200 held-out ones) is for a GPU."
        ),
    )
    parser.add_argument("--full", action="store_true", help="the preset for a GPU: every method, 3 seeds, more data")
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
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run ({default['steps']})")
    parser.add_argument("--batch-size", type=int, help=f"examples per step ({default['batch_size']})")
    parser.add_argument("--learning-rate", type=float, help=f"LoRA learning rate ({default['learning_rate']})")
    parser.add_argument("--max-length", type=int, default=320, help="training sequence length in tokens")
    parser.add_argument("--eval-size", type=int, help=f"held-out noisy-task problems ({default['eval_size']})")
    parser.add_argument("--unlearn-train-size", type=int, help=f"questions ({default['unlearn_train_size']})")
    parser.add_argument("--unlearn-eval-size", type=int, help=f"held-out pairs ({default['unlearn_eval_size']})")
    parser.add_argument("--generate-size", type=int, help=f"questions generated ({default['generate_size']})")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=8)
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
    try:
        import matplotlib  # noqa: F401  (the chart is drawn at the end: fail now, not after the runs)
    except ImportError as error:
        raise SystemExit("The chart needs matplotlib: pip install matplotlib (or pip install -e '.[dev]').") from error
    started = time.perf_counter()
    model_path = builtin.resolve_model(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    output_dir = Path(cli.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; model {cli.model}", flush=True)

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        tasks, evalset, record = build_data(cli, tokenizer, Path(workdir))
    print(
        f"[data] noisy: {len(tasks[0].rows)} training problems, corrupted rows {record['corrupted_rows']}; "
        f"{len(evalset.clean)} held-out pairs; unlearn: {len(evalset.correct)} held-out pairs; "
        f"{len(evalset.questions)} generated questions",
        flush=True,
    )
    prepared = Prepared(cli, model_path, tokenizer)

    def record_run(task, method, seed, model, which, train_s):
        start, seconds = time.perf_counter(), {}
        metrics = evaluate(model, tokenizer, evalset, which, cli, seconds)
        run = {
            "task": task,
            "method": method,
            "seed": seed,
            "reads": reads(method, args_of(method, cli.priority_args)),
            "metrics": metrics,
            "train_s": round(train_s, 1),
            "eval_s": round(time.perf_counter() - start, 1),
            "eval_parts_s": seconds,
        }
        runs.append(run)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        print(f"[run] {task} {method} seed {seed}: {shown} (train {train_s:.0f}s, eval {run['eval_s']:.0f}s)")
        sys.stdout.flush()

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if torch.cuda.is_available():
        base = base.to("cuda")
    record_run("base", "base", None, base, ("noisy", "unlearn"), 0.0)
    del base

    plan = [("noisy", m) for m in cli.methods] + [("unlearn", m) for m in cli.unlearn_methods]
    by_name = {task.name: task for task in tasks}
    for seed in cli.seeds:
        for task_name, method in plan:
            task = by_name[task_name]
            dataset = dataset_for(method, task, cli, seed, prepared)
            ref_model = None
            if method not in BASELINES and get_priority(priority_of(method)).reference == "explicit":
                ref_model = prepared.model(task, seed, "clean")
            start = time.perf_counter()
            model = train(method, dataset, cli, seed, model_path, tokenizer, ref_model)
            record_run(task_name, method, seed, model, (task_name,), time.perf_counter() - start)
            del model
            gc.collect()
        prepared.release(seed)

    summary = summarize(runs)
    table = markdown_table(summary)
    elapsed = time.perf_counter() - started
    settings = {k: v for k, v in vars(cli).items() if k not in ("full",)}
    result = {
        "command": "python scripts/benchmark_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "wall_s": round(elapsed, 1),
        "settings": settings,
        "data": record,
        "runs": runs,
        "summary": summary,
    }
    (output_dir / "quality.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(summary, runs, output_dir / "quality.png")
    (output_dir / "quality.md").write_text(
        f"# GSM8K quality benchmark\n\n`{result['command']}`\n\n{result['machine']}; {elapsed / 60:.1f} min; "
        f"seeds {cli.seeds}; {cli.steps} steps x {cli.batch_size} examples, learning rate {cli.learning_rate}; "
        f"noisy task: {cli.train_size} problems, {len(record['corrupted_rows'])} corrupted; "
        f"{len(evalset.clean)} held-out pairs; unlearn task: {cli.unlearn_train_size} questions, "
        f"{len(evalset.correct)} held-out pairs; {len(evalset.questions)} generated questions.\n\n"
        f"Mean over seeds ± half the min-max range; metric definitions in scripts/benchmark_quality.py.\n\n"
        f"{table}\n",
        encoding="utf-8",
    )
    print(f"\n{table}\n\nwall time {elapsed / 60:.1f} min; written to {output_dir}/quality.{{md,json,png}}")
    return result


if __name__ == "__main__":
    main()
