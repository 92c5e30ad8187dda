"""The one place that makes tiny tokenizers, models and datasets for the tests. Nothing is downloaded."""

from __future__ import annotations

import math
import os


# No hub, ever: a test that tries to download fails at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from trl_priority import PrioritySFTConfig, PrioritySFTTrainer  # noqa: E402
from trl_priority.phi import PhiSettings, compute_phi  # noqa: E402
from trl_priority.priorities import get_priority  # noqa: E402


QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7 apples.\n#### 7"),
    ("A box holds 6 pens. How many pens in 2 boxes?", "6 * 2 = 12 pens.\n#### 12"),
    ("Sam had 10 cards and gave away 3. How many are left?", "10 - 3 = 7 cards.\n#### 7"),
    ("Each bag has 5 beads. How many beads in 4 bags?", "5 * 4 = 20 beads.\n#### 20"),
    ("Ann reads 8 pages a day for 3 days. How many pages?", "8 * 3 = 24 pages.\n#### 24"),
    ("There are 9 birds and 2 fly away. How many stay?", "9 - 2 = 7 birds.\n#### 7"),
    ("A cake costs $12 and a pie $5. What is the total?", "12 + 5 = $17.\n#### 17"),
    ("Half of 18 children play. How many play?", "18 / 2 = 9 children.\n#### 9"),
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The builders are plain functions, so that scripts launched outside pytest (tests/distributed_worker.py) build the
# same tokenizer, models, datasets and arguments; the fixtures below wrap them.
def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 300 tokens) trained in-process on the test sentences (deterministic)."""
    corpus = [text for pair in QUESTIONS for text in pair] * 4
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _tiny_llama(
    vocab_size: int, seed: int, pad_token_id: int, eos_token_id: int, hidden_size: int = 32
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_model(tokenizer, seed: int = 0, vocab_size: int | None = None, hidden_size: int = 32) -> LlamaForCausalLM:
    """A fresh 2-layer Llama (about 30k parameters at hidden size 32), float32, for `tokenizer`."""
    return _tiny_llama(vocab_size or len(tokenizer), seed, tokenizer.pad_token_id, tokenizer.eos_token_id, hidden_size)


# bitsandbytes' CPU 4-bit kernels on processors with AVX512-BF16 repack each weight in blocks of 64 input features
# (absmax reshaped to (N, K // 64)): a layer narrower than 64 fails there (`shape '[32, 0]' is invalid`), so the
# QLoRA tests build their model this wide.
QLORA_HIDDEN_SIZE = 64


def save_model_dir(
    directory,
    tokenizer,
    seed: int = 0,
    vocab_size: int | None = None,
    with_tokenizer: bool = True,
    hidden_size: int = 32,
) -> str:
    """`build_model(tokenizer, seed)` and its tokenizer saved as a model folder under `directory`; returns the path."""
    width = "" if hidden_size == 32 else f"-h{hidden_size}"
    path = os.path.join(directory, f"tiny-llama-{seed}-{vocab_size or len(tokenizer)}{width}")
    build_model(tokenizer, seed, vocab_size, hidden_size).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return str(path)


def prompt_completion_dataset(n: int = 8) -> Dataset:
    rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return Dataset.from_dict({"prompt": [q + " " for q, _ in rows], "completion": [a for _, a in rows]})


def worker_output_dir(argv=None) -> str:
    """The `--output_dir` a multi-process test worker (`tests/*_worker.py`) writes its records to."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv).output_dir


def build_args(output_dir: str, **overrides) -> PrioritySFTConfig:
    """A `PrioritySFTConfig` for fast, deterministic CPU runs of a few steps."""
    defaults = dict(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_length=64,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return PrioritySFTConfig(**defaults)


class StopAfter(TrainerCallback):
    """Stop training after step `step` (its checkpoint is still written), as a run killed there would have."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture
def make_model(tokenizer):
    """`make_model(seed=0, vocab_size=None, hidden_size=32)`: a fresh 2-layer Llama (about 30k parameters), float32."""

    def make(seed: int = 0, vocab_size: int | None = None, hidden_size: int = 32) -> LlamaForCausalLM:
        return build_model(tokenizer, seed, vocab_size, hidden_size)

    return make


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """`model_dir(seed=0)`: the tiny model and its tokenizer saved as a model folder; returns the path."""

    def save(seed: int = 0, vocab_size: int | None = None, with_tokenizer: bool = True, hidden_size: int = 32) -> str:
        return save_model_dir(tmp_path, tokenizer, seed, vocab_size, with_tokenizer, hidden_size)

    return save


@pytest.fixture
def datasets_():
    """Factories for every dataset format SFTTrainer accepts, built from `QUESTIONS`."""

    class Factory:
        prompt_completion = staticmethod(prompt_completion_dataset)

        @staticmethod
        def conversational_prompt_completion(n: int = 8) -> Dataset:
            rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
            return Dataset.from_dict(
                {
                    "prompt": [[{"role": "user", "content": q}] for q, _ in rows],
                    "completion": [[{"role": "assistant", "content": a}] for _, a in rows],
                }
            )

        @staticmethod
        def messages(n: int = 8) -> Dataset:
            rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
            return Dataset.from_dict(
                {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]}
            )

        @staticmethod
        def text(n: int = 8) -> Dataset:
            rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
            return Dataset.from_dict({"text": [q + " " + a for q, a in rows]})

    return Factory


def _full_logits_label_logps(model, batch) -> torch.Tensor:
    """log p(labels[:, t + 1]) from the model's full logits, 0 where ignored: an oracle independent of the fused head."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != -100, logps, 0.0)


@pytest.fixture
def label_logps():
    """`label_logps(model, batch)`: per-target log-probabilities `(B, T-1)` from the model's full logits."""
    return _full_logits_label_logps


@pytest.fixture
def make_args(tmp_path):
    """`make_args(**overrides)`: a `PrioritySFTConfig` for fast, deterministic CPU runs of a few steps."""

    def make(**overrides) -> PrioritySFTConfig:
        return build_args(**{"output_dir": str(tmp_path / "out"), **overrides})

    return make


@pytest.fixture
def priority_trainer(make_model, tokenizer, datasets_, make_args):
    """`priority_trainer(method, priority_args=None, n=4, dataset=None, model=None, ref_model=None, **settings)`: a
    `PrioritySFTTrainer` of `method` on `n` prompt-completion rows (or `dataset`), the tiny model (or `model`), the
    `make_args` config with `settings`; `ref_model` when given (e.g. `make_model(seed=1)`, a reference that differs
    from the policy)."""

    def make(method, priority_args=None, *, n=4, dataset=None, model=None, ref_model=None, **settings):
        return PrioritySFTTrainer(
            model=make_model() if model is None else model,
            args=make_args(priority=method, priority_args=priority_args, **settings),
            train_dataset=datasets_.prompt_completion(n) if dataset is None else dataset,
            processing_class=tokenizer,
            **({} if ref_model is None else {"ref_model": ref_model}),
        )

    return make


@pytest.fixture
def gsm8k_dir(tmp_path):
    """A folder laid out like /work/shared/data/gsm8k, built from `QUESTIONS`: `train.jsonl` (16 rows, `question` and
    `answer` ending `#### N`) and `example_model_solutions.jsonl` (8 rows, `ground_truth` ending `A: N` and four model
    solutions, the first one incorrect: its answer plus one). Returns the folder's path."""
    import json
    import re

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    with (folder / "train.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(16):
            question, answer = QUESTIONS[i % len(QUESTIONS)]
            handle.write(json.dumps({"question": f"{question} (problem {i})", "answer": answer}) + "\n")
    with (folder / "example_model_solutions.jsonl").open("w", encoding="utf-8") as handle:
        for question, answer in QUESTIONS:
            final = answer.rsplit("####", 1)[1].strip()
            truth = answer.replace(f"#### {final}", f"A: {final}")
            wrong = re.sub(rf"\b{final}\b", str(int(final) + 1), truth)
            solutions = {"6b_finetuning": {"solution": wrong, "is_correct": False}}
            for name in ("6b_verification", "175b_finetuning", "175b_verification"):
                solutions[name] = {"solution": truth, "is_correct": True}
            handle.write(json.dumps({"question": question, "ground_truth": truth, **solutions}) + "\n")
    return str(folder)


# ----------------------------------------------------------------------------------------------------------------
# Φ on hand-made statistics, and the naive oracles it is checked against
# ----------------------------------------------------------------------------------------------------------------
def phi_of(method, statistics: dict, progress: float = 0.0, **priority_args) -> torch.Tensor:
    """Φ of `method` (a name or a `Priority`) on hand-made `(B, T-1)` statistics, as the trainer forms it for one
    batch: `trl_priority.phi.compute_phi` (the method's selection over this batch, or within each row for
    `scope="example"`, then Φ; no schedule, pooling or warm-up). `progress` is the training progress the selection's
    kept fraction reads; the priority itself reads `statistics["progress"]` when it needs it. `statistics` is not
    changed."""
    priority = get_priority(method)
    settings = PhiSettings(priority, priority.resolve_args(priority_args))
    return compute_phi(settings, dict(statistics), progress)


def full_logits_stats(model, batch):
    """`(logps, entropy, mask)`: log p(label) and the entropy of the next-token distribution, from the model's full
    `(B, T, V)` logits (an oracle independent of the fused head), and the supervised mask; each `(B, T-1)`."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logprobs = logits.float().log_softmax(-1)  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logps, entropy, mask


def naive_kept_count(fraction: float, n: int) -> int:
    """k = round(fraction · n) half up, at least 1 when there is a token (the papers' "top fraction")."""
    return 0 if n == 0 else max(1, math.floor(fraction * n + 0.5))


def naive_top(scores, tokens, fraction) -> set:
    """The tokens (index tuples) of `tokens` that fewer than k others beat: a higher score, or the same score earlier
    in the list. A loop over pairs, independent of `trl_priority.priorities.selection`."""
    k = naive_kept_count(fraction, len(tokens))
    kept = set()
    for i, token in enumerate(tokens):
        beaten_by = sum(
            1
            for j, other in enumerate(tokens)
            if scores[other] > scores[token] or (scores[other] == scores[token] and j < i)
        )
        if beaten_by < k:
            kept.add(token)
    return kept


def naive_top_fraction(scores, mask, fraction) -> torch.Tensor:
    """`(B, T-1)` float 0/1: the top `fraction` of all supervised tokens of the batch, row-major order breaking ties
    (the paper's top ratio of the batch), from `naive_top`."""
    tokens = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    expected = torch.zeros(mask.shape)
    for token in naive_top(scores, tokens, fraction):
        expected[token] = 1.0
    return expected
