"""Mistakes caught early, and runs that train less than they seem to, said out loud.

One module because it is one promise (every case has a row in `tests/test_reliability.py`), made of small pure
functions the config, the trainer and the CLI each call in one line; its groups share nothing but that purpose:

- **Raw rows**, before tokenizing and before any model loads (`check_datasets`, `check_raw_rows`): a dataset in none
  of the formats `SFTTrainer` reads, a column of the wrong type, a missing value, a mask that is not 0/1. TRL would
  fail later with `KeyError: 'text'`, a tokenizer error or an `AttributeError`, or, for a mask holding 2, train as if
  it were 1. The checks read the Arrow columns (the schema for types, vectorised compute for missing values and
  masks), so a large dataset costs no Python loop.
- **Less data than given** (`empty_completions`, `dropped_examples_warning`): examples whose completion is empty
  (they train on the end token alone) or that truncation left without a supervised token (dropped).
- **Training that has silently stopped** (`RunGuard`): a non-finite NLL (a diverged model, which `Trainer`'s NaN
  filter would log as loss 0 while saving NaN weights) is an error; a batch on which Φ is 0 for every supervised
  token (nothing trains) is a warning, once.
- **Settings** (`parse_json_mapping`, `check_model_init_kwargs`): `ref_model_init_kwargs` parsed and its keys checked
  when the config is built, not when the reference loads after the policy.
- **Before the model loads** (`check_data_columns`, `check_resume`, `finished_model_warning`): a column the method
  reads and the data lacks, a resume with nothing to resume, a finished run about to be overwritten.

The formats are TRL's (https://huggingface.co/docs/trl/dataset_formats): language modeling (`text`), conversational
language modeling (`messages`), prompt-completion (`prompt` and `completion` strings) and conversational
prompt-completion (`prompt` and `completion` lists of `{"role", "content"}` messages).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset


FORMATS = (
    "'text' (a string: language modeling), 'messages' (a list of {'role', 'content'} dicts: conversational), or "
    "'prompt' and 'completion' (two strings, or two lists of {'role', 'content'} dicts: conversational "
    "prompt-completion)"
)


class DatasetFormatError(ValueError):
    """A raw dataset row that `SFTTrainer` cannot tokenize, named by column and row."""


# ------------------------------------------------------------------------------------------------------------------
# Raw rows
# ------------------------------------------------------------------------------------------------------------------
def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_messages(kind: pa.DataType) -> bool:
    """A list of structs with `role` and `content` fields (content may be a string or a list of parts)."""
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return False
    item = kind.value_type
    return pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}


def _first(mask: pa.ChunkedArray | pa.Array) -> int | None:
    """The first row where `mask` is true, or None."""
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


def _format_columns(columns: Sequence[str], text_field: str) -> dict[str, tuple[str, ...]] | None:
    """The columns that carry the format, each with the kinds it may hold, or None when none is there. In TRL's
    order: a `prompt` makes the row prompt-completion, whatever else it holds."""
    prompt_completion = {"prompt": ("string", "messages"), "completion": ("string", "messages")}
    if "prompt" in columns:
        return prompt_completion
    if "messages" in columns:
        return {"messages": ("messages",)}
    if "conversations" in columns:  # ShareGPT's {"from", "value"}: TRL converts it to messages
        return {}
    if text_field in columns:
        return {text_field: ("string",)}
    if "completion" in columns:  # a completion without its prompt
        return prompt_completion
    return None


def _arrow_columns(dataset: Dataset, names: Sequence[str]) -> pa.Table:
    """`names` of `dataset` as one Arrow table, row i the dataset's row i. A shuffled, selected or filtered dataset
    keeps an indices mapping over its stored table; one `take` applies it (`datasets`' own lookup of the rows costs
    seconds per 100k rows)."""
    indices = getattr(dataset, "_indices", None)
    table = getattr(dataset.data, "table", None)
    if table is None:
        return dataset.select_columns(list(names)).with_format("arrow")[:]
    table = table.select(list(names))
    return table if indices is None else table.take(indices.column(0))


def check_raw_rows(dataset: Any, dataset_name: str, text_field: str = "text") -> None:
    """Raise a `DatasetFormatError` naming the column, the row and the expected format when a raw row of `dataset` is
    not one `SFTTrainer` can tokenize. Tokenized rows (`input_ids`) have their mask columns checked for 0/1 values.

    A `datasets.Dataset` is checked in full from its Arrow columns; other datasets (iterable, lists) only at their
    first row, which is all TRL itself reads before tokenizing.
    """
    if isinstance(dataset, Dataset):
        columns = list(dataset.column_names)
        table_of = functools.partial(_arrow_columns, dataset)
    else:
        try:
            first = next(iter(dataset))
        except (StopIteration, TypeError):
            return
        if not isinstance(first, dict):
            return
        columns = list(first)
        table_of = lambda names: pa.Table.from_pylist([{name: first[name] for name in names}])  # noqa: E731
    if "input_ids" in columns:
        _check_masks(table_of, columns, dataset_name)
        return
    expected = _format_columns(columns, text_field)
    if expected is None:
        hint = ""
        if {"question", "answer"} <= set(columns):
            hint = " (e.g. `dataset.rename_columns({'question': 'prompt', 'answer': 'completion'})`)"
        raise DatasetFormatError(
            f"The {dataset_name} dataset has the columns {columns}, but none of the formats SFTTrainer reads: "
            f"{FORMATS}. Rename its columns{hint}, or pass a `formatting_func` that returns the text."
        )
    missing = [name for name in expected if name not in columns]
    if missing:
        raise DatasetFormatError(
            f"The {dataset_name} dataset has {[n for n in expected if n in columns]} but no {missing}: a "
            f"prompt-completion dataset needs both 'prompt' and 'completion' ({FORMATS})."
        )
    if not expected:
        return
    table = table_of(list(expected))
    for name, kinds in expected.items():
        column = table.column(name)
        kind = column.type
        if pa.types.is_null(kind) or column.null_count:
            row = 0 if pa.types.is_null(kind) else _first(pc.is_null(column))
            raise DatasetFormatError(
                f"Row {row} of the {dataset_name} dataset has no value (None) in the column '{name}'. Every row needs "
                f"one: {FORMATS}. Drop or fill such rows (e.g. "
                f"`dataset.filter(lambda row: row['{name}'] is not None)`)."
            )
        if not any(_is_string(kind) if k == "string" else _is_messages(kind) for k in kinds):
            value = column[0].as_py()
            wanted = " or ".join("a string" if k == "string" else "a list of {'role', 'content'} dicts" for k in kinds)
            raise DatasetFormatError(
                f"The column '{name}' of the {dataset_name} dataset holds {kind} values (row 0: {value!r}), but it "
                f"must hold {wanted}. Expected {FORMATS}. Convert the column, e.g. "
                f"`dataset.map(lambda row: {{'{name}': str(row['{name}'])}})`."
            )
    if "prompt" in expected:
        prompt, completion = table.column("prompt").type, table.column("completion").type
        if _is_string(prompt) != _is_string(completion):
            raise DatasetFormatError(
                f"In the {dataset_name} dataset 'prompt' holds {prompt} and 'completion' {completion}: both must be "
                "strings (prompt-completion) or both lists of {'role', 'content'} dicts (conversational)."
            )


_MASK_COLUMNS = ("completion_mask", "assistant_masks")


def _check_masks(table_of, columns: Sequence[str], dataset_name: str) -> None:
    """Mask columns of tokenized rows hold 0 or 1 per token (TRL keeps a label where every mask is truthy)."""
    for name in (c for c in _MASK_COLUMNS if c in columns):
        column = table_of([name]).column(name).combine_chunks()
        if column.null_count:
            row = _first(pc.is_null(column))
            raise DatasetFormatError(f"Row {row} of the {dataset_name} dataset has no '{name}' (None).")
        flat = pc.list_flatten(column)
        if pa.types.is_boolean(flat.type):
            continue
        bad = _first(pc.invert(pc.is_in(flat, pa.array([0, 1], type=flat.type))))
        if bad is not None:
            row = pc.list_parent_indices(column)[bad].as_py()
            position = bad - column.offsets[row].as_py()
            raise DatasetFormatError(
                f"Row {row} of the {dataset_name} dataset has {flat[bad].as_py()!r} at token {position} of "
                f"'{name}', which must hold 0 or 1 per token (1: the token is trained)."
            )


# ------------------------------------------------------------------------------------------------------------------
# Less data than given
# ------------------------------------------------------------------------------------------------------------------
def empty_completions(dataset: Any) -> tuple[int, int]:
    """`(empty, total)`: rows whose completion is "" (or whose completion messages have no content) in a raw
    prompt-completion `Dataset`; `(0, 0)` for other formats and datasets."""
    if (
        not isinstance(dataset, Dataset)
        or "completion" not in dataset.column_names
        or "input_ids" in dataset.column_names
    ):
        return 0, 0
    column = _arrow_columns(dataset, ["completion"]).column("completion")
    if _is_string(column.type):
        lengths = pc.utf8_length(column)
    elif _is_messages(column.type) and _is_string(column.type.value_type.field("content").type):
        column = column.combine_chunks()
        written = pc.greater(pc.utf8_length(pc.struct_field(pc.list_flatten(column), "content")), 0)
        rows_with_text = pc.count_distinct(pc.filter(pc.list_parent_indices(column), written)).as_py()
        return len(column) - rows_with_text, len(column)
    else:
        return 0, 0
    return int(pc.sum(pc.equal(lengths, 0)).as_py() or 0), len(column)


def empty_completions_warning(empty: int, total: int, dataset_name: str) -> str | None:
    if not empty:
        return None
    return (
        f"{empty} of {total} {dataset_name} examples have an empty completion (''): each trains on the "
        "end-of-sequence token alone. Check the completion column (a wrong column name or a failed generation)."
    )


def dropped_examples_warning(before: int, after: int, dataset_name: str, max_length: int | None) -> str | None:
    """The message for examples that truncation to `max_length` left without a supervised token (TRL drops them)."""
    dropped = before - after
    if dropped <= 0:
        return None
    return (
        f"{dropped} of {before} {dataset_name} examples were dropped: after truncation to max_length={max_length} "
        "they have no supervised token left, usually because the prompt alone fills `max_length`. Raise "
        "`max_length`, or shorten the prompts."
    )


# ------------------------------------------------------------------------------------------------------------------
# Training that has silently stopped
# ------------------------------------------------------------------------------------------------------------------
def non_finite_message(priority: str, what: str, bad: int, total: int) -> str:
    """The error for inf/NaN at supervised tokens: `what` is, e.g., "returned a non-finite Φ"."""
    return (
        f"Priority '{priority}' {what} on {bad} of {total} supervised tokens. Check its statistics for inf/NaN (a "
        "model or reference that diverged, a data column with NaN) and its hyperparameters."
    )


class RunGuard:
    """Per-run checks on each batch's gathered sums (no extra synchronisation): a non-finite NLL raises, a batch on
    which Φ is 0 for every supervised token warns, once per run (unless the method declares loss terms, which train
    there too)."""

    def __init__(self, priority: str, has_terms: bool = False):
        self.priority = priority
        self.has_terms = has_terms  # the method's declared loss terms train where Φ = 0 (Target-SFT's soft target)
        self.zero_batches = 0
        self._warned: set[str] = set()

    def check_nll(self, nll: float, bad: int, total: int) -> None:
        """`nll`: the batch's summed NLL over every process; `bad`, `total`: this process's non-finite and supervised
        token counts, for the message."""
        if not math.isfinite(nll):
            from trl_priority.priorities.registry import PriorityError

            raise PriorityError(
                non_finite_message(self.priority, "got a non-finite NLL −log π_θ(y_t)", bad, total)
                + " Training stops here: Trainer would log this step's loss as 0 and go on with NaN weights."
            )

    def check_phi(self, num_valid: float, effective: float, step: int) -> None:
        """`num_valid`, `effective`: the batch's supervised tokens and Σ|Φ| over them (every process)."""
        if num_valid <= 0 or effective > 0 or self.has_terms:
            return
        self.zero_batches += 1
        if "zero" in self._warned:
            return
        self._warned.add("zero")
        warnings.warn(
            f"Priority '{self.priority}' gave Φ = 0 to all {int(num_valid)} supervised tokens of a batch at step "
            f"{step}: the loss and its gradient are 0, nothing trains on it. Check the method's hyperparameters and "
            "statistics (`trainer.token_statistics(batch)`); a float64 Φ below ~1e-45 rounds to 0 in float32. Shown "
            "once per run; `trainer.run_guard.zero_batches` counts such batches.",
            stacklevel=3,
        )


def check_datasets(datasets: dict[str, Any], args, formatting_func=None) -> None:
    """`check_raw_rows` on every dataset the trainer will prepare, before any model loads. Skipped when TRL does not
    prepare them (`skip_prepare_dataset`), when a `formatting_func` builds the text, and for vision datasets."""
    if formatting_func is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
        return
    for name, dataset in datasets.items():
        columns = getattr(dataset, "column_names", None) or []
        if dataset is None or "image" in columns or "images" in columns:
            continue
        check_raw_rows(dataset, name, args.dataset_text_field)


# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------
def parse_json_mapping(name: str, value: Any, example: str) -> dict[str, Any] | None:
    """A setting given as a dict, a JSON object string (the command line) or None; anything else is an error that
    names the setting and shows `example`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"`{name}` is not valid JSON ({error.msg} at character {error.pos}): {value!r}. Write a JSON object, "
                f"e.g. '{example}'."
            ) from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(
            f"`{name}` must be a mapping of names to values (a dict, or a JSON object on the command line), got "
            f"{type(value).__name__} {value!r}."
        )
    return value


# `from_pretrained` keywords that are not in its signature (read from **kwargs), transformers 5
_LOADING_KWARGS = (
    "adapter_kwargs adapter_name attn_implementation device_map device_mesh distributed_config dtype "
    "experts_implementation generation_config gguf_file kernel_config key_mapping low_cpu_mem_usage max_memory "
    "offload_buffers offload_folder offload_state_dict output_loading_info proxies quantization_config state_dict "
    "subfolder torch_dtype tp_plan tp_size trust_remote_code use_kernels variant"
).split()
_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _model_config_keys(path: str | None) -> set[str] | None:
    """The keys of `path`'s config.json (a local folder, or a hub id already in the cache), or None if unreadable."""
    if path is None:
        return None
    config_file = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(config_file):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # not a repo id
            cached = None
        if not isinstance(cached, str):
            return None
        config_file = cached
    try:
        with open(config_file) as file:
            return set(json.load(file))
    except (OSError, ValueError):
        return None


def check_model_init_kwargs(name: str, kwargs: dict[str, Any] | None, model_path: str | None = None) -> None:
    """Every key of `kwargs` is a keyword `from_pretrained` takes, or a configuration attribute it overrides (the
    generic `PretrainedConfig` ones, and those in `model_path`'s config.json when it can be read without a download;
    when it cannot, only a key close to a `from_pretrained` keyword is refused); `dtype` is one TRL's
    `create_model_from_path` accepts. An unknown key is an error naming the closest valid one,
    raised before any model loads (transformers would raise a TypeError from the model's `__init__`, after the policy
    has loaded)."""
    if not kwargs:
        return
    from transformers import PretrainedConfig, PreTrainedModel

    signature = inspect.signature(PreTrainedModel.from_pretrained).parameters
    loading = {p for p in signature if p not in ("pretrained_model_name_or_path", "model_args", "kwargs")}
    loading.update(_LOADING_KWARGS)
    config_keys = _model_config_keys(model_path)
    valid = loading | set(PretrainedConfig().to_dict()) | (config_keys or set())
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(loading), n=1, cutoff=0.6)
            if config_keys is None and not close:
                continue  # perhaps an attribute of a configuration not read here: transformers will tell
            close = close or difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"`{name}` has the unknown key '{key}': it is neither a keyword of `from_pretrained` nor an attribute "
                f"of the model's configuration.{hint} Common keys: {', '.join(sorted(_COMMON_KEYS))}."
            )
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype not in _DTYPES:
        close = difflib.get_close_matches(dtype, _DTYPES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"`{name}` has dtype={dtype!r}; it must be one of {list(_DTYPES)}.{hint}")


_COMMON_KEYS = ("dtype", "attn_implementation", "quantization_config", "device_map", "revision", "trust_remote_code")


# ------------------------------------------------------------------------------------------------------------------
# Before the model loads: the data the method reads, the run to resume, the run already there
# ------------------------------------------------------------------------------------------------------------------
# Columns that TRL's tokenization makes, and the raw columns it makes them from
_TOKENIZER_COLUMNS = {"completion_mask": ("prompt", "completion")}


def check_data_columns(priority: str, specs: Mapping[str, Any], datasets: Mapping[str, Any]) -> None:
    """Every column the method reads (`specs`: column -> `DataStatistic`) is in each dataset, or one its preparation
    makes. Raised before any model loads, with the statistic's hint (how a dataset gets the column)."""
    for dataset_name, dataset in datasets.items():
        columns = getattr(dataset, "column_names", None)
        if not columns:  # an iterable dataset of unknown columns, or none
            continue
        tokenized = "input_ids" in columns
        for column, spec in specs.items():
            if column in columns or spec.generated:
                continue
            sources = _TOKENIZER_COLUMNS.get(column)
            if not tokenized and sources is not None and all(source in columns for source in sources):
                continue
            raise ValueError(
                f"Priority '{priority}' reads the column '{column}', which the {dataset_name} dataset lacks (it has "
                f"{list(columns)}): {spec.hint}."
            )


def _wants_last_checkpoint(value: Any) -> bool:
    # `--resume_from_checkpoint true` may arrive as the string "true" from the command line
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def check_resume(value: Any, output_dir: str) -> None:
    """`resume_from_checkpoint` points at something to resume: true needs a complete checkpoint in `output_dir`, a
    path must exist. Checked before any model loads (`Trainer` would find out once the model and data are ready)."""
    if value is None or value is False or value == "":
        return
    if _wants_last_checkpoint(value):
        from trl_priority.loading import last_complete_checkpoint

        if last_complete_checkpoint(output_dir, strict=False) is None:
            raise ValueError(
                f"`resume_from_checkpoint: true`, but the output_dir {output_dir} holds no complete checkpoint "
                "(a checkpoint-N folder with trainer_state.json) to resume from. Remove the flag to start a new run, "
                "or point `output_dir` at the run to resume."
            )
    elif isinstance(value, str) and not os.path.isdir(value):
        raise ValueError(
            f"`resume_from_checkpoint` is {value!r}, which is no folder. Give the path of a checkpoint-N folder, or "
            "`true` for the last complete checkpoint in `output_dir`."
        )


_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def finished_model_warning(output_dir: str | None) -> str | None:
    """The warning for an `output_dir` that already holds a saved model (a finished run), naming what is there; None
    when it holds none."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    names = set(os.listdir(output_dir))
    weights = [name for name in _MODEL_FILES if name in names]
    if not weights:
        return None
    checkpoints = sorted(n for n in names if n.startswith("checkpoint-") and n.removeprefix("checkpoint-").isdigit())
    shown = ", ".join(checkpoints[:3]) + (", ..." if len(checkpoints) > 3 else "")
    also = f" and {len(checkpoints)} checkpoint(s) ({shown})"
    return (
        f"The output_dir {output_dir} already holds a saved model ({', '.join(weights)}"
        f"{', training_args.bin' if 'training_args.bin' in names else ''}){also if checkpoints else ''}: this "
        "run's checkpoints and final model will overwrite them. Choose another `output_dir` to keep that run."
    )


def check_parallelism(priority_name: str, parallelism_config) -> None:
    """Context and sequence parallelism hand the model pre-shifted `shift_labels` over a shard of each sequence: the
    per-token statistics, data columns and selections of a priority are aligned on whole sequences and would be
    wrong."""
    config = parallelism_config
    if config is not None and (getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False)):
        raise ValueError(
            f"Priority '{priority_name}' does not support context or sequence parallelism (`cp_size` / "
            "`sp_size` > 1): its per-token statistics are aligned on whole sequences. Disable it in the "
            "accelerate config, or leave `priority` unset to train as SFTTrainer does."
        )


def check_prepared_train(train_dataset, max_length) -> None:
    """After `SFTTrainer` prepared the training dataset: some example must be left."""
    if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
        raise ValueError(
            f"No training example is left after preparation: every one was dropped as fully masked, usually "
            f"because its prompt alone fills `max_length` ({max_length}). Raise `max_length`."
        )


def check_token_columns_supported(priority_name: str, is_vision_dataset: bool) -> None:
    """Per-token data columns are not carried through vision datasets' collation yet."""
    if is_vision_dataset:
        raise ValueError(
            f"Priority '{priority_name}' reads per-token data columns, which vision datasets do not support yet."
        )
