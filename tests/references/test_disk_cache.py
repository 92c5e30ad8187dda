"""Reference statistics paid once: the `ref_cache_dir` cache (exact values, no reference forward, reuse by key,
atomic writes, resume, the `precompute-ref` command) and the lazy epoch cache."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from tests.conftest import StopAfter
from trl_priority import PrioritySFTTrainer
from trl_priority.references import disk_cache as ref_cache
from trl_priority.references import epoch_cache, precompute
from trl_priority.references.sources import ColumnReference, ModelReference


LAYOUTS = {
    "padding": {"max_length": 64},
    "padding_free": {"padding_free": True, "max_length": None},
    "packing": {"packing": True, "max_length": 128},
}


class Counter:
    """Counts a module's forward calls through a hook that holds no reference to the module."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, args, output):
        self.calls += 1


def counted_reference(make_model, seed: int = 1):
    model = make_model(seed=seed)
    counter = Counter()
    model.register_forward_hook(counter)
    return model, counter


def entries(cache_dir) -> list[str]:
    """The complete-looking entries of a cache folder (temporary folders are hidden)."""
    return sorted(name for name in os.listdir(cache_dir) if not name.startswith("."))


def make_trainer(make_model, tokenizer, datasets_, make_args, ref_model, n=6, method="prift_prob", **settings):
    output_dir = settings.pop("output_dir", None)
    args = make_args(priority=method, **settings)
    if output_dir is not None:
        args.output_dir = output_dir
    return PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(n), processing_class=tokenizer,
        ref_model=ref_model,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# (a) cached values are the online reference's
# ------------------------------------------------------------------------------------------------------------------
METHODS = {
    "prift_prob": ("prift_prob", {}, ("logps",)),
    "prift_mass": ("prift_mass", {}, ("mass",)),  # a distribution statistic, from the chunked pass
    "eaft_reference": ("eaft", {"signal": "reference", "k": 5}, ("topk_entropy",)),  # with a hyperparameter
}


@pytest.mark.parametrize(
    "case, layout",
    [(case, layout) for case in ("prift_prob", "prift_mass") for layout in LAYOUTS] + [("eaft_reference", "padding")],
)
def test_cached_statistics_equal_the_online_reference(
    case, layout, make_model, tokenizer, datasets_, make_args, tmp_path
):
    method, priority_args, names = METHODS[case]
    settings = dict(LAYOUTS[layout], priority_args=priority_args)
    # Computed in batches of 2 (longest rows first): other batches than the one compared below
    cached = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), method=method,
        ref_cache_dir=str(tmp_path / "cache"), ref_cache_batch_size=2, **settings,
    )  # fmt: skip
    online = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), method=method, ref_epoch_cache="none",
        **settings,
    )  # fmt: skip
    assert isinstance(cached.reference, precompute.CachedColumns) and isinstance(online.reference, ModelReference)
    assert cached.plan.reference_statistics == names

    batch = cached.data_collator(list(cached.train_dataset))
    columns = {f"ref_{name}": batch[f"ref_{name}"] for name in names}
    model_inputs = {k: v for k, v in batch.items() if k not in cached._token_columns}
    online_inputs = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    from_cache, _ = cached.reference.statistics(cached.model, model_inputs, names, cached.priority_args, columns)
    from_model, _ = online.reference.statistics(online.model, dict(model_inputs), names, online.priority_args)
    mask = batch["labels"][:, 1:] != -100
    assert mask.sum() > 20
    for name in names:
        key = f"ref_{name}"
        torch.testing.assert_close(from_cache[key], torch.where(mask, from_model[key], 0.0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        cached.token_priorities(batch), online.token_priorities(online_inputs), atol=1e-5, rtol=1e-4
    )


# ------------------------------------------------------------------------------------------------------------------
# (b) no reference forward in training; reuse; a changed input recomputes
# ------------------------------------------------------------------------------------------------------------------
def test_training_with_the_cache_runs_no_reference_forward_and_a_second_run_reuses_it(
    make_model, tokenizer, datasets_, make_args, tmp_path, capsys
):
    cache = str(tmp_path / "cache")
    ref, counter = counted_reference(make_model)
    alive = weakref.ref(ref)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref, ref_cache_dir=cache)
    del ref
    assert counter.calls > 0 and not trainer.ref_cache_entries[0].reused
    assert "computed in" in capsys.readouterr().out
    # The reference model is freed once its values are cached: training holds no copy of it
    gc.collect()
    assert alive() is None
    counter.calls = 0
    trainer.train()
    assert counter.calls == 0
    first_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    # The same inputs (a fresh copy of the same reference): the entry is read back, the reference never runs
    again, counter_again = counted_reference(make_model)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, again, ref_cache_dir=cache)
    assert trainer.ref_cache_entries[0].reused and counter_again.calls == 0
    assert f"reused from {trainer.ref_cache_entries[0].path}" in capsys.readouterr().out
    trainer.train()
    assert counter_again.calls == 0
    assert [log["loss"] for log in trainer.state.log_history if "loss" in log] == first_losses

    # Truncation changes the rows: recomputed, and the log says what differs from the nearest entry
    changed, counter_changed = counted_reference(make_model)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, changed, ref_cache_dir=cache, max_length=24)
    entry = trainer.ref_cache_entries[0]
    assert not entry.reused and counter_changed.calls > 0
    assert any(d.startswith("settings.max_length 64 → 24") for d in entry.differences)
    assert "settings.max_length 64 → 24" in capsys.readouterr().out
    # Another reference (other weights): recomputed too
    other, counter_other = counted_reference(make_model, seed=2)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, other, ref_cache_dir=cache)
    assert not trainer.ref_cache_entries[0].reused and counter_other.calls > 0
    assert any(d.startswith("reference.parameters") for d in trainer.ref_cache_entries[0].differences)
    assert len(entries(cache)) == 3


def test_a_path_reference_is_never_loaded_on_a_hit_and_a_changed_weight_file_recomputes(
    model_dir, make_model, tokenizer, datasets_, make_args, tmp_path, monkeypatch
):
    path = model_dir(seed=1)
    cache = str(tmp_path / "cache")
    settings = dict(ref_model_name_or_path=path, ref_cache_dir=cache)
    make_trainer(make_model, tokenizer, datasets_, make_args, None, **settings)
    builds = []
    original = PrioritySFTTrainer._build_reference
    monkeypatch.setattr(
        PrioritySFTTrainer, "_build_reference", lambda self, *a: builds.append(1) or original(self, *a)
    )
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, None, **settings)
    assert trainer.ref_cache_entries[0].reused and builds == []
    weights = Path(path) / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new checkpoint
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, None, **settings)
    assert not trainer.ref_cache_entries[0].reused and builds == [1]
    assert any(d.startswith("reference.files.model.safetensors") for d in trainer.ref_cache_entries[0].differences)


def test_the_lora_base_and_eval_datasets_are_cached(make_model, tokenizer, datasets_, make_args, tmp_path):
    from peft import LoraConfig

    args = make_args(priority="prift_prob", ref_cache_dir=str(tmp_path / "cache"), eval_strategy="steps", eval_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make = lambda: PrioritySFTTrainer(  # noqa: E731
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(6),
        eval_dataset={"a": datasets_.prompt_completion(2), "b": datasets_.prompt_completion(3)},
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    trainer = make()
    assert [(e.dataset, e.reused) for e in trainer.ref_cache_entries] == [("train", False), ("a", False), ("b", False)]
    assert all("ref_logps" in d.column_names for d in (trainer.train_dataset, *trainer.eval_dataset.values()))
    trainer.train()  # evaluates both datasets from their columns: the adapter is never switched off
    assert any("eval_a_loss" in log for log in trainer.state.log_history)
    trainer = make()
    assert all(e.reused for e in trainer.ref_cache_entries)


def test_a_starting_adapter_copy_is_cached_then_deleted(make_model, tokenizer, datasets_, make_args, tmp_path):
    from peft import LoraConfig, get_peft_model

    def starting_adapter():
        torch.manual_seed(0)
        model = get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # an adapter that was trained: not the identity
                torch.nn.init.normal_(param, std=0.1)
        return model

    args = make_args(priority="prift_prob", ref_cache_dir=str(tmp_path / "cache"))
    data = datasets_.prompt_completion(4)
    trainer = PrioritySFTTrainer(model=starting_adapter(), args=args, train_dataset=data, processing_class=tokenizer)
    assert not trainer.ref_cache_entries[0].reused
    assert "ref" not in trainer.model.peft_config  # its values are cached; it is not saved with the trained adapter
    trainer.train()
    trainer = PrioritySFTTrainer(model=starting_adapter(), args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.ref_cache_entries[0].reused


def test_precompute_on_a_built_trainer_switches_it_to_columns(make_model, tokenizer, datasets_, make_args, tmp_path):
    ref, counter = counted_reference(make_model)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref)
    assert trainer._epoch_cache is not None
    online = trainer.token_priorities(trainer.train_dataset.select(range(4)))
    entries_ = trainer.precompute_reference(str(tmp_path / "cache"))
    assert not entries_[0].reused and isinstance(trainer.reference, ColumnReference)
    assert trainer._epoch_cache is None
    cached = trainer.token_priorities(trainer.train_dataset.select(range(4)))
    torch.testing.assert_close(cached, online, atol=1e-6, rtol=1e-5)
    counter.calls = 0
    trainer.train()
    assert counter.calls == 0


# ------------------------------------------------------------------------------------------------------------------
# (c) atomic writes: an interrupted write leaves no entry; a corrupt one is recomputed
# ------------------------------------------------------------------------------------------------------------------
def test_an_interrupted_write_leaves_no_entry_and_the_next_run_recomputes(
    make_model, tokenizer, datasets_, make_args, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"

    def killed(path, meta):
        raise KeyboardInterrupt("killed while writing")

    with monkeypatch.context() as patch:
        patch.setattr(ref_cache, "_write_meta", killed)
        with pytest.raises(KeyboardInterrupt):
            make_trainer(make_model, tokenizer, datasets_, make_args, make_model(seed=1), ref_cache_dir=str(cache))
    assert entries(cache) == [] and os.listdir(cache) == []  # the temporary folder went with the exception
    # A kill leaves its temporary folder: hidden, never read
    (cache / ".deadbeef.tmp-1" / "data").mkdir(parents=True)

    ref, counter = counted_reference(make_model)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref, ref_cache_dir=str(cache))
    assert not trainer.ref_cache_entries[0].reused and counter.calls > 0
    (entry,) = entries(cache)
    assert (cache / entry / "meta.json").is_file()


@pytest.mark.parametrize("damage", ["no_meta", "truncated_arrow", "other_key"])
def test_a_corrupt_entry_is_ignored_and_recomputed(damage, make_model, tokenizer, datasets_, make_args, tmp_path):
    cache = tmp_path / "cache"
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, make_model(seed=1), ref_cache_dir=str(cache))
    path = Path(trainer.ref_cache_entries[0].path)
    expected = list(trainer.train_dataset["ref_logps"])  # read now: the rows map the entry's files
    if damage == "no_meta":
        (path / "meta.json").unlink()
    elif damage == "truncated_arrow":
        (arrow,) = (path / "data").glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        meta = (path / "meta.json").read_text()
        (path / "meta.json").write_text(meta.replace(trainer.ref_cache_entries[0].key, "0" * 32))
    ref, counter = counted_reference(make_model)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref, ref_cache_dir=str(cache))
    assert not trainer.ref_cache_entries[0].reused and counter.calls > 0
    assert list(trainer.train_dataset["ref_logps"]) == expected
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, make_model(seed=1), ref_cache_dir=str(cache))
    assert trainer.ref_cache_entries[0].reused


# ------------------------------------------------------------------------------------------------------------------
# (d) the lazy epoch cache
# ------------------------------------------------------------------------------------------------------------------
def losses(trainer) -> torch.Tensor:
    return torch.tensor([log["loss"] for log in trainer.state.log_history if "loss" in log])


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("method", ["prift_prob", "rho1"])  # rho1: scored ahead, over the optimizer step
def test_epoch_cache_runs_the_reference_in_the_first_epoch_only(
    method, mode, make_model, tokenizer, datasets_, make_args
):
    settings = dict(n=4, method=method, num_train_epochs=2, max_steps=-1)  # 2 micro-batches of 2 rows an epoch
    ref, counter = counted_reference(make_model)
    cached = make_trainer(make_model, tokenizer, datasets_, make_args, ref, ref_epoch_cache=mode, **settings)
    assert cached._epoch_cache is not None and cached._epoch_cache.mode == mode
    cached.train()
    assert counter.calls == 2  # epoch 1's two micro-batches; epoch 2 reads every value back
    assert cached._epoch_cache.forwards == 2
    if mode == "disk":
        assert (Path(cached.args.output_dir) / "ref_epoch_cache" / "rank-0.sqlite").is_file()

    ref, counter = counted_reference(make_model)
    online = make_trainer(make_model, tokenizer, datasets_, make_args, ref, ref_epoch_cache="none", **settings)
    assert online._epoch_cache is None
    online.train()
    assert counter.calls == 4
    assert len(losses(cached)) == 4
    torch.testing.assert_close(losses(cached), losses(online), atol=1e-6, rtol=1e-5)


def test_epoch_cache_is_off_for_one_epoch_and_for_a_reference_that_moves(make_model, tokenizer, datasets_, make_args):
    from peft import LoraConfig

    one_epoch = dict(max_steps=-1, num_train_epochs=1)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, make_model(seed=1), **one_epoch)
    assert trainer._epoch_cache is None and "example_index" not in trainer.plan.column_specs

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="prift_prob"), train_dataset=datasets_.prompt_completion(4),
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    assert trainer._epoch_cache is not None  # the adapter-off base is frozen
    # A base weight that trains too (outside every adapter): the adapter-off reference moves with it
    next(p for n, p in trainer.model.named_parameters() if "norm" in n).requires_grad_(True)
    assert not epoch_cache.reference_is_frozen(trainer.reference, trainer.model)
    built = epoch_cache.EpochCache.for_plan(
        trainer.plan, trainer.reference, trainer.model, trainer.accelerator, trainer.args.output_dir, lambda: True, {}
    )
    assert built is None


# ------------------------------------------------------------------------------------------------------------------
# (e) resume
# ------------------------------------------------------------------------------------------------------------------
def losses_by_step(trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


@pytest.mark.parametrize("cache", ["ref_cache_dir", "epoch_cache"])
def test_a_resumed_run_gives_the_losses_of_the_uninterrupted_one(
    cache, make_model, tokenizer, datasets_, make_args, tmp_path
):
    if cache == "ref_cache_dir":
        settings = dict(ref_cache_dir=str(tmp_path / "cache"), max_steps=4)
    else:
        settings = dict(num_train_epochs=2, max_steps=-1)  # 2 steps an epoch: stopped at the end of epoch 1
    settings.update(save_strategy="steps", save_steps=2, lr_scheduler_type="linear")

    def run(output: str, stop: int | None = None, resume: str | None = None):
        ref, counter = counted_reference(make_model)
        trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref, n=4, output_dir=output, **settings)
        if stop is not None:
            trainer.add_callback(StopAfter(stop))
        counter.calls = 0
        trainer.train(resume_from_checkpoint=resume)
        return trainer, counter.calls

    whole, _ = run(str(tmp_path / "whole"))
    first, _ = run(str(tmp_path / "parts"), stop=2)
    assert first.state.global_step == 2
    checkpoint = tmp_path / "parts" / "checkpoint-2"
    if cache == "epoch_cache":
        assert (checkpoint / "ref_epoch_cache.safetensors").is_file()
    second, forwards = run(str(tmp_path / "parts"), resume=str(checkpoint))
    assert forwards == 0  # columns, or every value restored from the checkpoint's epoch cache
    expected = losses_by_step(whole)
    assert len(expected) == 4
    assert {**losses_by_step(first), **losses_by_step(second)} == expected


def test_two_processes_share_the_computation_and_the_epoch_cache(
    make_model, tokenizer, datasets_, make_args, tmp_path
):
    """`tests/ref_cache_worker.py` on 2 CPU processes (gloo): the entry they write is the one-process entry (same key,
    same values), and in epoch 2 neither process runs the reference, although each meets rows the other scored."""
    import json

    repository = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(repository / "tests" / "ref_cache_worker.py"), "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=repository, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert not record["reused"] and record["epoch_cache_forwards"] == [2, 2] and record["steps"] == 4
    assert entries(tmp_path / "cache") == [record["key"]]

    # One process, the same inputs: the two-process entry is reused, and holds what one process computes
    (reference,) = (tmp_path / "models").iterdir()
    settings = dict(ref_model_name_or_path=str(reference), per_device_train_batch_size=1)
    reused = make_trainer(
        make_model, tokenizer, datasets_, make_args, None, n=5, ref_cache_dir=str(tmp_path / "cache"), **settings
    )
    assert reused.ref_cache_entries[0].reused and reused.ref_cache_entries[0].key == record["key"]
    alone = make_trainer(
        make_model, tokenizer, datasets_, make_args, None, n=5, ref_cache_dir=str(tmp_path / "alone"), **settings
    )
    assert not alone.ref_cache_entries[0].reused
    for shared, own in zip(record["ref_logps"], alone.train_dataset["ref_logps"], strict=True):
        torch.testing.assert_close(torch.tensor(shared), torch.tensor(own), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# (f) the command line, and the default folder
# ------------------------------------------------------------------------------------------------------------------
def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(ref_cache.CACHE_ENV, str(tmp_path / "here"))
    assert ref_cache.resolve_cache_dir("auto") == str(tmp_path / "here")
    monkeypatch.delenv(ref_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ref_cache.default_cache_dir() == str(tmp_path / "xdg" / "trl-priority" / "ref")


def test_cli_precompute_ref_fills_a_cache_that_sft_reuses(model_dir, tmp_path):
    from tests.tools.test_cli import gsm8k_with_columns, parse
    from trl_priority.scripts import sft

    recipe = Path(__file__).parents[2] / "recipes" / "prift_prob.yaml"
    model = model_dir(seed=0)
    cache = tmp_path / "cache"
    settings = [
        "--model_name_or_path", model, "--dataset_name", gsm8k_with_columns(tmp_path / "data", []),
        "--output_dir", str(tmp_path / "run"), "--max_length", "1024", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--disable_tqdm", "true", "--ref_cache_dir", str(cache),
    ]  # fmt: skip
    command = [sys.executable, "-m", "trl_priority.tools.cli", "precompute-ref", "--config", str(recipe), *settings]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([*command, "--num_processes", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computed in" in result.stdout and "no cached entry yet" in result.stdout
    assert len(entries(cache)) == 1 and not (tmp_path / "run" / "adapter_model.safetensors").exists()  # no training

    trainer = sft.main(*parse(recipe, *settings, "--max_steps", "1"))
    assert trainer.ref_cache_entries[0].reused and trainer.ref_cache_entries[0].key == entries(cache)[0]
    assert isinstance(trainer.reference, ColumnReference)
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 1


def test_precompute_ref_refuses_a_method_without_reference_statistics(tmp_path):
    from tests.tools.test_cli import parse
    from trl_priority.scripts import sft

    recipe = Path(__file__).parents[2] / "recipes" / "dft.yaml"
    with pytest.raises(SystemExit, match="nothing to precompute"):
        sft.main(*parse(recipe, "--precompute_only", "true", "--output_dir", str(tmp_path)))


def test_settings_that_cannot_cache_are_named(make_model, tokenizer, datasets_, make_args, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="both provide the reference statistics"):
        make_trainer(
            make_model, tokenizer, datasets_, make_args, None, ref_cache_dir=cache, precomputed_ref_columns=True
        )
    schedule = {"k": {"start": 5, "end": 2}}
    with pytest.raises(ValueError, match=r"moves \['k'\], which the cached reference statistics are computed with"):
        make_trainer(
            make_model, tokenizer, datasets_, make_args, make_model(seed=1), method="eaft", ref_cache_dir=cache,
            priority_args={"signal": "reference"}, priority_schedule=schedule,
        )  # fmt: skip
    with pytest.raises(ValueError, match="ref_epoch_cache='gpu'"):
        make_args(ref_epoch_cache="gpu")


def test_a_batch_without_the_cached_columns_is_named(make_model, tokenizer, datasets_, make_args, tmp_path):
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), ref_cache_dir=str(tmp_path / "cache")
    )
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(2))))
    trainer.token_priorities(batch)
    with pytest.raises(ValueError, match=r"no column \['ref_logps'\].*Collate rows of `trainer.train_dataset`"):
        trainer.token_priorities({k: v for k, v in batch.items() if k != "ref_logps"})


# ------------------------------------------------------------------------------------------------------------------
# docs/reference_cache.md: the worked example, with a tiny teacher
# ------------------------------------------------------------------------------------------------------------------
DOCS = Path(__file__).parents[2] / "docs" / "reference_cache.md"


def test_docs_worked_example_calls_the_teacher_once_per_row(make_model, tokenizer, datasets_, tmp_path, monkeypatch):
    block = DOCS.read_text().split("## Worked example")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ref_cache.CACHE_ENV, str(tmp_path / "cache"))
    teacher = make_model(seed=3)  # the policy's tokenizer, other weights
    scored = []  # rows per teacher call
    teacher.register_forward_hook(
        lambda module, args, kwargs, output: scored.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    at_train = []
    original = PrioritySFTTrainer.train
    monkeypatch.setattr(
        PrioritySFTTrainer, "train", lambda self, *a, **k: at_train.append(len(scored)) or original(self, *a, **k)
    )

    names = {
        "teacher": teacher,
        "model": make_model(),
        "dataset": datasets_.prompt_completion(8),
        "tokenizer": tokenizer,
    }
    exec(compile(block, str(DOCS), "exec"), dict(names))
    assert sum(scored) == 8 and at_train == [len(scored)]  # every row once, all before training
    (entry,) = os.listdir(tmp_path / "cache")
    assert "my-teacher-70b@v3" in (tmp_path / "cache" / entry / "meta.json").read_text()

    # The same script again: the teacher is not called at all
    scored.clear()
    exec(compile(block, str(DOCS), "exec"), dict(names, model=make_model()))
    assert scored == []


# ------------------------------------------------------------------------------------------------------------------
# Whole-distribution methods: the top-k cache
# ------------------------------------------------------------------------------------------------------------------
def logged(trainer, key: str) -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log]


DISTRIBUTION_CASES = {
    # LoRA: the base with the adapter off is the reference; a high learning rate so that the KL moves off 0
    "asft_lora": ("asft", {"kl_weight": 1.0}, "kl_anchor"),
    # A separate reference; alpha="reference" also reads the cached `ref_logps`
    "target_sft": ("target_sft", {"alpha": "reference", "prior": "reference"}, "soft_target"),
}


@pytest.mark.parametrize("case", list(DISTRIBUTION_CASES))
def test_the_whole_vocabulary_cached_gives_the_online_losses(
    case, make_model, tokenizer, datasets_, make_args, tmp_path
):
    from peft import LoraConfig

    method, priority_args, term = DISTRIBUTION_CASES[case]
    lora = case.endswith("_lora")

    def run(**settings):
        args = make_args(
            priority=method, priority_args=priority_args, max_steps=3, learning_rate=5e-2, ref_epoch_cache="none",
            **settings,
        )  # fmt: skip
        trainer = PrioritySFTTrainer(
            model=make_model(), args=args, train_dataset=datasets_.prompt_completion(6), processing_class=tokenizer,
            ref_model=None if lora else make_model(seed=1),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
        )  # fmt: skip
        trainer.train()
        return trainer

    vocab = len(tokenizer)
    cached = run(ref_cache_dir=str(tmp_path / "cache"), ref_cache_topk=vocab, ref_cache_batch_size=4)
    online = run()
    assert isinstance(cached.reference, precompute.CachedColumns) and cached.reference.topk == vocab
    assert not isinstance(online.reference, ColumnReference)
    assert cached.train_dataset[0]["ref_topk_ids"][1].__len__() == vocab
    terms = torch.tensor(logged(cached, f"loss/{term}"))
    assert len(terms) == 3 and terms.abs().max() > 1e-3  # the term is not trivially 0
    torch.testing.assert_close(terms, torch.tensor(logged(online, f"loss/{term}")), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        torch.tensor(logged(cached, "loss")), torch.tensor(logged(online, "loss")), atol=1e-5, rtol=1e-4
    )


def topk_kl_oracle(policy, reference, rows, collator, k: int, kl_weight: float) -> float:
    """kl_weight · Σ_t KL(π̂_t ‖ π_θ) / N over the supervised tokens of `rows` (padded), from full logits: π̂ the
    reference's top-k with the rest of its mass shaped like the policy's (`topk_of`, `dense_logprobs`)."""
    from trl_priority.priorities.distribution import kl_to_reference
    from trl_priority.references.topk import dense_logprobs, topk_of

    batch = collator([{k_: v for k_, v in row.items() if not k_.startswith("ref_")} for row in rows])
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        policy_logprobs = policy(**inputs).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        ref_logprobs = reference(**inputs).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    ids, logps, label_logps = topk_of(ref_logprobs[mask], labels[mask], k)
    policy_rows = policy_logprobs[mask]  # (N, V)
    approx = dense_logprobs(ids, logps, label_logps, labels[mask], policy_rows.size(-1), tail_logprobs=policy_rows)
    return kl_weight * kl_to_reference(policy_rows, labels[mask], approx).sum().item() / int(mask.sum())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_topk_kl_anchor_of_the_first_step_equals_an_oracle(
    layout, make_model, tokenizer, datasets_, make_args, tmp_path
):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    k, n = 8, 6
    ref, counter = counted_reference(make_model, seed=1)
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, ref, n=n, method="asft", priority_args={"kl_weight": 0.5},
        ref_cache_dir=str(tmp_path / "cache"), ref_cache_topk=k, per_device_train_batch_size=n, max_steps=1,
        **LAYOUTS[layout],
    )  # fmt: skip
    assert trainer.train_dataset.features["ref_topk_ids"].feature.length == k
    counter.calls = 0
    trainer.train()
    assert counter.calls == 0
    # The same tokens, padded, whatever the layout trained on (one batch holds every row: the same N)
    rows = list(make_trainer(make_model, tokenizer, datasets_, make_args, None, n=n, method="dft").train_dataset)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    expected = topk_kl_oracle(make_model(), make_model(seed=1), rows, collator, k, kl_weight=0.5)
    exact = topk_kl_oracle(make_model(), make_model(seed=1), rows, collator, len(tokenizer), kl_weight=0.5)
    assert abs(expected - exact) > 1e-4  # k < V: the top-k term is not the exact one
    (first,) = logged(trainer, "loss/kl_anchor")
    assert first == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_the_topk_cache_runs_no_reference_forward_and_k_is_part_of_the_key(
    make_model, tokenizer, datasets_, make_args, tmp_path
):
    cache = str(tmp_path / "cache")
    settings = dict(method="asft", ref_cache_dir=cache, ref_cache_topk=4)
    ref, counter = counted_reference(make_model, seed=1)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref, **settings)
    assert counter.calls > 0 and trainer._epoch_cache is None
    assert isinstance(trainer.reference, precompute.CachedColumns) and trainer.reference.topk == 4
    counter.calls = 0
    trainer.train()
    assert counter.calls == 0 and len(logged(trainer, "loss/kl_anchor")) == 2
    meta = ref_cache._read_meta(trainer.ref_cache_entries[0].path)
    assert meta["components"]["distribution"] == {"topk": 4, "tail": "policy"}
    assert meta["columns"]["ref_topk_ids"]["dtype"] == "int32"
    # The same k is reused without a reference forward; another k is another entry
    again, counter_again = counted_reference(make_model, seed=1)
    assert make_trainer(make_model, tokenizer, datasets_, make_args, again, **settings).ref_cache_entries[0].reused
    assert counter_again.calls == 0
    other, _ = counted_reference(make_model, seed=1)
    entry = make_trainer(
        make_model, tokenizer, datasets_, make_args, other, **{**settings, "ref_cache_topk": 16}
    ).ref_cache_entries[0]
    assert not entry.reused and any(d.startswith("distribution.topk 4 → 16") for d in entry.differences)


def test_a_batch_without_the_topk_columns_is_named(make_model, tokenizer, datasets_, make_args, tmp_path):
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), method="asft",
        ref_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(2))))
    assert batch["ref_topk_ids"].shape == (*batch["input_ids"].shape, 64)
    inputs = {k: v for k, v in batch.items() if k not in trainer._token_columns}
    with pytest.raises(ValueError, match=r"no column \['ref_topk_ids', 'ref_topk_logps'\]"):
        trainer.reference.statistics(trainer.model, inputs, (), {}, {"ref_logps": batch["ref_logps"]}, True)
