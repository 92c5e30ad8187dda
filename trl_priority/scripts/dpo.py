"""Train F-DPO / Factuality Preference from a TRL-style YAML recipe: TRL's `trl dpo` script with
`FactualityDPOTrainer`, `FactualityDPOConfig` and the `builtin:` model and datasets of `trl_priority.tools.builtin`.

Launched by `trl-priority dpo --config recipes/fdpo.yaml` through `accelerate launch`; runnable directly too:

    python -m trl_priority.scripts.dpo --config recipes/fdpo.yaml
"""

from __future__ import annotations

from accelerate import PartialState
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_priority.beyond_tokens.preference import FactualityDPOConfig, FactualityDPOTrainer
from trl_priority.scripts.sft import load_data
from trl_priority.tools import builtin


def main(script_args, training_args, model_args, dataset_args) -> FactualityDPOTrainer:
    model_init_kwargs = dict(attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    with PartialState().main_process_first():  # built-in assets are prepared once, by the main process
        model_path = builtin.resolve_model(model_args.model_name_or_path)
        train_dataset, eval_dataset = load_data(script_args, dataset_args, training_args)
    trainer = FactualityDPOTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    return trainer


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((ScriptArguments, FactualityDPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


if __name__ == "__main__":
    script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(
        fail_with_unknown_args=False
    )
    main(script_args, training_args, model_args, dataset_args)
