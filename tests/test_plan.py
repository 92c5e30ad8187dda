"""The run plan (`trl_priority.plan.RunPlan`): what a run reads and from where, decided once from the method, its
hyperparameters and the configuration; and the reference's identity (the cache key's `reference` component), which
must stay what it was before the plan existed, so that existing cache entries keep being found."""

from __future__ import annotations

import os

import pytest
import torch

from trl_priority import PrioritySFTTrainer, get_priority
from trl_priority.plan import CACHE_COLUMN_HINT, REFERENCE_KINDS, RunPlan
from trl_priority.references.disk_cache import TOPK_COLUMNS, default_cache_dir
from trl_priority.references.identity import module_fingerprint
from trl_priority.statistics import DATA_STATISTICS


EXAMPLE, POSITION = DATA_STATISTICS["example_index"], DATA_STATISTICS["token_position"]


def plan_of(make_args, method=None, priority_args=None, model="org/policy", ref_model=None, peft_config=None, **args):
    args = make_args(priority=method, priority_args=priority_args or {}, **args)
    priority = None if method is None else get_priority(method)
    resolved = {} if priority is None else priority.resolve_args(args.priority_args)
    return RunPlan.build(args, priority, resolved, model=model, ref_model=ref_model, peft_config=peft_config)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


# ------------------------------------------------------------------------------------------------------------------
# Representative methods: every field against what it should be
# ------------------------------------------------------------------------------------------------------------------
def test_no_priority_plans_nothing(make_args):
    plan = plan_of(make_args, None)
    assert plan == RunPlan(completion_only_loss=None)
    assert plan.token_columns == () and plan.reference_kind == "none" and plan.cache == "none"


def test_dft_reads_the_policy_alone(make_args):
    plan = plan_of(make_args, "dft")
    assert plan == RunPlan(priority="dft", policy_statistics=("logps",), completion_only_loss=None)


def test_rho1_with_a_reference_path_and_the_epoch_cache(make_args):
    plan = plan_of(make_args, "rho1", ref_model_name_or_path="/models/ref")
    assert plan.priority == "rho1" and plan.uses_reference and not plan.needs_reference_distribution
    assert plan.policy_statistics == ("logps",) and plan.reference_statistics == ("logps",)
    assert plan.trainer_statistics == ("selected",) and plan.data_statistics == ()
    assert plan.selection_scope == "step" and not plan.stateful and plan.granularity == "token"
    assert (plan.reference_kind, plan.reference_path) == ("model_path", "/models/ref")
    # max_steps > 0: possibly several epochs, so the tokens get an identity for the epoch cache
    assert plan.epoch_columns == ("example_index", "token_position")
    assert plan.identity_columns == ("example_index", "token_position")
    assert plan.column_specs == {"example_index": EXAMPLE, "token_position": POSITION}
    assert (plan.cache, plan.cache_dir, plan.epoch_cache) == ("epoch", None, "memory")
    assert plan.cached_statistics == ("logps",) and plan.cache_topk is None and plan.cache_columns == {}
    assert not plan.mask_prompt_labels and plan.completion_only_loss is None


def test_rho1_ref_model_argument_wins_over_the_config_path(make_args):
    plan = plan_of(make_args, "rho1", ref_model="/models/given", ref_model_name_or_path="/models/ref")
    assert (plan.reference_kind, plan.reference_path) == ("model_path", "/models/given")
    plan = plan_of(make_args, "rho1", ref_model=torch.nn.Linear(1, 1))
    assert (plan.reference_kind, plan.reference_path) == ("model", None)


def test_one_epoch_keeps_no_epoch_cache(make_args):
    plan = plan_of(make_args, "prift_prob", max_steps=-1, num_train_epochs=1)
    assert plan.column_specs == {} and plan.epoch_columns == () and (plan.cache, plan.epoch_cache) == ("none", "none")
    assert (plan.reference_kind, plan.reference_path) == ("starting_model", "org/policy")


def test_prift_prob_under_lora_reads_the_base_with_the_adapter_off(make_args):
    plan = plan_of(make_args, "prift_prob", peft_config=lora(), ref_epoch_cache="disk")
    assert (plan.reference_kind, plan.reference_path) == ("adapter_off", "org/policy")
    assert plan.reference_statistics == ("logps",) and plan.policy_statistics == ()
    assert (plan.cache, plan.epoch_cache) == ("epoch", "disk")


def test_full_fine_tuning_from_a_module_copies_the_starting_model(make_args, make_model):
    plan = plan_of(make_args, "prift_prob", model=make_model(), ref_epoch_cache="none")
    assert (plan.reference_kind, plan.reference_path) == ("starting_model", None)
    assert (plan.cache, plan.epoch_cache) == ("none", "none")
    assert plan.epoch_columns == () and plan.column_specs == {}  # `ref_epoch_cache="none"`: no identity for it


def test_a_trained_adapter_is_the_starting_adapter(make_args, make_model):
    from peft import get_peft_model

    plan = plan_of(make_args, "prift_prob", model=get_peft_model(make_model(), lora()))
    assert (plan.reference_kind, plan.reference_path) == ("starting_adapter", None)


def test_a_callback_reference(make_args):
    def teacher(batch):
        return None

    plan = plan_of(make_args, "prift_prob", ref_model=teacher)
    assert (plan.reference_kind, plan.reference_path) == ("callback", None)
    assert plan.cache == "epoch"


def test_precomputed_columns_travel_with_the_tokens(make_args):
    plan = plan_of(make_args, "prift_prob", precomputed_ref_columns=True)
    assert plan.reference_kind == "columns" and (plan.cache, plan.epoch_cache) == ("none", "none")
    assert list(plan.column_specs) == ["ref_logps"] and plan.epoch_columns == ()
    spec = plan.column_specs["ref_logps"]
    assert (spec.column, spec.level, spec.padding, spec.generated) == ("ref_logps", "token", 0.0, False)
    assert "precomputed_ref_columns=True" in spec.hint


def test_a_disk_cache_attaches_its_columns_after_preparation(make_args, tmp_path):
    plan = plan_of(make_args, "prift_prob", ref_cache_dir=str(tmp_path / "cache"))
    assert (plan.cache, plan.cache_dir, plan.epoch_cache) == ("disk", str(tmp_path / "cache"), "none")
    assert plan.column_specs == {} and plan.epoch_columns == ()
    assert list(plan.cache_columns) == ["ref_logps"] and plan.cache_columns["ref_logps"].hint == CACHE_COLUMN_HINT
    assert plan.token_columns == ("ref_logps",) and plan.column_padding == {"ref_logps": 0.0}
    assert plan_of(make_args, "prift_prob", ref_cache_dir="auto").cache_dir == default_cache_dir()


def test_a_distribution_method_caches_its_top_k(make_args, tmp_path):
    plan = plan_of(make_args, "asft", ref_cache_dir=str(tmp_path), ref_cache_topk=8)
    assert plan.needs_reference_distribution and plan.uses_reference and plan.reference_statistics == ()
    assert plan.cached_statistics == ("logps",) and plan.cache_topk == 8
    assert list(plan.cache_columns) == ["ref_logps", *TOPK_COLUMNS]
    # online: the distribution is projected in the policy's pass, so no epoch cache and no identity for it
    online = plan_of(make_args, "asft")
    assert online.column_specs == {} and online.cache == "none" and online.reference_kind == "starting_model"


def test_with_disk_cache_switches_a_built_plan_to_columns(make_args):
    plan = plan_of(make_args, "prift_prob")
    cached = plan.with_disk_cache("/tmp/cache")
    assert (cached.cache, cached.cache_dir, cached.epoch_cache) == ("disk", "/tmp/cache", "none")
    assert cached.column_specs == plan.column_specs  # the identity columns stay with the prepared rows
    assert cached.token_columns == ("example_index", "token_position", "ref_logps")
    assert (plan.cache, plan.cache_columns) == ("epoch", {})  # frozen: the original is unchanged


def test_a_data_statistic_method(make_args):
    plan = plan_of(make_args, "weighted")
    assert plan.data_statistics == ("data_weight",) and plan.reference_kind == "none" and not plan.uses_reference
    assert plan.column_specs == {"data_weight": DATA_STATISTICS["data_weight"]} and plan.cache == "none"


def test_wit_trains_the_prompt(make_args):
    plan = plan_of(make_args, "wit", completion_only_loss=None)
    assert plan.data_statistics == ("response_mask",) and plan.column_specs == {
        "completion_mask": DATA_STATISTICS["response_mask"]
    }
    assert plan.completion_only_loss is False and not plan.mask_prompt_labels


def test_a_stateful_method_keys_its_history_by_token(make_args):
    plan = plan_of(make_args, "t3s")
    assert plan.stateful and plan.trainer_statistics == ("state",) and plan.policy_statistics == ("logps",)
    assert plan.identity_columns == ("example_index", "token_position") and plan.epoch_columns == ()
    assert plan.column_specs == {"example_index": EXAMPLE, "token_position": POSITION}
    assert plan.reference_kind == "none" and plan.cache == "none"


def test_an_example_scope_selection_and_a_word_granularity(make_args):
    plan = plan_of(make_args, "sstoken")
    assert plan.selection_scope == "example" and plan.reference_kind == "starting_model"
    assert plan.identity_columns == ("example_index", "token_position")  # example_index once, then the epoch cache's
    assert plan.epoch_columns == ("token_position",) and plan.cache == "epoch"
    plan = plan_of(make_args, "dft", priority_granularity="word")
    assert plan.granularity == "word" and plan.identity_columns == ("example_index", "word_index")
    assert list(plan.column_specs) == ["example_index", "word_index"]


def test_every_reference_kind_is_documented(make_args):
    assert set(REFERENCE_KINDS) == {
        "none", "columns", "callback", "model_path", "model", "adapter_off", "starting_adapter", "starting_model"
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# The trainer reads the plan
# ------------------------------------------------------------------------------------------------------------------
def test_the_trainer_builds_its_plan_once_and_its_reference_from_it(make_model, tokenizer, datasets_, make_args):
    trainer = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="prift_prob"), train_dataset=datasets_.prompt_completion(4),
        processing_class=tokenizer, peft_config=lora(),
    )  # fmt: skip
    assert trainer.plan.reference_kind == "adapter_off" == trainer.reference.kind
    assert trainer.plan.cache == "epoch" and trainer._epoch_cache.reference is trainer.reference
    assert trainer._token_columns == ("example_index", "token_position")
    assert {"example_index", "token_position"} <= set(trainer.train_dataset.column_names)


# ------------------------------------------------------------------------------------------------------------------
# The reference's identity is what it was: the expected dicts are written from the code before the plan
# (`ref_cache.reference_identity`, which walked `_build_reference`'s decision tree a second time)
# ------------------------------------------------------------------------------------------------------------------
def _files(path: str) -> dict[str, list[int]]:
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")):
            files[name] = [os.stat(full).st_size, os.stat(full).st_mtime_ns]
    return files


def _trainer(make_model, tokenizer, datasets_, make_args, model=None, **kwargs):
    args = make_args(priority="prift_prob", **kwargs.pop("args", {}))
    return PrioritySFTTrainer(
        model=make_model() if model is None else model, args=args, train_dataset=datasets_.prompt_completion(4),
        processing_class=tokenizer, **kwargs,
    )  # fmt: skip


FLOAT32_SDPA = {"dtype": "float32", "attn_implementation": "sdpa"}


def test_identity_of_a_reference_path_is_unchanged(model_dir, make_model, tokenizer, datasets_, make_args):
    path = model_dir(seed=1)
    init_kwargs = {"dtype": "float32"}
    trainer = _trainer(
        make_model, tokenizer, datasets_, make_args,
        args={"ref_model_name_or_path": path, "ref_model_init_kwargs": init_kwargs},
    )  # fmt: skip
    loaded_as = {"dtype": "float32", "attn_implementation": trainer.model.config._attn_implementation}
    assert trainer._reference_identity() == {
        "kind": "model",
        "path": os.path.realpath(path),
        "files": _files(path),
        "init_kwargs": {"dtype": "float32"},
        "quantization": None,
        "loaded_as": loaded_as,
    }


def test_identity_of_a_model_object_is_unchanged(make_model, tokenizer, datasets_, make_args):
    ref = make_model(seed=1)
    trainer = _trainer(make_model, tokenizer, datasets_, make_args, ref_model=ref)
    assert trainer._reference_identity() == {
        "kind": "model",
        "parameters": module_fingerprint(ref),  # the model object as given (and placed: the same object here)
        "loaded_as": {"dtype": "float32", "attn_implementation": ref.config._attn_implementation},
    }


def test_identity_of_the_lora_base_from_a_path_is_unchanged(model_dir, tokenizer, datasets_, make_args):
    path = model_dir(seed=0)
    trainer = _trainer(None, tokenizer, datasets_, make_args, model=path, peft_config=lora())
    assert trainer.plan.reference_kind == "adapter_off"
    assert trainer._reference_identity() == {
        "kind": "adapter_off",
        "path": os.path.realpath(path),
        "files": _files(path),
        "init_kwargs": {},
        "quantization": None,
        "loaded_as": {"dtype": "float32", "attn_implementation": trainer.model.config._attn_implementation},
    }


def test_identity_of_the_lora_base_in_memory_and_of_a_starting_copy_is_unchanged(
    make_model, tokenizer, datasets_, make_args
):
    trainer = _trainer(make_model, tokenizer, datasets_, make_args, peft_config=lora())
    policy = trainer.model
    assert trainer._reference_identity() == {
        "kind": "adapter_off",
        "parameters": module_fingerprint(policy, skip=lambda name: ".default." in name),
        "loaded_as": {"dtype": "float32", "attn_implementation": policy.config._attn_implementation},
    }
    model = make_model(seed=2)
    trainer = _trainer(make_model, tokenizer, datasets_, make_args, model=model)
    assert trainer.plan.reference_kind == "starting_model"
    starting = trainer.reference.model  # the frozen copy made before training (one process: placed in place)
    assert starting is not trainer.model
    assert trainer._reference_identity() == {
        "kind": "starting_model",
        "parameters": module_fingerprint(starting),
        "loaded_as": {"dtype": "float32", "attn_implementation": model.config._attn_implementation},
    }


def test_identity_of_the_starting_model_from_a_path_is_unchanged(model_dir, tokenizer, datasets_, make_args):
    path = model_dir(seed=0)
    trainer = _trainer(
        None, tokenizer, datasets_, make_args, model=path, args={"model_init_kwargs": {"dtype": "float32"}}
    )
    assert trainer._reference_identity() == {
        "kind": "starting_model",
        "path": os.path.realpath(path),
        "files": _files(path),
        "init_kwargs": {"dtype": "float32"},
        "quantization": None,
        "loaded_as": {"dtype": "float32", "attn_implementation": trainer.model.config._attn_implementation},
    }


def teacher_for_identity(batch):
    return batch["labels"][:, 1:].float() * 0


teacher_for_identity.cache_identity = {"teacher": "v1", "k": 3}


def test_identity_of_a_callback_and_of_columns_is_unchanged(make_model, tokenizer, datasets_, make_args):
    trainer = _trainer(make_model, tokenizer, datasets_, make_args, ref_model=teacher_for_identity)
    assert trainer._reference_identity() == {
        "kind": "callback",
        "name": f"{__name__}.teacher_for_identity",
        "cache_identity": {"k": 3, "teacher": "v1"},
    }
    assert trainer._epoch_cache is not None and trainer._epoch_cache.identity() == trainer._reference_identity()


def test_identity_of_precomputed_columns_is_unchanged(make_args):
    from trl_priority.references.choice import Given, reference_for

    plan = plan_of(make_args, "prift_prob", precomputed_ref_columns=True)
    source = reference_for(plan, Given(), torch.nn.Linear(1, 1), make_args(), load=None)
    assert source.identity() == {"kind": "columns"}


def test_a_dataset_prepared_after_the_cache_is_installed_names_the_cached_column(
    make_model, tokenizer, datasets_, make_args, tmp_path
):
    trainer = _trainer(make_model, tokenizer, datasets_, make_args, args={"ref_cache_dir": str(tmp_path / "cache")})
    assert trainer.plan.cache == "disk" and trainer._token_columns == ("ref_logps",)
    with pytest.raises(ValueError, match="reads the column 'ref_logps'.*the reference cache attached it"):
        trainer._prepare_dataset(datasets_.prompt_completion(2), tokenizer, trainer.args, False, None, "fresh")
