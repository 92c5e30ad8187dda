"""Several processes train as one process would; the shipped accelerate configs; the reference's placement.

The equality test launches 2 CPU processes (gloo) with `torch.distributed.run` on `tests/distributed_worker.py`, and
compares them with a one-process run on the SAME global batch of 4 examples per optimizer step: 1 process × 4 against
2 processes × 2 (and 2 processes × 1 × 2 accumulation steps), same seed, 3 steps. The logged losses of every step and
the trained weights must be equal to float tolerance, for an intrinsic method (dft), a method with a separate
reference model and a step-wide top-k selection made over the tokens of both processes (rho1), and a method whose
reference is the LoRA model with its adapter switched off (prift_prob). Two controls must NOT be equal: each process
normalising by its own supervised tokens (`average_tokens_across_devices=False`), and each process selecting among its
own tokens (rho1 with `scope="micro_batch"`); they show that the comparison sees what the equal cases get right.

Why both runs see the same examples at each step: accelerate shards the training dataloader by batches
(`BatchSamplerShard`, `split_batches=False`): every process draws the same seeded permutation and takes every other
batch of `per_device_train_batch_size`, so step s of 2 processes × 2 holds the 4 examples of step s of 1 process × 4
(rank 0 the first two, rank 1 the next two); with 2 accumulation steps of 1, rank 0 takes the 1st and 3rd, rank 1 the
2nd and 4th.

Run by hand (what the test runs, then compares with `distributed_worker.run_case` called in-process):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \\
        --output_dir /tmp/two

The engines (`test_engine_*`): DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, each on 2 CPU processes launched by
`accelerate launch --config_file trl_priority/accelerate_configs/<engine>.yaml --num_processes 2 --mixed_precision no`
(one launch per engine, every case in it), against the same one-process runs, for one method of each kind (policy
only, a separate reference with a step-wide selection, the adapter-off reference, a frozen copy, a whole-distribution
term, a signed method, a cached reference, a stop and resume from the engine's checkpoint), with the per-process
denominator as the control. DeepSpeed runs on its CPU accelerator (`DS_ACCELERATOR=cpu`, gloo); accelerate 1.15 keeps
CPU processes out of FSDP, so the worker applies the one branch accelerate applies for GPUs
(`distributed_worker.run_fsdp_on_cpu_processes`), and the rest is accelerate's and torch's own FSDP2 code. The worker
records how each engine placed the policy and the reference, so a silent fall-back to DDP fails. Skipped, with
DeepSpeed's error, where DeepSpeed is not installed or cannot start on the CPU.

torch's `fully_shard` runs on CPU with gloo, so the reference's FSDP2 placement (`freeze_and_place`) is also tested on
the DDP processes directly (`fsdp2_reference`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from trl_priority.tools.cli import accelerate_config_path, resolve_accelerate_config


REPOSITORY = Path(__file__).resolve().parents[1]
SHIPPED = ("multi_gpu", "zero2", "zero3", "fsdp2")


# ------------------------------------------------------------------------------------------------------------------
# The accelerate configs shipped in the package
# ------------------------------------------------------------------------------------------------------------------
def _launch_environment(path: str):
    """What `accelerate launch --config_file path` hands the training processes: the parsed launch arguments, and the
    environment from which each process builds its plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "x.py"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command`
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, defaults, env


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_accelerate_config_parses_and_its_name_resolves_to_it(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    shipped = files("trl_priority").joinpath("accelerate_configs").joinpath(f"{name}.yaml")
    assert shipped.is_file()
    assert accelerate_config_path(name) == str(shipped)
    launch = ["--num_processes", "2", "--accelerate_config", name, "--main_process_port", "0"]
    assert resolve_accelerate_config(launch) == ["--config_file", str(shipped), "--num_processes", "2", *launch[4:]]
    assert resolve_accelerate_config([f"--accelerate_config={name}"]) == ["--config_file", str(shipped)]

    config = load_config_from_file(str(shipped))  # unknown top-level keys raise
    # Keys inside fsdp_config / deepspeed_config become `accelerate launch` options; a misspelt one would be ignored
    options = vars(launch_command_parser().parse_args(["x.py"]))
    for key in {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}:
        assert key in options, f"{name}.yaml: '{key}' is no accelerate launch option"

    args, _, env = _launch_environment(str(shipped))
    assert args.mixed_precision == "bf16" and args.num_processes == 8
    with mock.patch.dict(os.environ, env):
        if name == "multi_gpu":
            assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
        elif name in ("zero2", "zero3"):
            plugin = DeepSpeedPlugin()
            stage = int(name[-1])
            assert plugin.zero_stage == stage and plugin.deepspeed_config["zero_optimization"]["stage"] == stage
            # ZeRO-3 loads the models partitioned and saves a 16-bit model folder that `from_pretrained` loads
            assert plugin.zero3_init_flag == (stage == 3)
            gathered = plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
            assert gathered == (stage == 3)
        else:
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # save_model writes an ordinary model folder
            assert plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
            assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


def test_accelerate_config_names_fall_back_to_trl_then_to_a_path(tmp_path):
    trl_only = files("trl").joinpath("accelerate_configs").joinpath("fsdp1.yaml")
    assert accelerate_config_path("fsdp1") == str(trl_only)
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert accelerate_config_path(str(own)) == str(own)
    with pytest.raises(SystemExit, match=r"trl-priority \(fsdp2, multi_gpu, zero2, zero3\) or TRL \(.*fsdp1.*\)"):
        accelerate_config_path("zero4")
    with pytest.raises(SystemExit, match="needs a value"):
        resolve_accelerate_config(["--accelerate_config"])


def test_the_sft_command_launches_with_the_shipped_config(monkeypatch):
    import accelerate.commands.launch

    from trl_priority.tools import cli

    launched = []
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", launched.append)  # nothing is started
    recipe = str(REPOSITORY / "recipes" / "dft.yaml")
    assert cli.main(["sft", "--config", recipe, "--accelerate_config", "zero3", "--num_processes", "2"]) == 0
    (args,) = launched
    assert args.config_file == accelerate_config_path("zero3") and args.num_processes == 2
    assert args.training_script.endswith("sft.py") and "--accelerate_config" not in args.training_script_args


# ------------------------------------------------------------------------------------------------------------------
# The reference's FSDP plugin
# ------------------------------------------------------------------------------------------------------------------
def test_fsdp_reference_wraps_its_own_layers_and_leaves_the_policy_plugin_alone(make_model):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from trl_priority.references.sources import _fsdp_plugin_for

    class Qwen3DecoderLayer(torch.nn.Module):  # the layer of a policy of another architecture
        pass

    reference = make_model(seed=1)  # a Llama
    for policy_layer, kept in ((LlamaDecoderLayer, True), (Qwen3DecoderLayer, False)):
        # The policy's plugin as accelerate leaves it after preparing the policy: bound to the policy's layer class
        policy_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=[policy_layer.__name__],
        )
        bound = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={policy_layer})
        policy_plugin.auto_wrap_policy = bound
        own = _fsdp_plugin_for(reference, policy_plugin)
        assert own is not policy_plugin
        # The policy's layer names when the reference has them, else the reference's `_no_split_modules`
        assert own.transformer_cls_names_to_wrap == (["LlamaDecoderLayer"] if kept else None)
        own.set_auto_wrap_policy(reference)  # what `prepare_fsdp` and `fsdp2_prepare_model` call
        assert own.auto_wrap_policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}
        assert policy_plugin.auto_wrap_policy is bound
        assert policy_plugin.transformer_cls_names_to_wrap == [policy_layer.__name__]


# ------------------------------------------------------------------------------------------------------------------
# Two processes against one
# ------------------------------------------------------------------------------------------------------------------
EQUAL = {  # two-process case -> the one-process run it must equal
    "dft": "dft",
    "rho1": "rho1",
    "rho1_accumulation": "rho1",
    "prift_prob_lora": "prift_prob_lora",
}
CONTROLS = {"dft_local_denominator": "dft", "rho1_local_selection": "rho1"}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Every case of the worker, trained by 2 CPU processes (gloo); plus the FSDP2 reference placement check."""
    output = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["tests/distributed_worker.py", "--output_dir", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the 2-process run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return output


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same cases, trained in this process on the same global batch (its batch is the 2 processes' together)."""
    from tests.distributed_worker import run_case

    output = tmp_path_factory.mktemp("one_process")
    for name in sorted({*EQUAL.values(), *ENGINE_EQUAL.values()}):
        run_case(name, str(output))
    return output


def _result(directory: Path, case: str):
    with open(directory / case / "losses.json") as file:
        logged = json.load(file)
    return logged, load_file(str(directory / case / "model.safetensors"))


@pytest.mark.parametrize("case", list(EQUAL))
def test_two_processes_train_as_one_process_on_the_same_global_batch(case, two_processes, one_process):
    logged, weights = _result(two_processes, case)
    expected_logged, expected_weights = _result(one_process, EQUAL[case])
    assert logged["world_size"] == 2 and expected_logged["world_size"] == 1
    assert len(logged["loss"]) == 3
    assert logged["loss"] == pytest.approx(expected_logged["loss"], rel=1e-5)
    assert logged["num_tokens"] == expected_logged["num_tokens"]  # the same examples at every step
    if case != "rho1_accumulation":  # (per-token metrics of accumulation steps are averaged over them, not pooled)
        assert logged["nll"] == pytest.approx(expected_logged["nll"], rel=1e-5)
        assert logged["priority/kept_fraction"] == pytest.approx(expected_logged["priority/kept_fraction"])
    assert weights.keys() == expected_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    if case.startswith("rho1"):  # the selection kept about half the supervised tokens, not all of them
        assert all(0.4 < kept < 0.6 for kept in expected_logged["priority/kept_fraction"])


@pytest.mark.parametrize("case", list(CONTROLS))
def test_controls_per_process_denominator_or_selection_do_not_train_as_one_process(case, two_processes, one_process):
    _, weights = _result(two_processes, case)
    _, expected_weights = _result(one_process, CONTROLS[case])
    largest = max((weights[name] - expected_weights[name]).abs().max().item() for name in weights)
    assert largest > 1e-3  # 100 times the tolerance of the equal cases


def test_fsdp2_reference_is_sharded_like_the_policy_on_two_processes(two_processes):
    for rank in range(2):
        with open(two_processes / "fsdp2_reference" / f"rank{rank}.json") as file:
            record = json.load(file)
        # One unit per decoder layer, the embeddings their own, the root: what accelerate makes of the policy
        assert record["root_is_unit"] and record["embeddings_are_unit"] and all(record["layers_are_units"])
        # Half of every weight on each rank, also after forwards (no unit stays gathered without a backward)
        assert record["held_fraction"] == [0.5, 0.5]
        # Rank 1 started from other weights: the shards come from rank 0, and both compute the unsharded statistics
        assert record["max_difference"] == {
            "ref_logps": pytest.approx(0.0, abs=1e-6),
            "ref_entropy": pytest.approx(0.0, abs=1e-6),
        }
        assert not record["requires_grad"] and not record["training"]


# ------------------------------------------------------------------------------------------------------------------
# The engines: DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2, two CPU processes against one
# ------------------------------------------------------------------------------------------------------------------
# One method of each kind, each against the one-process run of the same method on the same global batch
ENGINE_EQUAL = {
    "dft": "dft",  # the policy alone
    "rho1": "rho1",  # a separate reference model, a step-wide top-50% selection over both processes
    "prift_prob_lora": "prift_prob_lora",  # the reference is the policy with its LoRA adapter switched off
    "prift_prob_full": "prift_prob_full",  # full fine-tuning, the reference a frozen copy of the starting model
    "asft": "asft",  # a KL term over the frozen copy's whole next-token distribution
    "forgetting": "forgetting",  # signed Φ (unlearning), a step-wide selection
    "rho1_ref_cache": "rho1",  # the reference read from `ref_cache_dir`, filled by the same 2 processes first
    "rho1_resume": "rho1",  # stopped after step 2, resumed from the engine's checkpoint by a new trainer
}
ENGINE_CONTROLS = {"dft_local_denominator": "dft"}  # each process normalising by its own tokens
# FSDP2 only: asft in bf16 mixed precision, against the float32 run to bf16 tolerance (DeepSpeed cannot: transformers
# refuses bf16 without a GPU unless `use_cpu`, which turns DeepSpeed off)
FSDP2_BF16 = {"asft_bf16": "asft"}
ENGINE_LAUNCH_SECONDS = 600


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache  # one probe for both ZeRO stages
def _deepspeed_import_error() -> str | None:
    """Why DeepSpeed cannot run here, or None. Imported in a child process, as the training processes import it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    probe = "from deepspeed.accelerator import get_accelerator; print(get_accelerator().communication_backend_name())"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1]
    return None


@pytest.fixture(scope="module", params=["zero2", "zero3", "fsdp2"])
def engine_run(request, tmp_path_factory) -> tuple[str, Path]:
    """Every engine case, trained by 2 CPU processes launched by `accelerate launch` with the shipped config.

    DeepSpeed runs on its CPU accelerator (`DS_ACCELERATOR=cpu`, gloo). Both run in float32 (`--mixed_precision no`
    overrides the configs' bf16) so that the comparison with one process is exact to float tolerance.
    """
    engine = request.param
    if engine.startswith("zero") and (error := _deepspeed_import_error()) is not None:
        pytest.skip(f"DeepSpeed cannot run on the CPU here: {error}")
    output = tmp_path_factory.mktemp(engine)
    config = accelerate_config_path(engine)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2"]
    command += ["--mixed_precision", "no", "--main_process_port", str(_free_port())]
    command += ["tests/distributed_worker.py", "--engine", engine, "--output_dir", str(output)]
    command += ["--cases", *ENGINE_EQUAL, *ENGINE_CONTROLS, *(FSDP2_BF16 if engine == "fsdp2" else ())]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPOSITORY), env.get("PYTHONPATH", "")]))
    for _attempt in range(2):
        done = subprocess.run(
            command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=ENGINE_LAUNCH_SECONDS
        )
        # A full CI run (2026-12-05) lost a zero3 rank to gloo's C++ teardown ("terminate called without an active
        # exception", SIGABRT) after the cases had trained: that abort, and only it, is retried once (as test_scale's)
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            break
    assert done.returncode == 0, f"the 2-process {engine} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return engine, output


@pytest.mark.parametrize("case", list(ENGINE_EQUAL))
def test_engine_two_processes_train_as_one_process(case, engine_run, one_process):
    engine, output = engine_run
    logged, weights = _result(output, case)
    expected_logged, expected_weights = _result(one_process, ENGINE_EQUAL[case])
    assert logged["world_size"] == 2 and expected_logged["world_size"] == 1
    tokens, expected_tokens = logged["num_tokens"], expected_logged["num_tokens"]
    if case == "rho1_resume":  # TRL's cumulative `num_tokens` restarts at 0 in the resumed trainer (not checkpointed)
        tokens = tokens[:2] + [tokens[1] + tokens[2]]
    assert tokens == expected_tokens  # the same examples at every step
    assert logged["loss"] == pytest.approx(expected_logged["loss"], rel=1e-5)
    assert logged["nll"] == pytest.approx(expected_logged["nll"], rel=1e-5)
    assert logged["priority/kept_fraction"] == pytest.approx(expected_logged["priority/kept_fraction"])
    assert weights.keys() == expected_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], rtol=1e-4, atol=1e-5, msg=f"{engine}: {name}")

    # The engine did place the models: not a silent fallback to DDP
    placed = logged["placement"]
    reference = case in ("rho1", "rho1_resume", "prift_prob_full", "asft", "forgetting")  # a separate model
    assert (placed["reference_wrapper"] is not None) == reference
    if engine == "fsdp2":  # every weight of the policy and the reference sharded in halves (DTensor)
        assert placed["distributed_type"] == "FSDP" and placed["policy_wrapper"].startswith("FSDP")
        assert placed["policy_held_fraction"] == pytest.approx(0.5, abs=0.02)
        if reference:
            assert placed["reference_wrapper"].startswith("FSDP")
            assert placed["reference_held_fraction"] == pytest.approx(0.5, abs=0.02)
    else:  # ZeRO-2: weights whole on each process, the reference a stage-0 engine; ZeRO-3: both partitioned
        stage = int(engine[-1])
        assert placed["distributed_type"] == "DEEPSPEED" and placed["zero_stage"] == stage
        held = 0.5 if stage == 3 else 1.0
        assert placed["policy_held_fraction"] == pytest.approx(held, abs=0.02)
        if reference:
            assert placed["reference_wrapper"] == "DeepSpeedEngine"
            assert placed["reference_zero_stage"] == (3 if stage == 3 else 0)
            assert placed["reference_held_fraction"] == pytest.approx(held, abs=0.02)
    if case in ("rho1", "rho1_ref_cache", "rho1_resume", "forgetting"):  # a selection kept part of the tokens
        assert all(0.4 < kept < 0.8 for kept in expected_logged["priority/kept_fraction"])


def test_engine_checkpoint_resumes_and_save_model_writes_the_trained_weights(engine_run):
    # (that the resumed run ends with the one-process weights: `test_engine_two_processes_train_as_one_process`)
    from transformers import AutoModelForCausalLM

    engine, output = engine_run
    logged, weights = _result(output, "rho1_resume")
    assert logged["steps_after_resume"] == 1  # it trained step 3 only, from the checkpoint of step 2
    # ZeRO-3: the 16-bit gathered folder (float32 here, the weights' dtype); FSDP2: FULL_STATE_DICT; ZeRO-2: whole
    saved = AutoModelForCausalLM.from_pretrained(output / "rho1_resume" / "saved").state_dict()
    for name, value in weights.items():
        torch.testing.assert_close(saved[name].float(), value, rtol=0, atol=0, msg=f"{engine}: {name}")


@pytest.mark.parametrize("case", list(ENGINE_CONTROLS))
def test_engine_control_per_process_denominator_does_not_train_as_one_process(case, engine_run, one_process):
    _, output = engine_run
    _, weights = _result(output, case)
    _, expected_weights = _result(one_process, ENGINE_CONTROLS[case])
    largest = max((weights[name] - expected_weights[name]).abs().max().item() for name in weights)
    assert largest > 1e-3  # 100 times the tolerance of the equal cases


@pytest.mark.parametrize("case", list(FSDP2_BF16))
def test_fsdp2_bf16_runs_a_reference_distribution_term_and_stays_near_float32(case, engine_run, one_process):
    # FSDP2's mixed precision copies dataclass arguments of the forward: the reference's hidden states came back None
    engine, output = engine_run
    if engine != "fsdp2":
        pytest.skip("bf16 is run under FSDP2 only")
    logged, _ = _result(output, case)
    expected_logged, _ = _result(one_process, FSDP2_BF16[case])
    placed = logged["placement"]
    assert placed["mixed_precision"] == "bf16" and placed["fsdp_param_dtype"] == "torch.bfloat16"
    assert placed["reference_held_fraction"] == pytest.approx(0.5, abs=0.02)
    assert logged["num_tokens"] == expected_logged["num_tokens"]
    # (the weights are not compared: Adam's first steps move each weight by ±lr whatever the gradient's size, so
    # bf16 rounding of a near-zero gradient flips whole steps)
    assert logged["loss"] == pytest.approx(expected_logged["loss"], rel=1e-2)
