"""Every kind of reference: separate model (instance, path), adapter off, starting adapter copy, callback, copy."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trl_priority import PrioritySFTTrainer
from trl_priority.references.sources import AdapterReference, CallbackReference, ModelReference


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_trainer(make_model, tokenizer, datasets_, make_args, method="prift_prob", **kwargs):
    args = make_args(priority=method, **kwargs.pop("args", {}))
    model = kwargs.pop("model", None) or make_model()
    return PrioritySFTTrainer(
        model=model, args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer, **kwargs
    )


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_separate_model_instance_is_frozen_and_unchanged(label_logps, make_model, tokenizer, datasets_, make_args):
    ref = make_model(seed=1)
    independent = copy.deepcopy(ref)
    expected_weights = state(ref)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=ref)
    assert isinstance(trainer.reference, ModelReference)

    batch = first_batch(trainer)
    phi = trainer.token_priorities(batch)
    torch.testing.assert_close(phi, label_logps(independent, batch).exp() * (batch["labels"][:, 1:] != -100))

    trainer.train()
    ref_after = trainer.reference.model
    assert not any(p.requires_grad for p in ref_after.parameters())
    assert all(torch.equal(v, expected_weights[k]) for k, v in state(ref_after).items())


def test_reference_from_a_path(label_logps, model_dir, make_model, tokenizer, datasets_, make_args):
    path = model_dir(seed=1)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, args={"ref_model_name_or_path": path})
    assert isinstance(trainer.reference, ModelReference) and path in trainer.reference.description
    batch = first_batch(trainer)
    expected = label_logps(make_model(seed=1), batch).exp() * (batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(trainer.token_priorities(batch), expected)
    # The same path given as `ref_model=`
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=path)
    torch.testing.assert_close(trainer.token_priorities(batch), expected)


def test_reference_with_another_vocabulary_is_an_error(model_dir, make_model, tokenizer, datasets_, make_args):
    path = model_dir(seed=1, vocab_size=len(tokenizer) + 16, with_tokenizer=False)
    with pytest.raises(ValueError, match="vocabulary has 336 entries but the policy's has 320"):
        make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=path)
    with pytest.raises(ValueError, match="vocabulary"):
        make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=make_model(seed=1, vocab_size=300))


def test_reference_with_another_tokenizer_of_the_same_size_is_an_error(
    tmp_path, make_model, tokenizer, datasets_, make_args
):
    # A tokenizer of the same size trained on other text maps tokens to other ids
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ["zebras quietly jog over lazy foxes"] * 50 + ["numbers like 123 and 456 and 789"] * 50,
        trainers.BpeTrainer(
            vocab_size=len(tokenizer),
            special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>")
    path = tmp_path / "other-tokenizer"
    make_model(seed=1, vocab_size=len(tokenizer)).save_pretrained(path)
    other.save_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer maps tokens to other ids"):
        make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=str(path))


def test_lora_reference_is_the_base_with_the_adapter_off(label_logps, make_model, tokenizer, datasets_, make_args):
    base = make_model()
    base_weights = state(base)
    trainer = make_trainer(
        make_model,
        tokenizer,
        datasets_,
        make_args,
        model=base,
        peft_config=LoraConfig(**LORA, init_lora_weights=False),  # non-zero adapter: policy ≠ base from step 0
        args={"max_steps": 3},
    )
    assert isinstance(trainer.reference, AdapterReference) and trainer.reference.adapter_name is None
    batch = first_batch(trainer)
    phi = trainer.token_priorities(batch)
    expected = label_logps(make_model(), batch).exp() * (batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(phi, expected)
    # ... and not the policy with its adapter on
    with torch.no_grad():
        policy_phi = label_logps(trainer.model, batch).exp() * (batch["labels"][:, 1:] != -100)
    assert not torch.allclose(phi, policy_phi)

    trainer.train()
    base_after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state(trainer.model).items()
    }
    assert all(torch.equal(base_after[k], v) for k, v in base_weights.items())  # the base never moves
    trainer.model.train()  # the reference forward switches to eval mode and back
    trainer.token_priorities(batch)
    assert trainer.model.training


def test_starting_adapter_reference_is_a_frozen_copy_not_the_bare_base(
    label_logps, tmp_path, make_model, tokenizer, datasets_, make_args
):
    policy = get_peft_model(make_model(), LoraConfig(**LORA, init_lora_weights=False))  # an already-trained adapter
    starting = copy.deepcopy(policy)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, model=policy, args={"max_steps": 3})
    assert isinstance(trainer.reference, AdapterReference) and trainer.reference.adapter_name == "ref"

    batch = first_batch(trainer)
    phi = trainer.token_priorities(batch)
    mask = batch["labels"][:, 1:] != -100
    # At the start the reference is the policy itself, not the base model
    torch.testing.assert_close(phi, label_logps(starting, batch).exp() * mask)
    assert not torch.allclose(phi, label_logps(make_model(), batch).exp() * mask)

    ref_before = {k: v.clone() for k, v in trainer.model.named_parameters() if ".ref." in k}
    default_before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if ".default." in k}
    assert ref_before and not any(p.requires_grad for k, p in trainer.model.named_parameters() if ".ref." in k)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in ref_before.items())
    assert any(not torch.equal(params[k], v) for k, v in default_before.items())  # the trained adapter moved
    torch.testing.assert_close(trainer.token_priorities(batch), phi)  # so the reference did not

    # The saved result is the trained adapter alone, without the frozen copy
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "saved" / "ref").exists()


def test_full_fine_tuning_reference_is_a_frozen_copy_of_the_start(make_model, tokenizer, datasets_, make_args):
    model = make_model()
    initial = state(model)
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, model=model, args={"max_steps": 3})
    assert isinstance(trainer.reference, ModelReference) and "starting model" in trainer.reference.description
    assert trainer.reference.model is not trainer.model
    trainer.train()
    assert any(not torch.equal(v, initial[k]) for k, v in state(trainer.model).items())
    assert all(torch.equal(v, initial[k]) for k, v in state(trainer.reference.model).items())


def test_full_fine_tuning_from_a_path_reloads_the_starting_model(
    label_logps, model_dir, tokenizer, datasets_, make_args, make_model
):
    path = model_dir(seed=3)
    trainer = PrioritySFTTrainer(
        model=path, args=make_args(priority="prift_prob"), train_dataset=datasets_.prompt_completion(4)
    )
    batch = first_batch(trainer)
    expected = label_logps(make_model(seed=3), batch).exp() * (batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(trainer.token_priorities(batch), expected)


def test_callback_reference(label_logps, make_model, tokenizer, datasets_, make_args):
    teacher = make_model(seed=2)
    calls = []

    def teacher_logps(batch):
        calls.append(sorted(batch))
        return label_logps(teacher, batch)

    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=teacher_logps)
    assert isinstance(trainer.reference, CallbackReference)
    batch = first_batch(trainer)
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(trainer.token_priorities(batch), label_logps(teacher, batch).exp() * mask)
    assert "input_ids" in calls[0] and "labels" in calls[0]
    trainer.train()

    # A dict with a prefixed key also works, for methods needing several statistics
    def dict_callback(batch):
        return {"ref_logps": label_logps(teacher, batch)}

    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=dict_callback)
    torch.testing.assert_close(trainer.token_priorities(batch), label_logps(teacher, batch).exp() * mask)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda batch: torch.zeros(batch["input_ids"].shape), r"shape .* expected"),
        (lambda batch: torch.full(batch["labels"][:, 1:].shape, float("nan")), "non-finite"),
        (lambda batch: [0.0], "return a tensor"),
    ],
)
def test_callback_reference_output_is_checked(bad, message, make_model, tokenizer, datasets_, make_args):
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, ref_model=bad)
    with pytest.raises((ValueError, TypeError), match=message):
        trainer.train()


def test_callback_missing_a_statistic_the_method_needs(make_model, tokenizer, datasets_, make_args):
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, method="prift_mass", ref_model=lambda batch: {"logps": None}
    )
    with pytest.raises(ValueError, match=r"also needs \['mass'\]"):
        trainer.train()


def test_rho1_without_an_explicit_reference_is_an_error(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="Pass `ref_model=`.*recipes/rho1.yaml"):
        make_trainer(make_model, tokenizer, datasets_, make_args, method="rho1")
    with pytest.raises(ValueError, match="Pass `ref_model=`"):
        make_trainer(make_model, tokenizer, datasets_, make_args, method="rho1", peft_config=LoraConfig(**LORA))


def test_reference_cannot_be_the_policy_object(make_model, tokenizer, datasets_, make_args):
    model = make_model()
    with pytest.raises(ValueError, match="same object"):
        make_trainer(make_model, tokenizer, datasets_, make_args, model=model, ref_model=model)


def test_methods_without_reference_build_none(make_model, tokenizer, datasets_, make_args):
    with pytest.warns(UserWarning, match="ignored"):
        trainer = make_trainer(make_model, tokenizer, datasets_, make_args, method="dft", ref_model=make_model(1))
    assert trainer.reference is None


def test_prift_mass_reads_the_reference_full_distribution(make_model, tokenizer, datasets_, make_args):
    ref = make_model(seed=1)
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, method="prift_mass", ref_model=copy.deepcopy(ref)
    )
    batch = first_batch(trainer)
    with torch.no_grad():
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    probs = logits.float().softmax(-1)  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    target = probs.gather(-1, labels.clamp(min=0)[..., None])  # (B, T-1, 1)
    mass = (probs * (probs < target)).sum(-1) + target.squeeze(-1)
    expected = ((mass >= 0.5) & (labels != -100)).float()
    torch.testing.assert_close(trainer.token_priorities(batch), expected)


def test_reference_from_a_path_attends_like_the_policy(model_dir, make_model, tokenizer, datasets_, make_args):
    path = model_dir(seed=1)
    policy = make_model()
    policy.config._attn_implementation = "eager"  # not the loader's default (sdpa)
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, model=policy, args={"ref_model_name_or_path": path}
    )
    assert trainer.reference.model.config._attn_implementation == "eager"


def tokenized_with_reference_columns(tokenizer, reference, datasets_):
    """Pre-tokenized rows with a `ref_logps` column: log p_ref(x_i | x_<i) at every i ≥ 1 (0 at i = 0)."""
    from datasets import Dataset

    rows = []
    for example in datasets_.prompt_completion(4):
        prompt = tokenizer(example["prompt"])["input_ids"]
        completion = tokenizer(example["completion"])["input_ids"] + [tokenizer.eos_token_id]
        input_ids = prompt + completion
        with torch.no_grad():
            logprobs = reference(input_ids=torch.tensor([input_ids])).logits[0].log_softmax(-1)  # (T, V)
        ref_logps = [0.0] + [logprobs[i - 1, input_ids[i]].item() for i in range(1, len(input_ids))]
        rows.append(
            {
                "input_ids": input_ids,
                "completion_mask": [0] * len(prompt) + [1] * len(completion),
                "ref_logps": ref_logps,
            }
        )
    return Dataset.from_list(rows)


@pytest.mark.parametrize("packing", [False, True])
def test_precomputed_reference_columns_give_the_online_reference(packing, make_model, tokenizer, datasets_, make_args):
    dataset = tokenized_with_reference_columns(tokenizer, make_model(seed=1), datasets_)
    settings = {"packing": packing, "max_length": 256 if packing else 64}
    online = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="prift_prob", **settings), train_dataset=dataset,
        processing_class=tokenizer, ref_model=make_model(seed=1),
    )  # fmt: skip
    cached = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="prift_prob", precomputed_ref_columns=True, **settings),
        train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    assert cached.reference.description == "precomputed dataset columns"
    batch = cached.data_collator(list(cached.train_dataset))
    online_batch = {k: v for k, v in batch.items() if k != "ref_logps"}
    torch.testing.assert_close(
        cached.token_priorities(batch), online.token_priorities(online_batch), atol=1e-5, rtol=1e-4
    )
    cached.train()


def test_precomputed_reference_columns_missing_is_named(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="reads the column 'ref_logps'.*precomputed_ref_columns=True"):
        make_trainer(make_model, tokenizer, datasets_, make_args, args={"precomputed_ref_columns": True})
