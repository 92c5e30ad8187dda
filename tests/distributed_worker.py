"""One training process of the multi-process equality test (`tests/test_distributed.py`); not collected by pytest.

Launched once per process by `torch.distributed.run` (gloo on CPU), or called in-process for the one-process run:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \\
        --output_dir /tmp/two --cases dft rho1

or under an engine (`--engine zero2|zero3|fsdp2`), launched by `accelerate launch` with the shipped config:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 accelerate launch --config_file trl_priority/accelerate_configs/zero3.yaml \\
        --num_processes 2 --mixed_precision no tests/distributed_worker.py --engine zero3 --output_dir /tmp/zero3 \\
        --cases dft rho1

DeepSpeed runs on CPU processes with its CPU accelerator (`DS_ACCELERATOR=cpu`, gloo): the trainer is given
`use_cpu=False` (accelerate ignores DeepSpeed when told `cpu`) and `ddp_backend="gloo"` (accelerate finds no device
backend on a machine without GPUs). FSDP2: accelerate builds the plugin from the shipped config but keeps CPU
processes `MULTI_CPU` and drops it; `run_fsdp_on_cpu_processes` applies the one step accelerate applies for GPU
processes (see there).

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


# Run as a script, Python puts this folder first on the path, where tests/statistics, tests/data, ... (the test tree
# mirrors the package) would shadow the standard library's `statistics` and other top-level modules: the repository
# root instead
_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_TESTS), *(p for p in sys.path if os.path.abspath(p or ".") != _TESTS)]

from transformers import TrainerCallback  # noqa: E402

from tests.conftest import (  # noqa: E402
    StopAfter,
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
    "prift_prob_full": dict(priority="prift_prob"),  # full fine-tuning, the reference a frozen copy of the start
    "asft": dict(priority="asft"),  # a KL anchor to the frozen copy's whole next-token distribution
    "forgetting": dict(priority="forgetting", reference_seed=1),  # signed Φ, a step-wide top-70% selection
    # asft in bf16 mixed precision (FSDP2 casts the forward's inputs; compared with float32 to bf16 tolerance)
    "asft_bf16": dict(priority="asft", bf16=True),
    # rho1 stopped after step 2 (its checkpoint written), resumed from it in a new trainer, and saved with
    # `save_model`: the engine's own checkpoint and model folder (ZeRO-3: 16-bit gathered; FSDP2: FULL_STATE_DICT)
    "rho1_resume": dict(priority="rho1", priority_args={"ratio": 0.5}, reference_seed=1, stop_and_resume=2),
    # rho1 reading its reference from `ref_cache_dir`, filled by these processes before training
    "rho1_ref_cache": dict(priority="rho1", priority_args={"ratio": 0.5}, reference_seed=1, ref_cache=True),
    # Controls: each rank normalises by its own tokens / selects among its own tokens
    "dft_local_denominator": dict(priority="dft", average_tokens_across_devices=False),
    "rho1_local_selection": dict(
        priority="rho1", priority_args={"ratio": 0.5, "scope": "micro_batch"}, reference_seed=1
    ),
}


ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def run_case(name: str, output_dir: str, engine: str = "ddp", bf16: bool = False) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    from trl_priority import PrioritySFTTrainer

    settings = dict(CASES[name])
    lora = settings.pop("lora", False)
    reference_seed = settings.pop("reference_seed", None)
    accumulation = settings.pop("accumulation", 1)
    if settings.pop("ref_cache", False):
        settings["ref_cache_dir"] = os.path.join(output_dir, "ref_cache")
    stop_at = settings.pop("stop_and_resume", None)
    if stop_at is not None:
        settings.update(save_strategy="steps", save_steps=stop_at)
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, remainder = divmod(GLOBAL_BATCH, num_processes * accumulation)
    if remainder or per_device == 0:
        raise ValueError(
            f"{num_processes} processes × {accumulation} accumulation steps do not divide {GLOBAL_BATCH}."
        )
    directory = os.path.join(output_dir, name)
    tokenizer = build_tokenizer()
    # DeepSpeed is used only when accelerate is not told `cpu`; then it finds no device backend and needs gloo named
    placement = dict(use_cpu=False, ddp_backend="gloo") if engine.startswith("zero") else dict(use_cpu=True)

    def new_args():  # new arguments for each trainer: under DeepSpeed a second trainer may not reuse the first's
        return build_args(
            os.path.join(directory, "run"),
            max_steps=STEPS,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,  # large enough that a wrong gradient shows in the weights after a few steps
            **{"bf16": bf16, "average_tokens_across_devices": True, **placement, **settings},
        )

    state = new_args().distributed_state  # set up by the arguments, as the trainer will find it
    if reference_seed is not None:
        with state.main_process_first():  # the main process writes it, the others read it
            settings["ref_model_name_or_path"] = save_model_dir(
                os.path.join(output_dir, "models"), tokenizer, reference_seed
            )

    def new_trainer():
        return PrioritySFTTrainer(
            model=build_model(tokenizer, seed=0),
            args=new_args(),
            train_dataset=prompt_completion_dataset(GLOBAL_BATCH * STEPS),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
        )

    trainer = new_trainer()
    if stop_at is None:
        trainer.train()
    else:  # stopped as a killed run would be, then a new trainer resumes from the checkpoint it left
        trainer.add_callback(StopAfter(stop_at))
        trainer.train()
        trainer = new_trainer()
        steps = StepCounter()
        trainer.add_callback(steps)
        trainer.train(resume_from_checkpoint=os.path.join(trainer.args.output_dir, f"checkpoint-{stop_at}"))
    placed = engine_placement(trainer)  # after training: the policy is wrapped by the engine in `train`
    # Whole weights on the main process: ZeRO-3 and FSDP2 gather the shards (a collective, so on every rank)
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        logs = [log for log in trainer.state.log_history if "loss" in log]
        keys = ("loss", "nll", "priority/kept_fraction", "priority/effective_tokens", "num_tokens")
        record = {"world_size": state.num_processes, **{key: [log[key] for log in logs] for key in keys}}
        record.update(engine=engine, placement=placed)
        if stop_at is not None:  # the resumed trainer's own steps: the rest, not all of them again
            record["steps_after_resume"] = steps.steps
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "losses.json"), "w") as file:
            json.dump(record, file, indent=2)
        weights = {key: value.detach().cpu().float().contiguous() for key, value in weights.items()}
        save_file(weights, os.path.join(directory, "model.safetensors"))
    if stop_at is not None:  # the model folder `save_model` writes (a collective under ZeRO-3 and FSDP2)
        trainer.save_model(os.path.join(directory, "saved"))
    state.wait_for_everyone()


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def engine_placement(trainer) -> dict:
    """What the engine did with the policy and the reference model on this rank: the accelerate distributed type,
    the wrapper classes, and the share of each model's weights this rank holds (ZeRO-3 partitions: `ds_numel` is
    the whole size, the local tensor a slice; FSDP2: DTensor shards; otherwise whole)."""
    reference = getattr(trainer.reference, "model", None)  # a separate model (ModelReference), else None

    def held_fraction(model) -> float:
        held = whole = 0
        for param in model.parameters():
            whole += getattr(param, "ds_numel", param.numel())
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition (padded to equal sizes)
                held += param.ds_tensor.numel()
            else:
                held += (param.to_local() if hasattr(param, "to_local") else param).numel()
        return held / whole

    engine = trainer.model_wrapped
    # FSDP2: the dtype its mixed-precision policy computes the forward in (None: the parameters' own)
    fsdp_policy = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    return {
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "mixed_precision": trainer.accelerator.mixed_precision,
        "fsdp_param_dtype": None if fsdp_policy is None else str(fsdp_policy.param_dtype),
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "policy_wrapper": type(engine).__name__,
        "policy_held_fraction": held_fraction(engine),
        "reference_wrapper": None if reference is None else type(reference).__name__,
        "reference_held_fraction": None if reference is None else held_fraction(reference),
        "reference_zero_stage": (
            reference.zero_optimization_stage() if hasattr(reference, "zero_optimization_stage") else None
        ),
    }


def run_fsdp_on_cpu_processes() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), as it does on GPU processes.

    `accelerate launch` with the shipped fsdp2 config starts the processes with the FSDP settings in their environment,
    and `Accelerator` builds the FSDP plugin from them; but `AcceleratorState` switches to `DistributedType.FSDP`
    only for GPU-like device types (accelerate 1.15, `state.py`), so CPU processes stay `MULTI_CPU` and the plugin is
    dropped (the trainer would run DDP). This applies what that branch does for GPUs (the distributed type, the
    plugin's mixed precision, the plugin) when accelerate has left a plugin out on CPU processes; everything after it
    (`fsdp2_prepare_model`, the optimizer, saving) is accelerate's and torch's own code, on CPU.
    """
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    original_init = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            accelerate_state.PartialState._shared_state["distributed_type"] = self.distributed_type

    accelerate_state.AcceleratorState.__init__ = init


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

    from trl_priority.references.sources import ModelReference, freeze_and_place

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
    parser.add_argument("--engine", choices=ENGINES, default="ddp")
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (launch with it too)")
    args = parser.parse_args(argv)
    if args.engine == "fsdp2":
        run_fsdp_on_cpu_processes()
    cases = args.cases or ([*CASES, "fsdp2_reference"] if args.engine == "ddp" else list(CASES))
    for name in cases:
        if name == "fsdp2_reference":
            check_fsdp2_reference(args.output_dir)
        else:
            run_case(name, args.output_dir, args.engine, args.bf16)
    from trl_priority.scripts.sft import close_process_group

    # every rank done, then the group torn down: else DeepSpeed's CPU processes can abort at exit ("terminate called
    # without an active exception"), as a full CI run showed once on zero3 even with the group destroyed unbarriered
    close_process_group()


if __name__ == "__main__":
    main()
