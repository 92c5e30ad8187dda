"""`PrioritySFTTrainer`: TRL's `SFTTrainer` with the per-token loss weighted by a priority Φ.

The trainer is deliberately thin: Trainer hooks that delegate. For each batch it gathers per-token statistics (the
policy's, from TRL's fused LM head; the reference's, from a `trl_priority.references.sources.Reference`; the data's,
from per-token columns; its own: progress, the method's state, its selection), hands them to Φ, and forms the loss

    L = [Σ_{Φ≥0} Φ_t · (−log π_θ(y_t | y_<t)) + Σ_{Φ<0} |Φ_t| · U(π_θ(y_t))] / N  (+ the method's declared terms)

with N TRL's own denominator. It knows the registry, never a method: what a method needs is read from what it
declares. Where the work is: `statistics.gather` (the statistics, `token_statistics`' body), `phi` (Φ, step-wide
selection), `objectives.priority_objective` (the loss), `metrics` (logged values), `data.columns` (dataset
preparation), `checkpoints` (`priority.json`, state, epoch cache), `checks` / `loading` (checks), `plan` (decisions).

Over 400 lines because it is every `SFTTrainer` hook a priority changes (construction, dataset preparation, batch
fetching, the loss, evaluation, saving and resuming), each with its docstring and each a short call.
"""

from __future__ import annotations

import functools
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset
from torch.profiler import record_function
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTTrainer

from trl_priority import checks
from trl_priority.beyond_tokens import privacy, structural
from trl_priority.checkpoints import (  # noqa: F401  (PRIORITY_RECORD re-exported)
    PRIORITY_RECORD,
    load_priority_files,
    only_trained_adapters,
    priority_record,
    save_priority_files,
    saveable_args,
)
from trl_priority.config import PrioritySFTConfig, as_priority_config
from trl_priority.data.columns import TokenColumnCollator, prepare_dataset_with_columns
from trl_priority.loading import (
    check_before_load,
    check_complete_checkpoint,
    dequantize_head,
    last_complete_checkpoint,
)
from trl_priority.metrics import append_token_metrics, local_token_count, token_metric_sums
from trl_priority.objectives import priority_objective
from trl_priority.phi import PhiSettings, compute_phi, step_selections
from trl_priority.plan import RunPlan, check_compatible
from trl_priority.priorities import get_priority
from trl_priority.priorities.selection import select_over_step
from trl_priority.references import choice as sources
from trl_priority.references import epoch_cache, precompute
from trl_priority.references.sources import (
    AdapterReference,
    Reference,
    eval_mode,
)
from trl_priority.statistics import (
    causal_lm_of,
)
from trl_priority.statistics.gather import (
    collate_for_scoring,
    distribution_terms,
    gather_statistics,
    scored_statistics,
)
from trl_priority.statistics.state import TokenState


logger = get_logger(__name__)


class PrioritySFTTrainer(SFTTrainer):
    """[`~trl.SFTTrainer`] whose loss weights every target token by a priority Φ.

    Takes every argument of `SFTTrainer`, and the same datasets; `args` is a [`PrioritySFTConfig`], whose `priority`
    picks the method. With `priority` unset it trains exactly as `SFTTrainer`.

    Args:
        ref_model (`str`, `PreTrainedModel` or `Callable`, *optional*):
            Reference for methods that read reference statistics (`ref_logps`, ...): a path or a model (frozen, same
            tokenizer as the policy), or a callable `fn(batch)` returning the reference log-probabilities `(batch,
            seq_len - 1)` or a dict of reference statistics. When unset, `args.ref_model_name_or_path` is used, and
            otherwise the starting model (the base under a LoRA adapter, a frozen copy of a starting adapter, or a
            frozen copy of the model) for methods that accept it.

    Example:
    ```python
    from trl_priority import PrioritySFTConfig, PrioritySFTTrainer

    args = PrioritySFTConfig(output_dir="out", priority="prift_prob")
    trainer = PrioritySFTTrainer(model="path/to/model", args=args, train_dataset=dataset, peft_config=LoraConfig())
    trainer.train()
    phi = trainer.token_priorities(batch)  # (batch, seq_len - 1), 0 where the label is ignored
    ```
    """

    _tag_names = ["trl", "sft", "trl-priority"]
    _name = "PrioritySFT"

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: PrioritySFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func: Callable | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        ref_model: str | PreTrainedModel | Callable | None = None,
    ):
        args = as_priority_config(args, model)
        self.priority = None if args.priority is None else get_priority(args.priority)
        self.priority_args = {} if self.priority is None else self.priority.resolve_args(args.priority_args)
        self.reference: Reference | None = None
        self.priority_state: TokenState | None = None
        self._pending_selections: deque = deque()  # step-wide selections computed ahead, one per micro-batch
        self._epoch_cache: epoch_cache.EpochCache | None = None  # the reference's values kept per token across epochs
        self.ref_cache_entries: list[precompute.CacheEntry] = []  # with `ref_cache_dir`: the entries read or written
        starting_model = None

        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        check_before_load(model, args, train_dataset, evals, formatting_func, quantization_config, peft_config)
        # What the run reads and from where, decided once (`trl_priority.plan`)
        self.plan = RunPlan.build(
            args, self.priority, self.priority_args, model=model, ref_model=ref_model, peft_config=peft_config,
            train_dataset=train_dataset,
        )  # fmt: skip
        if self.priority is not None:
            check_compatible(self.plan, self.priority, self.priority_args, args, compute_loss_func, ref_model, model)
            args.completion_only_loss = self.plan.completion_only_loss
            if self.plan.stateful:
                self.priority_state = TokenState()
            checks.check_data_columns(self.priority.name, self.plan.column_specs, {"train": train_dataset, **evals})
            starting_model = sources.freeze_starting_reference(self.plan, model)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        checks.check_prepared_train(self.train_dataset, self.args.max_length)
        dequantize_head(causal_lm_of(self.model), "model")
        structural.apply_structural_priority(self)  # Φ over parameters (S2FT): which ones train, before the optimizer
        privacy.apply_differential_privacy(self)  # DP-SGD (Opacus) around the optimizer, when configured
        if self.priority is None:
            return
        checks.check_parallelism(self.priority.name, self.accelerator.parallelism_config)
        terms = bool(self.priority.token_terms or self.priority.distribution_terms)
        self.run_guard = checks.RunGuard(self.priority.name, has_terms=terms)
        if self._token_columns:
            checks.check_token_columns_supported(self.priority.name, self._is_vision_dataset)
            self.data_collator = TokenColumnCollator(
                self.data_collator, self._token_columns, self.padding_free, self.plan.column_padding
            )
        given = sources.Given(ref_model, model, starting_model, quantization_config)
        source = sources.reference_for(self.plan, given, self.model, self.args, load=self._build_reference)
        if self.plan.cache == "disk":  # computed once or read back: no reference forward during training
            self.precompute_reference(self.plan.cache_dir, source=source)
        else:
            self.reference = None if source is None else source.load()
            self._epoch_cache = epoch_cache.EpochCache.for_plan(
                self.plan, self.reference, self.model, self.accelerator, self.args.output_dir,
                lambda: self.state.num_train_epochs > 1, self.priority_args, rows=self.train_dataset,
            )  # fmt: skip
        summary = f"trl-priority: priority '{self.priority.name}' with {self.priority_args}"
        if self.reference is not None:
            summary += f", reference: {(self._epoch_cache or self.reference).description}"
        logger.info(summary, main_process_only=True)

    # ------------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------------
    @property
    def _token_columns(self) -> tuple[str, ...]:
        return self.plan.token_columns

    def precompute_reference(self, cache_dir: str | None = None, source: Reference | None = None):
        """Compute the reference statistics the method reads once over the prepared datasets (or reuse a matching
        entry of `cache_dir`), and read them as columns from then on: `trl_priority.references.precompute`. `source` is the
        reference they are computed with (default: the trainer's); it is loaded only on a miss, and freed after.

        Returns one `precompute.CacheEntry` per dataset (train, then each evaluation dataset)."""
        source = self.reference if source is None else source
        cached = precompute.cache_reference_statistics(self, source, cache_dir)
        base = self.data_collator.base if isinstance(self.data_collator, TokenColumnCollator) else self.data_collator
        self.plan = self.plan.with_disk_cache(cached.root)
        self.train_dataset, self.eval_dataset = cached.train_dataset, cached.eval_dataset
        self.data_collator = TokenColumnCollator(
            base, self._token_columns, self.padding_free, self.plan.column_padding
        )
        self.reference, self._epoch_cache = cached.reference, None
        self.ref_cache_entries = cached.entries
        sources.release_reference(source, self.accelerator, self.model)
        return cached.entries

    def _build_reference(self, given: sources.Given) -> torch.nn.Module:
        """The trainer's loader of a model source (`sources.reference_for`): its model loaded and placed frozen."""
        return sources.load_reference_model(
            self.plan, given, self.model, self.args, self._tokenizer, self.accelerator,
            self.is_deepspeed_enabled, self.is_fsdp_enabled,
        )  # fmt: skip

    def _save(self, output_dir: str | None = None, state_dict=None):
        with saveable_args(self.args):
            return self._save_model_files(output_dir, state_dict)

    def _save_model_files(self, output_dir: str | None = None, state_dict=None):
        # The frozen "ref" adapter is set-up, not a result: save only the trained adapter. A resumed run rebuilds the
        # copy from the starting adapter it is given again.
        if not (isinstance(self.reference, AdapterReference) and self.reference.adapter_name is not None):
            return super()._save(output_dir, state_dict)
        with only_trained_adapters(self.accelerator.unwrap_model(self.model), self.reference.adapter_name):
            return super()._save(output_dir, state_dict)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """As `SFTTrainer`'s, and say how many examples train on the end token alone or were dropped."""
        message = checks.empty_completions_warning(*checks.empty_completions(dataset), dataset_name)
        if message:
            warnings.warn(message, stacklevel=3)
        # A dataset prepared once the reference cache is installed (a new evaluation dataset) must carry its columns
        installed = isinstance(getattr(self, "reference", None), precompute.CachedColumns)
        specs = {**self.plan.column_specs, **(self.plan.cache_columns if installed else {})}
        if not specs:
            prepared = super()._prepare_dataset(
                dataset, processing_class, args, packing, formatting_func, dataset_name
            )
        else:  # the per-token columns cut and packed with the tokens (`trl_priority.data.columns`)
            prepared = prepare_dataset_with_columns(
                super()._prepare_dataset, dataset, processing_class, args, packing, formatting_func, dataset_name,
                plan=self.plan, specs=specs, priority=self.priority, priority_args=self.priority_args,
            )  # fmt: skip
        if isinstance(dataset, Dataset) and isinstance(prepared, Dataset) and not packing:
            message = checks.dropped_examples_warning(len(dataset), len(prepared), dataset_name, args.max_length)
            if message:
                warnings.warn(message, stacklevel=3)
        return prepared

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the per-token columns through `remove_unused_columns`; the collator pads them.
        missing = [column for column in self._token_columns if column not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    # ------------------------------------------------------------------------------------------------------------
    # Φ
    # ------------------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _phi_settings(self) -> PhiSettings:
        """The method's Φ settings (priority, resolved hyperparameters, schedule, granularity, pooling, warm-up), read
        once from the config."""
        return PhiSettings.from_config(self.args, self.priority, self.priority_args)

    @property
    def _step_args(self) -> dict[str, Any]:
        """The method's hyperparameters now (`phi.step_hyperparameters`): the configured ones, with the scheduled ones
        at the current progress. Computed once per step (keyed by the progress), however often it is read."""
        if not self.args.priority_schedule:
            return self.priority_args
        progress = self.progress
        cached = getattr(self, "_step_args_cache", None)
        if cached is None or cached[0] != progress:
            cached = self._step_args_cache = (progress, self._phi_settings.step_args(progress))
        return cached[1]

    @property
    def progress(self) -> float:
        """Fraction of training done, global_step / max_steps: 0 at the first step, read from the trainer state (so a
        resumed run continues where it stopped)."""
        max_steps = getattr(self.state, "max_steps", 0) or 0
        return min(1.0, self.state.global_step / max_steps) if max_steps > 0 else 0.0

    @functools.cached_property
    def _distribution_terms(self) -> tuple[Any, ...]:
        """The method's distribution terms, with the signed regime's unlikelihood (`statistics.gather.distribution_terms`)."""
        return distribution_terms(self.priority, self.args.negative_loss)

    def _gather_statistics(
        self, model, inputs: dict[str, Any], training: bool, ahead=None, train_batch=None, priority_of=None
    ):
        """Everything Φ reads for this batch, and the policy's outputs: `statistics.gather.gather_statistics` with
        the trainer's reference, epoch cache, state, hyperparameters now and progress. Returns `(outputs,
        statistics, request)`."""
        return gather_statistics(
            model, inputs, plan=self.plan, priority=self.priority, reference=self.reference,
            epoch_cache=self._epoch_cache, state=self.priority_state, step_args=self._step_args,
            progress=self.progress, granularity=self.args.priority_granularity, terms=self._distribution_terms,
            head_model=self.model, training=training, evaluating=getattr(self, "_evaluating", False), ahead=ahead,
            train_batch=train_batch, priority_of=priority_of,
        )  # fmt: skip

    def _priority_of(
        self, statistics: dict[str, Any], selected: torch.Tensor | None = None, whole_step: bool = False
    ) -> torch.Tensor:
        """Φ from the gathered statistics (`phi.compute_phi`): the method's selection first (over this micro-batch
        unless given; with `whole_step`, this micro-batch is the whole optimizer step and the selection spans every
        process), then Φ, pooling and warm-up."""
        over_processes = functools.partial(select_over_step, accelerator=self.accelerator) if whole_step else None
        return compute_phi(
            self._phi_settings,
            statistics,
            self.progress,
            step_args=self._step_args,
            selected=selected,
            over_processes=over_processes,
        )

    def _forward_with_priority(self, model, inputs: dict[str, Any], training: bool = False, ahead=None):
        """Run the policy, gather every statistic the method reads, and compute Φ.

        Returns `(outputs, phi, statistics, request)`; `phi` is `(B, T-1)` without gradient.
        """
        # A step of one micro-batch (`Trainer` counts them per step) selects in its own training forward, no pass
        whole_step = training and ahead is None and getattr(self, "current_gradient_accumulation_steps", None) == 1
        computed: list[torch.Tensor] = []  # Φ, once: a stateful method's history must be written once per step

        def priority_of(statistics: dict[str, Any]) -> torch.Tensor:
            if not computed:
                with record_function("trl_priority.priority"):
                    computed.append(
                        self._priority_of(statistics, None if ahead is None else ahead["selected"], whole_step)
                    )
            return computed[0]

        outputs, statistics, request = self._gather_statistics(model, inputs, training, ahead, priority_of=priority_of)
        phi = priority_of(statistics)  # computed in the forward already when a term reads it
        if self.priority_state is not None and training:
            self.priority_state.sync(self.accelerator)
        return outputs, phi, statistics, request

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of an optimizer step (as `Trainer` does), and select over all of them when the
        method's selection is step-wide: every micro-batch is scored ahead, without gradient, and the top fraction of
        every process's supervised tokens is kept.

        A step of a single micro-batch needs no scoring pass: its training forward has every score the selection
        reads, and the selection over the processes is made there (`_priority_of(whole_step=True)`)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._pending_selections.clear()
        selection = None if self.priority is None else self.priority.selection
        if selection is not None and selection.scope_of(self._step_args) == "step" and len(batch_samples) > 1:
            with record_function("trl_priority.step_selection"):
                self._pending_selections.extend(self._select_over_step(batch_samples))
        return batch_samples, num_items_in_batch

    @torch.no_grad()
    def _select_over_step(self, batch_samples) -> list[dict[str, Any]]:
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        over_processes = functools.partial(select_over_step, accelerator=self.accelerator)

        def gathered():  # one micro-batch at a time, scored as it comes (`phi.step_selections`)
            for batch in batch_samples:
                inputs = self._prepare_inputs(dict(batch))
                inputs["use_cache"] = False
                yield self._gather_statistics(model, inputs, training=False, train_batch=True)[1]

        with eval_mode(model):
            return step_selections(self.priority, gathered(), self._step_args, self.progress, over_processes)

    @torch.no_grad()
    def token_priorities(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Dataset) -> torch.Tensor:
        """Φ for every target token of a batch, as the trainer would weight it now.

        Args:
            batch: a collated batch (as yielded by the trainer's data loader), or prepared dataset rows (a list of
                examples or a `Dataset` slice such as `trainer.train_dataset.select(range(4))`), collated here.

        Returns:
            `(batch, seq_len - 1)` float tensor: position t is the weight of `labels[:, t + 1]`, like TRL's fused-head
            `log_probs`; 0 where the label is ignored. The model runs in eval mode, without gradient; a step-wide
            selection is made over this batch alone, and a stateful method's history is read, not written.
        """
        return self.token_statistics(batch, label_logps=False)["phi"]

    @torch.no_grad()
    def token_statistics(
        self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Dataset, label_logps: bool = True
    ) -> dict[str, torch.Tensor]:
        """Φ for every target token of a batch (`token_priorities`), with the per-token statistics it came from.

        Args:
            batch: as for `token_priorities`.
            label_logps: also return `logps`, the policy's log-probability of each label, and, for a model or adapter
                reference, `ref_logps`, the reference's (one more reference pass when the method reads other
                reference statistics only).

        Returns:
            `(batch, seq_len - 1)` tensors, position t scoring `labels[:, t + 1]`: `phi` (exactly what
            `token_priorities` returns), `mask` (the supervised labels), every per-token statistic the method read
            (`ref_logps`, `entropy`, a data column, its `selected` tokens, ...), and `logps` / `ref_logps` as above.
        """
        batch = collate_for_scoring(batch, self.data_collator)  # `statistics.gather`
        inputs = self._prepare_inputs(dict(batch))
        forward = None if self.priority is None else functools.partial(self._forward_with_priority, self.model)
        return scored_statistics(self.model, inputs, forward, self.reference, self._step_args, label_logps)

    def prediction_step(self, *args, **kwargs):
        """`SFTTrainer.prediction_step`, marked as evaluation: a stateful method's Φ on an evaluation row neither reads
        nor writes the training history (which is keyed by the training rows' example indices)."""
        self._evaluating = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._evaluating = False

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.priority is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "shift_labels" in inputs:
            raise ValueError(
                "The batch carries pre-shifted `shift_labels` (context or sequence parallelism), which priorities do "
                "not support: their statistics are aligned on whole sequences."
            )
        training = self.model.training
        mode = "train" if training else "eval"
        # As in `SFTTrainer.compute_loss`: no KV cache, and MoE router logits for the aux loss
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True

        ahead = self._pending_selections.popleft() if training and self._pending_selections else None
        outputs, phi, statistics, request = self._forward_with_priority(model, inputs, training, ahead)
        if ahead is not None and ahead["selected"].shape != phi.shape:
            raise RuntimeError("A step-wide selection does not match its micro-batch; please report this.")
        # The Φ-weighted NLL (or the LM-head pass's objective) and the declared terms (`objectives.priority_objective`)
        loss, term_values = priority_objective(
            self.priority, outputs, phi, statistics, request, num_items_in_batch, self._step_args,
            self.args.negative_loss,
        )  # fmt: skip

        # From here as in `SFTTrainer.compute_loss`: `num_items_in_batch` counts the tokens of every rank and DDP
        # averages the gradients, and the MoE aux loss is averaged over the accumulation steps
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_token_metrics(
            mode, inputs, outputs, phi, term_values, step_normalised=num_items_in_batch is not None
        )

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass, as in `SFTTrainer`.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(
        self, mode: str, inputs, outputs, phi: torch.Tensor, term_values: dict, step_normalised: bool
    ) -> None:
        """TRL's SFT metrics (entropy, token accuracy, tokens seen, aux loss), plus the priority's own
        (`trl_priority.metrics`)."""
        # One gather for every per-batch sum, averaged over the log window by `SFTTrainer.log` like TRL's own
        sums = token_metric_sums(outputs, phi, term_values)
        gathered = self.accelerator.gather_for_metrics(sums[None]).sum(0)  # summed over processes
        metrics = self._metrics[mode]
        append_token_metrics(
            metrics, gathered, outputs, list(term_values), run_guard=self.run_guard,
            global_step=self.state.global_step, progress=self.progress,
            warmup_ratio=self.args.priority_warmup_ratio, schedule=self.args.priority_schedule,
            step_args=self._step_args, step_normalised=step_normalised,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", None),
            num_processes=self.accelerator.num_processes,
        )  # fmt: skip

        if mode == "train":
            local = local_token_count(inputs)  # padding excluded
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, except that `resume_from_checkpoint=True` takes the last *complete* checkpoint.

        A run killed while saving leaves a `checkpoint-N` folder without `trainer_state.json` (written last); the
        stock lookup would pick it and fail. It is skipped, with a warning, and the one before it resumes.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        else:
            check_complete_checkpoint(resume_from_checkpoint)  # `trl_priority.loading`
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # The method's state, in checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def _reference_identity(self) -> dict[str, Any] | None:
        """What identifies the reference's values in this run: its source's `identity()` (`trl_priority.references.choice`),
        computed once, on every process together (hashing partitioned weights is collective): part of
        `priority.json` and the epoch cache's key."""
        return None if self.reference is None else self.reference.identity()

    def _priority_record(self) -> dict[str, Any]:
        """`priority.json`: what a resume must keep for Φ to mean what it meant (`checkpoints.priority_record`)."""
        return priority_record(self.priority, self.priority_args, self.args, self._reference_identity())

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        record = self._priority_record()  # on every process: the reference's identity may be a collective hash
        # Next to the optimizer state, before `trainer_state.json` marks the checkpoint complete
        if self.args.should_save:
            save_priority_files(output_dir, record, self.priority_state, self._epoch_cache)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        load_priority_files(
            checkpoint, self._priority_record(), self.args.allow_priority_change, self.priority_state,
            self._epoch_cache,
        )  # fmt: skip
