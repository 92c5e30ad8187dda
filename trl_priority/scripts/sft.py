"""Train with a token priority from a TRL-style YAML recipe.

Launched by `trl-priority sft --config recipes/<method>.yaml` through `accelerate launch`; runnable directly too:

    python -m trl_priority.scripts.sft --config recipes/quickstart.yaml

It is TRL's `trl sft` script (same `ScriptArguments`, `ModelConfig` and dataset options) with
`PrioritySFTTrainer`, `PrioritySFTConfig` and the `builtin:` model and datasets of `trl_priority.tools.builtin`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import TrainerCallback
from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)

from trl_priority import PrioritySFTConfig, PrioritySFTTrainer, checks, get_priority
from trl_priority.references import disk_cache as ref_cache
from trl_priority.tools import builtin


@dataclass
class PriorityScriptArguments(ScriptArguments):
    """TRL's script arguments, plus `precompute_only` (what `trl-priority precompute-ref` passes)."""

    precompute_only: bool = field(
        default=False,
        metadata={
            "help": "Build the trainer, which computes the method's reference statistics into `ref_cache_dir` "
            "(default 'auto'), and exit without training."
        },
    )


def load_data(script_args: ScriptArguments, dataset_args: DatasetMixtureConfig, training_args: PrioritySFTConfig):
    """`(train_dataset, eval_dataset)` from a dataset mixture, a `builtin:` dataset or `load_dataset` by name."""
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name is None:
        raise ValueError("Set `dataset_name` (e.g. `builtin:gsm8k`, or a dataset path) or a `datasets` mixture.")
    elif script_args.dataset_name.startswith(builtin.PREFIX):
        train = builtin.load_dataset(script_args.dataset_name)
        if training_args.eval_strategy == "no":
            return train, None
        split = train.train_test_split(test_size=0.1, seed=training_args.seed)
        return split["train"], split["test"]
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    train = dataset[script_args.dataset_train_split]
    evaluate = training_args.eval_strategy != "no"
    return train, dataset[script_args.dataset_test_split] if evaluate else None


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM stops training cleanly at the end of the current optimizer step, without saving a
    half-trained final model: the last complete checkpoint stays the one to resume from. (`trl-priority sft` forwards
    both signals here, so stopping the command stops the training; SIGKILL still stops at once.)

    Under several processes the stop is agreed at every step end (`agreed_signal`: one all-reduce of one number), so
    every process stops after the same step even when only one was signalled (a process that stopped alone would
    leave the others waiting in the next step's collectives)."""

    def __init__(self):
        self.signum = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._record)

    def _record(self, signum, frame):
        self.signum = signum  # a repeated signal (Ctrl-C reaches both the command and this process) changes nothing

    def on_step_end(self, args, state, control, **kwargs):
        self.signum = agreed_signal(self.signum)
        if self.signum is not None:
            control.should_training_stop = True
            control.should_save = False
        return control


def agreed_signal(signum: int | None) -> int | None:
    """The stop signal any process received (the largest number, SIGTERM over SIGINT), the same on every process;
    `signum` itself with a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=PartialState().device)  # (1,)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def close_process_group() -> None:
    """Every process done, then the process group torn down. A process that exits with its group alive can abort in
    the C++ teardown ("terminate called without an active exception", SIGABRT: seen with DeepSpeed installed, which
    accelerate then imports), and its exit code then says failure after a run that succeeded or stopped cleanly.
    Called only where every process gets to it (a successful run, or a stop agreed across processes)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resume_target(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it. The parser gives a string: "true" (the spelling the
    docs recommend) means the last complete checkpoint of `output_dir` (True), "false" or "" no resume (None), and
    anything else is a checkpoint's path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "", "none"):
        return None
    return value or None


def build_trainer(script_args, training_args, model_args, dataset_args, callbacks=None) -> PrioritySFTTrainer:
    """The trainer `main` trains, built from the parsed recipe without training: model (with its PEFT adapter),
    datasets, reference. `trl-priority inspect` builds it the same way to show the priorities of a recipe."""
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    # Built-in assets are prepared once, by the main process, before the others read them
    # (the data first: a column the method reads and the data lacks is named before a model is converted or loaded)
    with PartialState().main_process_first():
        train_dataset, eval_dataset = load_data(script_args, dataset_args, training_args)
        model_path = builtin.resolve_model(model_args.model_name_or_path)
        training_args.ref_model_name_or_path = builtin.resolve_model(training_args.ref_model_name_or_path)

    return PrioritySFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )


def precompute(script_args, training_args, model_args, dataset_args) -> PrioritySFTTrainer:
    """`trl-priority precompute-ref`: build the trainer exactly as for training, which fills the reference cache (or
    finds it filled), and stop. A later `sft` run with the same recipe and `--ref_cache_dir` reads it."""
    method = None if training_args.priority is None else get_priority(training_args.priority)
    resolved = {} if method is None else method.resolve_args(training_args.priority_args)
    if not ref_cache.cached_statistics(method, resolved):
        raise SystemExit(
            f"precompute-ref: priority '{training_args.priority}' reads no reference statistics and not the "
            "reference's distribution: there is nothing to precompute."
        )
    training_args.ref_cache_dir = training_args.ref_cache_dir or "auto"
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    folder = trainer.plan.cache_dir  # the run plan's disk cache: `ref_cache_dir` resolved
    trainer.accelerator.print(
        f"Reference statistics cached in {folder}. Train without a reference forward: trl-priority sft "
        f"--config <recipe> --ref_cache_dir {folder}"
    )
    return trainer


def main(script_args, training_args, model_args, dataset_args):
    if script_args.precompute_only:
        return precompute(script_args, training_args, model_args, dataset_args)
    checks.check_resume(training_args.resume_from_checkpoint, training_args.output_dir)  # before any model loads
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    trainer.add_callback(stop := StopOnSignal())  # after DefaultFlowCallback, so that its `should_save` is overridden
    trainer.train(resume_from_checkpoint=resume_target(training_args.resume_from_checkpoint))
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        trainer.accelerator.print(
            f"Stopped by {name} after step {trainer.state.global_step}; the final model was not saved. Resume from "
            f"the last checkpoint in {training_args.output_dir} with `--resume_from_checkpoint true`."
        )
        close_process_group()
        raise SystemExit(128 + stop.signum)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return trainer


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((PriorityScriptArguments, PrioritySFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
    close_process_group()
