"""One training process of the multi-process equality test (`tests/test_distributed.py`); not collected by pytest.

Launched once per process by `torch.distributed.run` (gloo on CPU), or called in-process for the one-process run:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \\
        --output_dir /tmp/two --cases dft rho1

Every case trains the tiny model of `tests/conftest.py` for a few steps on the same global batch of 4 examples per
optimizer step (4 // (processes · accumulation steps) per process), with the same seed, and the main process writes
`<output_dir>/<case>/losses.json` (the logged loss and metrics of every step, the world size) and
`<output_dir>/<case>/model.safetensors` (the trained weights), for the test to compare across world sizes.

The case `fsdp2_reference` trains nothing: it shards a reference model with `freeze_and_place` under an FSDP2 plugin
(torch's `fully_shard` runs on CPU with gloo) and writes, per rank, `<output_dir>/fsdp2_reference/rank<r>.json`: which
modules became FSDP units, the share of the weights the rank holds, and how far its reference statistics are from
those of the unsharded model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tests.conftest import (  # noqa: E402
    build_args,
    build_model,
    build_tokenizer,
    prompt_completion_dataset,
    save_model_dir,
)


GLOBAL_BATCH = 4  # examples per optimizer step, over all processes and accumulation steps
STEPS = 3

# Each case: the method and its settings. `reference_seed`: a separate reference model (saved from that seed);
# `lora`: train a LoRA adapter (the reference is the base with the adapter switched off); `accumulation`: gradient
# accumulation steps. The `*_local*` cases are controls: they must NOT match the one-process run.
CASES = {
    "dft": dict(priority="dft"),
    "rho1": dict(priority="rho1", priority_args={"ratio": 0.5}, reference_seed=1),
    "rho1_accumulation": dict(priority="rho1", priority_args={"ratio": 0.5}, reference_seed=1, accumulation=2),
    "prift_prob_lora": dict(priority="prift_prob", lora=True),
    # Controls: each rank normalises by its own tokens / selects among its own tokens
    "dft_local_denominator": dict(priority="dft", average_tokens_across_devices=False),
    "rho1_local_selection": dict(
        priority="rho1", priority_args={"ratio": 0.5, "scope": "micro_batch"}, reference_seed=1
    ),
}


def run_case(name: str, output_dir: str) -> None:
    from accelerate import PartialState
    from peft import LoraConfig
    from safetensors.torch import save_file

    from trl_priority import PrioritySFTTrainer

    settings = dict(CASES[name])
    lora = settings.pop("lora", False)
    reference_seed = settings.pop("reference_seed", None)
    accumulation = settings.pop("accumulation", 1)
    state = PartialState(cpu=True)
    per_device, remainder = divmod(GLOBAL_BATCH, state.num_processes * accumulation)
    if remainder or per_device == 0:
        raise ValueError(
            f"{state.num_processes} processes × {accumulation} accumulation steps do not divide {GLOBAL_BATCH}."
        )
    directory = os.path.join(output_dir, name)
    tokenizer = build_tokenizer()
    if reference_seed is not None:
        with state.main_process_first():  # the main process writes it, the others read it
            settings["ref_model_name_or_path"] = save_model_dir(
                os.path.join(output_dir, "models"), tokenizer, reference_seed
            )
    args = build_args(
        os.path.join(directory, "run"),
        max_steps=STEPS,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,  # large enough that a wrong gradient shows in the weights after a few steps
        use_cpu=True,
        **{"average_tokens_across_devices": True, **settings},
    )
    trainer = PrioritySFTTrainer(
        model=build_model(tokenizer, seed=0),
        args=args,
        train_dataset=prompt_completion_dataset(GLOBAL_BATCH * STEPS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [log for log in trainer.state.log_history if "loss" in log]
        keys = ("loss", "nll", "priority/kept_fraction", "priority/effective_tokens", "num_tokens")
        record = {"world_size": state.num_processes, **{key: [log[key] for log in logs] for key in keys}}
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "losses.json"), "w") as file:
            json.dump(record, file, indent=2)
        model = trainer.accelerator.unwrap_model(trainer.model)
        weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(weights, os.path.join(directory, "model.safetensors"))
    state.wait_for_everyone()


def check_fsdp2_reference(output_dir: str) -> None:
    """Shard a reference under an FSDP2 plugin as the trainer does, and record what each rank holds and computes.

    accelerate does not run the trainer under FSDP on CPU processes (see `tests/test_distributed.py`), so the plugin
    is handed to `freeze_and_place` through a stand-in for the accelerator, with what `fsdp2_prepare_model` reads.
    Rank 1 starts from other weights than rank 0 (as a rank that did not load the checkpoint): with
    `cpu_ram_efficient_loading` the shards are filled from rank 0's weights, so every rank computes rank 0's statistics.
    """
    from types import SimpleNamespace

    import torch
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule
    from trl.trainer.utils import add_fused_lm_head

    from trl_priority.reference import ModelReference, freeze_and_place
    from trl_priority.statistics import add_distribution_head

    state = PartialState(cpu=True)
    tokenizer = build_tokenizer()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        parallelism_config=None,
        device=state.device,
        mixed_precision="no",
        is_main_process=state.is_main_process,
    )
    whole = build_model(tokenizer, seed=1)
    local = build_model(tokenizer, seed=1 if state.is_main_process else 7)
    for model in (whole, local):
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        add_distribution_head(model)
    sizes = {name: param.numel() for name, param in local.named_parameters()}
    placed = freeze_and_place(local, accelerator, is_deepspeed=False, is_fsdp=True)

    def held_fraction() -> float:  # the share of the weights this rank holds now
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in placed.parameters())
        return held / sum(sizes.values())

    held_after_placement = held_fraction()

    rows = prompt_completion_dataset(2)
    texts = [prompt + completion for prompt, completion in zip(rows["prompt"], rows["completion"])]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    names = ("logps", "entropy")
    sharded, _ = ModelReference(placed).statistics(None, dict(batch), names, {})
    whole.eval()
    expected, _ = ModelReference(whole).statistics(None, dict(batch), names, {})

    record = {
        "rank": state.process_index,
        "root_is_unit": isinstance(placed, FSDPModule),
        "layers_are_units": [isinstance(layer, FSDPModule) for layer in placed.model.layers],
        "embeddings_are_unit": isinstance(placed.model.embed_tokens, FSDPModule),
        "held_fraction": [held_after_placement, held_fraction()],  # after placement, after two forwards
        "max_difference": {name: (sharded[name] - expected[name]).abs().max().item() for name in sharded},
        "requires_grad": any(param.requires_grad for param in placed.parameters()),
        "training": placed.training,
    }
    directory = os.path.join(output_dir, "fsdp2_reference")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{state.process_index}.json"), "w") as file:
        json.dump(record, file, indent=2)
    torch.distributed.barrier()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cases", nargs="+", default=[*CASES, "fsdp2_reference"])
    args = parser.parse_args(argv)
    for name in args.cases:
        if name == "fsdp2_reference":
            check_fsdp2_reference(args.output_dir)
        else:
            run_case(name, args.output_dir)


if __name__ == "__main__":
    main()
