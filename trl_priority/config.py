"""`PrioritySFTConfig`: TRL's `SFTConfig` plus the settings that pick and parametrise a token priority."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from trl_priority.checks import check_model_init_kwargs, parse_json_mapping
from trl_priority.priorities import get_priority
from trl_priority.priorities.schedules import parse_schedule


@dataclass
class PrioritySFTConfig(SFTConfig):
    r"""
    Configuration class for [`PrioritySFTTrainer`]: every [`~trl.SFTConfig`] parameter, plus the token priority.

    With `priority` left unset, training is exactly TRL's `SFTTrainer`.

    Parameters:
        > Parameters that control the token priority

        priority (`str`, `dict` or `Callable`, *optional*):
            The method that weights each target token's loss: a registered name (see
            `trl_priority.available_priorities()` or `trl-priority list`), a function of per-token statistics
            (see `trl_priority.register_priority`), or a combination of registered ones, `{"product": [a, b]}`,
            `{"min": [a, b]}` or `{"sum": {a: w_a, b: w_b}}` (a JSON string on the command line; each part's
            hyperparameters go under its name in `priority_args`: `trl_priority.priorities.composed`). The loss is
            `Σ_t Φ_t · (−log π_θ(y_t)) / N`, with N the number of supervised tokens TRL normalises by. `None` trains
            exactly as `SFTTrainer`.
        priority_args (`dict[str, Any]` or `str`, *optional*):
            Hyperparameters of the method, as documented in its docstring; unset ones take the paper's defaults. An
            unknown key or an out-of-range value is an error that lists the valid ones. A JSON string is accepted on
            the command line. For a composition, each part's under its name: `{"verifier": {"wrong_weight": -0.5}}`.
        priority_granularity (`str`, *optional*, defaults to `"token"`):
            The unit Φ is given to: `"token"`, `"word"` (Φ pooled over the tokens of each word, from the decoded
            tokens, so a number split into several tokens is kept or dropped whole) or `"span"` (pooled over labelled
            spans: a `spans` column of `[start, end]` character offsets into each completion).
        priority_pooling (`str`, *optional*, defaults to `"max"`):
            How Φ is pooled over a word or span: `"max"`, `"mean"` or `"min"`; a unit with a negative Φ takes its most
            negative one, whatever the pooling.
        priority_warmup_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of training over which Φ blends from uniform SFT into the method: Φ_eff = (1 − w)·1 + w·Φ, w
            rising linearly from 0 to 1 (a negative Φ is scaled instead, w·Φ: never turned into learning). Logged as
            `priority/warmup_weight`.
        priority_schedule (`dict` or `str`, *optional*):
            Hyperparameters that move over training, e.g. `{"ratio": {"start": 1.0, "end": 0.6, "kind": "cosine"}}`
            (kinds: linear, cosine, step with `at`; `start` defaults to the configured value). Each current value is
            logged as `priority/<name>`.
        negative_loss (`str`, *optional*, defaults to `"unlikelihood"`):
            The loss on tokens a signed method gives a negative Φ (tokens to unlearn): `"unlikelihood"`, |Φ|·(−log(1 −
            p)), bounded below by 0 and vanishing once the token is unlikely (computed from the logits: exact and with
            a bounded gradient even for a token the model is sure of); or `"ascent"`, |Φ|·log p, plain gradient
            ascent on the NLL, unbounded (what some papers write; ask for it explicitly). Each token counts once in N.

        > Parameters that control the reference model

        ref_model_name_or_path (`str`, *optional*):
            Path or id of a frozen reference model, for methods that read reference statistics (`ref_logps`, ...).
            It must share the policy's tokenizer. When unset and the method accepts the starting model as reference,
            the reference is the policy as training starts: the base model with the LoRA adapter switched off, a
            frozen copy of a starting adapter, or, for full fine-tuning, a frozen copy of the model.
        ref_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for loading `ref_model_name_or_path`. Defaults to `model_init_kwargs`; the reference
            also inherits the policy's `attn_implementation` and dtype unless these set them. Under QLoRA the
            reference is loaded with the policy's `quantization_config` unless these set one: `{"quantization_config":
            null}` loads it unquantized (docs/qlora.md).
        precomputed_ref_columns (`bool`, *optional*, defaults to `False`):
            Read the reference statistics (`ref_logps`, ...) from dataset columns `ref_<name>`, one value per token of
            `input_ids` (the value at i scores token i), instead of running a reference model: no reference forward.
        ref_cache_dir (`str`, *optional*):
            Compute the reference statistics the method reads once, before training, over the prepared training and
            evaluation rows (after tokenization, truncation and packing), store them under `ref_cache_dir/<key>/`,
            and read them as columns from then on: training runs no reference forward, and the reference model is
            freed. The key covers the rows, the tokenizer, the reference (its files, weights or callback name), the
            length, truncation and packing settings and the statistics' hyperparameters: a matching entry is reused,
            anything changed is recomputed. `"auto"` is `$TRL_PRIORITY_CACHE`, else `~/.cache/trl-priority/ref`.
            Methods that read the reference's whole distribution (`asft`, `target_sft` with a reference prior) cache
            its top `ref_cache_topk` tokens per position instead. See `docs/reference_cache.md`.
        ref_cache_topk (`int`, *optional*, defaults to `64`):
            With `ref_cache_dir`, for methods whose loss reads the reference's whole next-token distribution: the
            number k of most likely tokens cached per position (ids and log-probabilities, next to the exact
            `ref_logps`), 8·k + 4 bytes per token (516 B at k = 64). Training rebuilds the distribution from them,
            the remaining mass shaped like the policy's (`trl_priority.references.topk`). Measured on SmolLM2-135M and
            GSM8K (`docs/benchmarks/topk_error.md`), k = 64 gives a 2.4% relative error in the KL anchor and 2.7%
            in its gradient (k = 16: 6.0% and 6.7%; k = 256: 1.0% and 1.1%). k and the tail rule are part of the
            cache key; k ≥ the vocabulary size stores the whole distribution (exact).
        ref_cache_batch_size (`int`, *optional*):
            Rows per batch when `ref_cache_dir` computes the reference statistics; defaults to
            `per_device_eval_batch_size`.
        ref_epoch_cache (`str`, *optional*, defaults to `"memory"`):
            Without `ref_cache_dir`, keep the reference statistics computed in the first epoch per token, and skip
            the reference forward of a later micro-batch whose supervised tokens are all known: `"memory"`, `"disk"`
            (a SQLite file under `output_dir`) or `"none"`. Saved in checkpoints; only for frozen references.
        allow_priority_change (`bool`, *optional*, defaults to `False`):
            Every checkpoint records the priority and its settings (`priority.json`); resuming with others is an error
            unless this is set.

        > Parameters that control a structural priority (Φ over parameters; composes with any `priority`)

        structural_priority (`str`, *optional*):
            `"s2ft"`: train only sparse attention heads and FFN channels selected by gradient sensitivity on the first
            training batches, everything else frozen (`trl_priority.beyond_tokens.structural`). Full fine-tuning only.
        structural_priority_args (`dict[str, Any]` or `str`, *optional*):
            Its hyperparameters (`head_ratio`, `channel_ratio`, `threshold`, `strategy`, `calibration_batches`,
            `seed`); see `trl_priority.beyond_tokens.structural.S2FTArgs`.

        > Parameters that control differential privacy

        differential_privacy (`dict[str, Any]` or `str`, *optional*):
            Train with DP-SGD through Opacus (`pip install 'trl-priority[dp]'`): `noise_multiplier` (1.0),
            `max_grad_norm` (per-example clipping, 1.0), `delta` (1e-5); ε is logged as `dp/epsilon`. With
            `priority: atdp` this is ATDP. See `trl_priority.beyond_tokens.privacy`.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + [
        "priority_args",
        "ref_model_init_kwargs",
        "priority_schedule",
        "structural_priority_args",
        "differential_privacy",
    ]

    priority: str | None = field(
        default=None,
        metadata={
            "help": "Token-priority method: a registered name (`trl-priority list`), a callable, or a composition "
            'such as \'{"product": ["verifier", "prift_prob"]}\'. None trains exactly as TRL\'s SFTTrainer.'
        },
    )
    priority_args: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters of the priority method, e.g. '{\"ratio\": 0.6}'. See its docstring."},
    )
    priority_granularity: str = field(
        default="token",
        metadata={
            "help": "Unit of Φ: token, word or span (Φ pooled over each).",
            "choices": ["token", "word", "span"],
        },
    )
    priority_pooling: str = field(
        default="max",
        metadata={"help": "Pooling of Φ over a word or span: max, mean or min.", "choices": ["max", "mean", "min"]},
    )
    priority_warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Fraction of training over which Φ blends from uniform SFT into the method."},
    )
    priority_schedule: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": 'Hyperparameter schedules, e.g. \'{"ratio": {"end": 0.6, "kind": "cosine"}}\'.'},
    )
    negative_loss: str = field(
        default="unlikelihood",
        metadata={
            "help": "Loss on tokens with a negative priority: 'unlikelihood' (bounded, default) or 'ascent' (plain "
            "gradient ascent on the NLL, unbounded).",
            "choices": ["unlikelihood", "ascent"],
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Frozen reference model for reference-based methods; must share the policy's tokenizer."},
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for loading the reference model. Defaults to `model_init_kwargs`; a "
            "`quantization_config` set here (null included) wins over the policy's."
        },
    )
    precomputed_ref_columns: bool = field(
        default=False,
        metadata={"help": "Read reference statistics from dataset columns `ref_<name>` instead of a reference model."},
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Compute the reference statistics once over the prepared rows, cache them in this folder (keyed by "
            "data, tokenizer, reference and settings; 'auto': ~/.cache/trl-priority/ref) and train without a "
            "reference forward."
        },
    )
    ref_cache_topk: int = field(
        default=64,
        metadata={
            "help": "With `ref_cache_dir`, for methods reading the reference's whole distribution: tokens cached per "
            "position (8·k + 4 bytes per token; k=64: 2.4%% KL error on SmolLM2/GSM8K)."
        },
    )
    ref_cache_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per batch of the `ref_cache_dir` precomputation (default: eval batch size)."},
    )
    ref_epoch_cache: str = field(
        default="memory",
        metadata={
            "help": "Without `ref_cache_dir`: keep the reference statistics of each token after its first epoch and "
            "skip the reference forward when a micro-batch is fully known: memory, disk (under output_dir) or none.",
            "choices": ["memory", "disk", "none"],
        },
    )
    allow_priority_change: bool = field(
        default=False,
        metadata={
            "help": "Allow resuming a checkpoint trained with another priority or other priority settings (each "
            "checkpoint records them in priority.json; a mismatch is an error otherwise)."
        },
    )
    structural_priority: str | None = field(
        default=None,
        metadata={
            "help": "Φ over parameters: 's2ft' trains only sparse heads and FFN channels chosen by gradient "
            "sensitivity (full fine-tuning; composes with any `priority`).",
            "choices": ["s2ft"],
        },
    )
    structural_priority_args: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters of the structural priority, e.g. '{\"head_ratio\": 0.25}'."},
    )

    differential_privacy: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'DP-SGD with Opacus, e.g. \'{"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}\'; '
            "ε is logged as dp/epsilon."
        },
    )

    def __post_init__(self):
        # The priority is checked first, before TrainingArguments sets up devices: a wrong method name or argument is
        # the error to show, before any model is loaded or anything is written.
        if isinstance(self.priority, str) and self.priority.lstrip().startswith("{"):
            # A composition given on the command line as JSON: '{"product": ["verifier", "prift_prob"]}'
            try:
                self.priority = json.loads(self.priority)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`priority` looks like a JSON composition but is not valid JSON ({error.msg} at character "
                    f"""{error.pos}): {self.priority!r}. Write e.g. '{{"product": ["verifier", "prift_prob"]}}'."""
                ) from None
        if isinstance(self.priority_args, str):
            try:
                self.priority_args = json.loads(self.priority_args)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`priority_args` is not valid JSON ({error.msg} at character {error.pos}): {self.priority_args!r}. "
                    """Write a JSON object, e.g. '{"ratio": 0.6}'."""
                ) from None
        if self.priority_args is not None and not isinstance(self.priority_args, dict):
            raise ValueError(
                f"`priority_args` must be a mapping of hyperparameter names to values (a dict, or a JSON object on the "
                f"command line), got {type(self.priority_args).__name__} {self.priority_args!r}."
            )
        # Parsed and checked like `priority_args`: a misspelt key fails here, not once the policy has loaded
        self.ref_model_init_kwargs = parse_json_mapping(
            "ref_model_init_kwargs", self.ref_model_init_kwargs, '{"dtype": "bfloat16"}'
        )
        check_model_init_kwargs("ref_model_init_kwargs", self.ref_model_init_kwargs, self.ref_model_name_or_path)
        self._check_structural_priority()
        if isinstance(self.differential_privacy, str):
            self.differential_privacy = json.loads(self.differential_privacy)
        if self.differential_privacy is not None:
            from trl_priority.beyond_tokens.privacy import DPArgs

            DPArgs.from_mapping(self.differential_privacy)  # an unknown or out-of-range setting fails here
        if self.ref_cache_topk < 1:
            raise ValueError(
                f"`ref_cache_topk={self.ref_cache_topk}` must be at least 1: the number of most likely reference "
                "tokens cached per position (64 by default)."
            )
        if self.ref_epoch_cache not in ("memory", "disk", "none"):
            raise ValueError(f"`ref_epoch_cache={self.ref_epoch_cache!r}` is not one of 'memory', 'disk', 'none'.")
        if self.negative_loss not in ("unlikelihood", "ascent"):
            raise ValueError(
                f"`negative_loss={self.negative_loss!r}` is not one of 'unlikelihood' (bounded, the default) or "
                "'ascent' (plain gradient ascent on the NLL)."
            )
        if self.priority is None:
            if self.priority_schedule or self.priority_warmup_ratio or self.priority_granularity != "token":
                raise ValueError(
                    "`priority_schedule`, `priority_warmup_ratio` and `priority_granularity` shape a priority, but no "
                    "`priority` is set. Set `priority` (see `trl-priority list`)."
                )
            if self.priority_args:
                raise ValueError(
                    f"`priority_args` {self.priority_args} were given but no `priority`. Set `priority` to one of the "
                    "methods listed by `trl-priority list`."
                )
        else:
            method = get_priority(self.priority)
            resolved = method.resolve_args(self.priority_args)
            self.priority_schedule = parse_schedule(self.priority_schedule)
            for name, entry in self.priority_schedule.items():
                if name not in method.hyperparameters or method.hyperparameters[name].kind not in (int, float):
                    numeric = [hp for hp, spec in method.hyperparameters.items() if spec.kind in (int, float)]
                    raise ValueError(
                        f"`priority_schedule` names '{name}', which is no numeric hyperparameter of '{method.name}' "
                        f"(those are {numeric})."
                    )
                for end in ("start", "end"):  # each end of the schedule must be a valid value
                    if end in entry:
                        entry[end] = method.hyperparameters[name].coerce(entry[end], method.name)
                        method.resolve_args({**resolved, name: entry[end]})
            if self.priority_granularity not in ("token", "word", "span"):
                raise ValueError(
                    f"`priority_granularity={self.priority_granularity!r}` is not one of 'token', 'word', 'span'."
                )
            if self.priority_pooling not in ("max", "mean", "min"):
                raise ValueError(f"`priority_pooling={self.priority_pooling!r}` is not one of 'max', 'mean', 'min'.")
            if not 0 <= self.priority_warmup_ratio < 1:
                raise ValueError(f"`priority_warmup_ratio={self.priority_warmup_ratio}` must be in [0, 1).")
            if self.loss_type != "nll":
                raise ValueError(
                    f"`loss_type={self.loss_type!r}` and `priority={method.name!r}` both set the per-token loss. Leave "
                    "`loss_type` at 'nll' (for DFT, use `priority='dft'`)."
                )
            if self.label_smoothing_factor > 0:
                raise ValueError(
                    "`label_smoothing_factor` needs the full logits and replaces the per-token loss that `priority` "
                    "weights. Set one of them."
                )
        super().__post_init__()

    def _check_structural_priority(self) -> None:
        from trl_priority.beyond_tokens.structural import STRUCTURAL_PRIORITIES, S2FTArgs

        if isinstance(self.structural_priority_args, str):
            self.structural_priority_args = json.loads(self.structural_priority_args)
        if self.structural_priority is None:
            if self.structural_priority_args:
                raise ValueError(
                    "`structural_priority_args` were given but no `structural_priority`: set it to 's2ft'."
                )
            return
        if self.structural_priority not in STRUCTURAL_PRIORITIES:
            raise ValueError(
                f"`structural_priority={self.structural_priority!r}` is not one of {list(STRUCTURAL_PRIORITIES)}."
            )
        S2FTArgs.from_mapping(self.structural_priority_args)  # an unknown or out-of-range value fails here

    @property
    def priority_name(self) -> str | None:
        """The method's name, also when `priority` is a callable."""
        return None if self.priority is None else get_priority(self.priority).name

    def to_dict(self) -> dict[str, Any]:
        # A callable priority is not JSON-serialisable; loggers (TensorBoard, W&B) get its name.
        d = super().to_dict()
        if callable(d.get("priority")):
            d["priority"] = self.priority_name
        return d


def as_priority_config(args, model) -> PrioritySFTConfig:
    """The trainer's own `PrioritySFTConfig` from what it was given: a default one named after the model, a copy of
    the user's (which must stay as they wrote it), or one built from plain `TrainingArguments`' fields."""
    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return PrioritySFTConfig(f"{name.split('/')[-1] or 'model'}-PrioritySFT")
    if isinstance(args, PrioritySFTConfig):
        # A copy: the trainer adjusts a few settings for the method (completion_only_loss for WIT), and the
        # user's config must stay as they wrote it
        return copy.copy(args)
    # The fields themselves, not `to_dict()`, which masks every `*_token` value (hub_token, eos_token, ...)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return PrioritySFTConfig(**{k: v for k, v in values.items() if k in PrioritySFTConfig.__dataclass_fields__})
