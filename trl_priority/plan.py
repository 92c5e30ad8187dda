"""The run plan: everything a run decides from its method, the method's hyperparameters and the configuration, decided
once, before any model or dataset is loaded or prepared.

`RunPlan.build(args, priority, priority_args, model=..., ref_model=..., peft_config=...)` answers, in one place:

- which statistics the method reads, by source (policy, reference, data, trainer);
- which dataset columns travel with the tokens through truncation, padding and packing (`column_specs`: the data
  statistics, the per-token identity of a stateful method, of a word/span granularity, of a per-example selection
  and of the epoch cache, and the `ref_<name>` columns of `precomputed_ref_columns`), and which ones a reference
  cache attaches after preparation (`cache_columns`);
- where the reference statistics come from (`reference_kind`, see `REFERENCE_KINDS`);
- how they are kept (`cache`: none, a disk cache under `cache_dir`, or the lazy epoch cache);
- how the labels are prepared (`mask_prompt_labels`, `completion_only_loss`).

The trainer (`PrioritySFTTrainer`) builds it in `__init__` and reads it; the reference sources
(`trl_priority.references.choice.reference_for`), the caches (`trl_priority.references.disk_cache`, `trl_priority.references.epoch_cache`) and the
viewer (`trl_priority.tools.viewer`) read it from `trainer.plan`. Nothing here loads a model or changes the arguments.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import is_peft_model

from trl_priority import statistics as stats_vocab
from trl_priority.references.sources import ColumnReference, is_callback_reference
from trl_priority.statistics import DataStatistic


# Where the reference statistics come from (`RunPlan.reference_kind`)
REFERENCE_KINDS = {
    "none": "the method (with these hyperparameters) reads no reference statistics",
    "columns": "`precomputed_ref_columns=True`: dataset columns `ref_<name>`, no forward",
    "callback": "`ref_model=fn`: a user's function of the batch",
    "model_path": "a separate frozen model loaded from a path or hub id (`ref_model=` or `ref_model_name_or_path`)",
    "model": "a separate frozen model given as an object (`ref_model=`)",
    "adapter_off": "LoRA training from a `peft_config`: the policy with its adapter switched off",
    "starting_adapter": "training an adapter that was already trained: a frozen copy of it, adapter 'ref'",
    "starting_model": "full fine-tuning: a frozen copy of the starting model (copied, or loaded again from its path)",
}
CACHE_MODES = ("none", "disk", "epoch")
# The per-token identity columns a per-unit granularity reads
_UNIT_COLUMNS = {"word": ("example_index", "word_index"), "span": ("example_index", "span_index")}
# The cached columns' hint, once the reference cache attached them to the rows
CACHE_COLUMN_HINT = "rows of trainer.train_dataset carry it (the reference cache attached it); collate those rows"


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run reads and from where, decided once from the method, its hyperparameters and the configuration.

    Parameters:
        > The method

        priority (`str` or `None`):
            The method's name; `None` trains exactly as `SFTTrainer` (every other field then says "nothing").
        policy_statistics (`tuple[str, ...]`):
            Statistics of the policy's own forward (`logps`, `entropy`, ...), from the fused LM head.
        reference_statistics (`tuple[str, ...]`):
            Statistics of the reference (without `ref_`), for these hyperparameters (a `signal` switch may drop them).
        data_statistics (`tuple[str, ...]`):
            Statistics read from dataset columns (`trl_priority.statistics.DATA_STATISTICS`).
        trainer_statistics (`tuple[str, ...]`):
            Statistics the trainer provides: `progress`, `state` (the method's per-token history), ...
        uses_reference (`bool`):
            Whether this configuration reads the reference at all (statistics or its whole distribution).
        needs_reference_distribution (`bool`):
            Whether a loss term reads the reference's whole next-token distribution.
        stateful (`bool`):
            Whether the method keeps a per-token history (`TokenState`), keyed by (`example_index`, `token_position`).
        selection_scope (`str` or `None`):
            The scope of the method's top-fraction selection for these hyperparameters (`"batch"`, `"example"`,
            `"step"`), or `None` without a selection.
        granularity (`str`):
            `priority_granularity`: one Φ per `"token"`, `"word"` or `"span"`.

        > Labels

        mask_prompt_labels (`bool`):
            The method reads `response_mask`, so TRL keeps `completion_mask` (`completion_only_loss=False`) and the
            prompt's labels are masked here instead, during data preparation.
        completion_only_loss (`bool` or `None`):
            The value `args.completion_only_loss` trains with: `False` when the method trains prompt tokens or masks
            the prompt itself (`mask_prompt_labels`), otherwise as configured.

        > Columns that travel with the tokens

        column_specs (`dict[str, DataStatistic]`):
            The columns prepared with the tokens (truncated, padded, packed with them), by column name: the data
            statistics, the identity columns, and with `precomputed_ref_columns` the `ref_<name>` columns. Read-only.
        identity_columns (`tuple[str, ...]`):
            The per-token identity columns among them: (`example_index`, `token_position`) for a stateful method,
            the unit columns of a word or span granularity, `example_index` for a per-example selection, and the
            epoch cache's (`epoch_columns`).
        epoch_columns (`tuple[str, ...]`):
            The identity columns added for the epoch cache alone.
        cache_columns (`dict[str, DataStatistic]`):
            With the disk cache (`cache="disk"`), the columns it attaches to the prepared rows (`ref_<name>`, and the
            top-k columns for a method reading the reference's distribution); empty otherwise.

        > The reference

        reference_kind (`str`):
            Where the reference statistics come from: one of `REFERENCE_KINDS` (`"none"`, `"columns"`, `"callback"`,
            `"model_path"`, `"model"`, `"adapter_off"`, `"starting_adapter"`, `"starting_model"`).
        reference_path (`str` or `None`):
            The path or hub id the reference is loaded from (`"model_path"`), or the policy's path that the starting
            model is identified by (and, for `"starting_model"`, loaded again from); `None` for an object.

        > Caches

        cache (`str`):
            How the reference's values are kept: `"none"` (computed in every batch), `"disk"` (`ref_cache_dir`:
            computed once before training, read as columns), `"epoch"` (`ref_epoch_cache`: where the tokens carry
            their identity, the reference is wrapped in an `EpochCache`, which keeps its values per token while the
            run has more than one epoch; only a reference that stays frozen is wrapped, which the built reference
            tells: `EpochCache.for_plan`).
        cache_dir (`str` or `None`):
            The disk cache's folder (`"auto"` resolved), with `cache="disk"`.
        epoch_cache (`str`):
            `"memory"` or `"disk"` with `cache="epoch"` (where the kept values live), else `"none"`.
        cached_statistics (`tuple[str, ...]`):
            The reference statistics a cache holds (without `ref_`; `logps` too for a distribution-reading method).
        cache_topk (`int` or `None`):
            k of the cached top-k distribution (`ref_cache_topk`), for a method reading the reference's distribution.
    """

    priority: str | None = None
    policy_statistics: tuple[str, ...] = ()
    reference_statistics: tuple[str, ...] = ()
    data_statistics: tuple[str, ...] = ()
    trainer_statistics: tuple[str, ...] = ()
    uses_reference: bool = False
    needs_reference_distribution: bool = False
    stateful: bool = False
    selection_scope: str | None = None
    granularity: str = "token"
    mask_prompt_labels: bool = False
    completion_only_loss: bool | None = None
    column_specs: dict[str, DataStatistic] = dataclasses.field(default_factory=dict)
    identity_columns: tuple[str, ...] = ()
    epoch_columns: tuple[str, ...] = ()
    cache_columns: dict[str, DataStatistic] = dataclasses.field(default_factory=dict)
    reference_kind: str = "none"
    reference_path: str | None = None
    cache: str = "none"
    cache_dir: str | None = None
    epoch_cache: str = "none"
    cached_statistics: tuple[str, ...] = ()
    cache_topk: int | None = None

    # -- derived ------------------------------------------------------------------------------------------------------
    @property
    def token_columns(self) -> tuple[str, ...]:
        """Every column the collator pads and the forward pops from the batch: the prepared ones, then the cached."""
        return (*self.column_specs, *self.cache_columns)

    @property
    def column_padding(self) -> dict[str, float]:
        return {column: spec.padding for column, spec in {**self.column_specs, **self.cache_columns}.items()}

    def with_disk_cache(self, cache_dir: str) -> RunPlan:
        """This run reading its reference statistics from a disk cache under `cache_dir` (`precompute_reference` on a
        built trainer): no epoch cache, and the cached columns travel with the tokens."""
        return dataclasses.replace(
            self,
            cache="disk",
            cache_dir=cache_dir,
            epoch_cache="none",
            cache_columns=_cache_columns(self.cached_statistics, self.cache_topk),
        )

    # -- building -----------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        args,
        priority=None,
        priority_args: Mapping[str, Any] | None = None,
        *,
        model: Any = None,
        ref_model: Any = None,
        peft_config: Any = None,
        train_dataset: Any = None,
    ) -> RunPlan:
        """The plan of a run of `priority` (a registered `Priority`, or None) with its resolved `priority_args`.

        `model` and `ref_model` are the trainer's arguments as given (a path, a module, a callable or None), and
        `train_dataset` the training dataset as given (a vision dataset is prepared batch by batch, without the
        per-token identity). Raises, before anything is loaded, for a cache that cannot hold this configuration.
        """
        from trl_priority.references import disk_cache as ref_cache
        from trl_priority.references import epoch_cache as epoch_cache_module

        if priority is None:
            return cls(completion_only_loss=args.completion_only_loss)
        priority_args = dict(priority_args or {})
        uses_reference = priority.reference_used(priority_args)

        completion_only_loss, mask_prompt_labels = args.completion_only_loss, False
        if priority.trains_prompt(priority_args):
            # The method weights prompt tokens too: they keep their labels, and `completion_mask` tells them apart
            completion_only_loss = False
        elif "response_mask" in priority.all_statistics and args.completion_only_loss is not False:
            # TRL drops `completion_mask` once it has masked the prompt's labels, but the method reads it: let TRL keep
            # it, and mask the prompt's labels here instead (the same labels as completion-only training)
            mask_prompt_labels, completion_only_loss = True, False

        policy_statistics = priority.statistics_from("policy", priority_args)
        reference_statistics = priority.reference_statistics_for(priority_args)
        data_statistics = priority.statistics_from("data", priority_args)
        trainer_statistics = priority.statistics_from("trainer", priority_args)
        stateful = "state" in trainer_statistics
        selection_scope = None if priority.selection is None else priority.selection.scope_of(priority_args)

        identity = ("example_index", "token_position") if stateful else ()
        identity += _UNIT_COLUMNS.get(args.priority_granularity, ())
        if selection_scope == "example":
            identity += ("example_index",)  # per-example selection: rows of packed batches hold several examples
        cache_dir = ref_cache.cache_dir_for(args, priority, priority_args)
        epoch_columns: tuple[str, ...] = ()
        if epoch_cache_module.epoch_cache_wanted(args, priority, priority_args, cache_dir) and not _is_vision(
            train_dataset
        ):
            # The lazy epoch cache keys the reference's values by the token they score
            epoch_columns = tuple(c for c in ("example_index", "token_position") if c not in identity)
            identity += epoch_columns
        column_specs: dict[str, DataStatistic] = {}
        for name in data_statistics + identity:
            spec = stats_vocab.DATA_STATISTICS[name]
            column_specs[spec.column] = spec
        if uses_reference and args.precomputed_ref_columns:
            for name in reference_statistics:
                column_specs[f"ref_{name}"] = DataStatistic(
                    f"ref_{name}", "token", 0.0, hint=ColumnReference.hint(name)
                )

        kind, path = reference_kind(args, uses_reference, model, ref_model, peft_config)
        cached = ref_cache.cached_statistics(priority, priority_args)
        topk = ref_cache.cached_topk(args, priority, priority_args)
        cache, epoch_cache = "none", "none"
        if cache_dir is not None:
            cache = "disk"
        elif (
            args.ref_epoch_cache != "none"
            and kind not in ("none", "columns")
            and "example_index" in column_specs
            and "token_position" in column_specs
        ):
            # Where the tokens have an identity: kept (while the run has more than one epoch) if the reference is
            # frozen, which only the built reference tells (`epoch_cache.EpochCache.for_plan`)
            cache, epoch_cache = "epoch", args.ref_epoch_cache
        return cls(
            priority=priority.name,
            policy_statistics=policy_statistics,
            reference_statistics=reference_statistics,
            data_statistics=data_statistics,
            trainer_statistics=trainer_statistics,
            uses_reference=uses_reference,
            needs_reference_distribution=priority.needs_reference_distribution,
            stateful=stateful,
            selection_scope=selection_scope,
            granularity=args.priority_granularity,
            mask_prompt_labels=mask_prompt_labels,
            completion_only_loss=completion_only_loss,
            column_specs=column_specs,
            identity_columns=tuple(dict.fromkeys(identity)),
            epoch_columns=epoch_columns,
            cache_columns=_cache_columns(cached, topk) if cache == "disk" else {},
            reference_kind=kind,
            reference_path=path,
            cache=cache,
            cache_dir=cache_dir,
            epoch_cache=epoch_cache,
            cached_statistics=cached,
            cache_topk=topk,
        )


def reference_kind(args, uses_reference: bool, model: Any, ref_model: Any, peft_config: Any) -> tuple[str, str | None]:
    """`(kind, path)`: where the reference statistics come from (`REFERENCE_KINDS`), and the path that goes with it.

    In order: no reference read; precomputed columns; a callback; a path (`ref_model=` or `ref_model_name_or_path`);
    a model object; otherwise the starting model: under an adapter trained from a `peft_config`, the base with the
    adapter off; when the policy is an adapter that was already trained, a frozen copy of it; for full fine-tuning, a
    frozen copy of the model (copied before training, or loaded again from the policy's path).
    """
    if not uses_reference:
        return "none", None
    if args.precomputed_ref_columns:
        return "columns", None
    if is_callback_reference(ref_model):
        return "callback", None
    if ref_model is None and args.ref_model_name_or_path is not None:
        ref_model = args.ref_model_name_or_path
    if isinstance(ref_model, str):
        return "model_path", ref_model
    if ref_model is not None:
        return "model", None
    path = model if isinstance(model, str) else None
    if peft_config is not None:
        return "adapter_off", path
    if isinstance(model, torch.nn.Module) and is_peft_model(model):
        return "starting_adapter", None
    return "starting_model", path


def check_compatible(
    plan: RunPlan, priority, priority_args: Mapping[str, Any], args, compute_loss_func, ref_model, model
) -> None:
    """Refuse, before anything is loaded, a configuration the method cannot train with (its loss replaced, a reference
    that would train, a reference the method cannot use or lacks); warn when a given reference is not read."""
    from trl_priority.loading import _same_path, check_model_path

    name = priority.name
    if compute_loss_func is not None:
        raise ValueError(
            f"`compute_loss_func` replaces the loss that priority '{name}' weights. Pass one of them; to add a "
            "term to the loss, declare it as a `LossTerm` of a registered priority."
        )
    if isinstance(ref_model, torch.nn.Module) and ref_model is model:
        raise ValueError(
            "`model` and `ref_model` are the same object, so the reference would train with the policy. Omit "
            "`ref_model` to use a frozen copy of the starting model, or pass a separate model."
        )
    ref_path = ref_model if isinstance(ref_model, str) else args.ref_model_name_or_path
    if ref_path is not None and plan.uses_reference and not args.precomputed_ref_columns:
        check_model_path(ref_path, "reference model")
        if isinstance(model, str) and _same_path(model, ref_path) and priority.reference == "explicit":
            raise ValueError(
                f"The reference model '{ref_path}' is the policy's own starting model, so the excess loss of "
                f"'{name}' is 0 for every token at step 0 and carries no signal. Give a reference trained for the "
                f"purpose (recipes/{name}.yaml says how)."
            )
    if priority.trains_prompt(priority_args) and (args.completion_only_loss or args.assistant_only_loss):
        raise ValueError(
            f"Priority '{name}' weights prompt tokens too, so it cannot train with `completion_only_loss=True` or "
            "`assistant_only_loss=True`. Leave both unset."
        )
    has_reference = ref_model is not None or args.ref_model_name_or_path is not None or args.precomputed_ref_columns
    if plan.uses_reference and priority.needs_reference_distribution:
        if args.precomputed_ref_columns or is_callback_reference(ref_model):
            raise ValueError(
                f"Priority '{name}' reads the reference's whole next-token distribution (a loss term over the "
                "vocabulary), which neither precomputed columns nor a callback can provide. Use a reference model "
                "(`ref_model=`, `ref_model_name_or_path`, or none for the starting model)."
            )
    if plan.uses_reference and priority.reference == "explicit" and not has_reference:
        raise ValueError(
            f"Priority '{name}' compares the policy with a reference trained for the purpose (see its docstring); "
            "against the starting model its scores carry no signal at step 0. Pass `ref_model=` (a model, a path "
            f"or a callback) or set `ref_model_name_or_path`. recipes/{name}.yaml shows how to train one first."
        )
    if not plan.uses_reference and has_reference:
        warnings.warn(
            f"Priority '{name}' with {priority_args} reads no reference statistics; the reference is ignored.",
            stacklevel=3,
        )


def _cache_columns(names: tuple[str, ...], topk: int | None) -> dict[str, DataStatistic]:
    from trl_priority.references.disk_cache import TOPK_COLUMNS

    columns = [f"ref_{name}" for name in names] + (list(TOPK_COLUMNS) if topk is not None else [])
    return {column: DataStatistic(column, "token", 0.0, hint=CACHE_COLUMN_HINT) for column in columns}


def _is_vision(dataset: Any) -> bool:
    """As `SFTTrainer` tells a vision dataset (prepared batch by batch, so its rows carry no per-token identity)."""
    if dataset is None:
        return False
    try:
        sample = next(iter(dataset))
    except (StopIteration, TypeError):
        return False
    return isinstance(sample, Mapping) and ("image" in sample or "images" in sample)


__all__ = ["CACHE_MODES", "REFERENCE_KINDS", "RunPlan", "check_compatible", "reference_kind"]
