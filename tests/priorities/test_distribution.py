"""ASFT and Target-SFT: the trainer's chunked loss and gradients against full-logits oracles written from the
equations, the Q-target's special cases against the losses they reduce to, and the soft-target term against a naive
loop over positions and vocabulary entries."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from trl_priority import PriorityError, PrioritySFTConfig, PrioritySFTTrainer
from trl_priority import statistics as stats
from trl_priority.priorities.distribution import kl_to_reference, soft_target_cross_entropy
from trl_priority.statistics import lm_head


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def make_trainer(make_model, tokenizer, datasets_, make_args, method, priority_args=None, model=None, **kwargs):
    overrides = dict(per_device_train_batch_size=4, max_steps=1) | kwargs.pop("args", {})
    args = make_args(priority=method, priority_args=priority_args, **overrides)
    return PrioritySFTTrainer(
        model=model or make_model(),
        args=args,
        train_dataset=datasets_.prompt_completion(4),
        processing_class=tokenizer,
        **kwargs,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def trainer_loss_and_grads(trainer, batch):
    """One `compute_loss` + backward, as a training step does: the loss and every trainable parameter's gradient."""
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def oracle_grads(model, loss):
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {name: g for (name, _), g in zip(named, grads)}


def full_logprobs(model, batch, grad: bool = True):
    """log π(· | y_<t) from the model's full `(B, T, V)` logits, shifted so position t scores labels[:, t + 1]."""
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)


def shifted_labels(batch):
    labels = batch["labels"][:, 1:]  # (B, T-1)
    return labels.clamp(min=0), labels != -100


def assert_grads_close(got, expected, rtol=1e-4, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------------------------------------------------
# ASFT
# ------------------------------------------------------------------------------------------------------------------
def asft_oracle(logprobs, ref_logprobs, batch, kl_weight):
    """mean_t [ sg(p(y_t))·(−log p(y_t)) + kl_weight·KL(π_ref ‖ π_θ) ], written from the official train_v2.py."""
    labels, mask = shifted_labels(batch)
    nll = -logprobs.gather(-1, labels[..., None]).squeeze(-1)  # (B, T-1)
    weight = torch.exp(-nll).detach()
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)  # (B, T-1)
    return ((weight * nll + kl_weight * kl) * mask).sum() / mask.sum(), (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("lora", [False, True])
def test_asft_loss_and_gradients_match_a_full_logits_oracle(lora, make_model, tokenizer, datasets_, make_args):
    if lora:  # the reference is the base with the adapter off; a non-zero adapter makes the KL non-zero at once
        kwargs = {"peft_config": LoraConfig(**LORA, init_lora_weights=False)}
    else:  # a separate reference: the KL to a frozen copy of the start is 0 at step 0 (tested below)
        kwargs = {"ref_model": make_model(seed=1)}
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "asft", {"kl_weight": 0.3}, **kwargs)
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)

    model = trainer.model
    if lora:
        with torch.no_grad(), model.disable_adapter():
            ref_logprobs = full_logprobs(model, batch, grad=False)
    else:
        ref_logprobs = full_logprobs(make_model(seed=1), batch, grad=False)
    expected, kl = asft_oracle(full_logprobs(model, batch), ref_logprobs, batch, kl_weight=0.3)
    assert kl.item() > 1e-3  # the anchor is active
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, oracle_grads(model, expected))
    assert trainer._metrics["train"]["loss/kl_anchor"][-1] == pytest.approx(0.3 * kl.item(), rel=1e-4)


def test_asft_full_fine_tuning_anchors_to_a_frozen_copy_of_the_start(make_model, tokenizer, datasets_, make_args):
    # A large step, so that the policy is far enough from the start for the KL to tell forward from reverse
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "asft", args={"learning_rate": 0.05})
    assert "frozen copy of the starting model" in trainer.reference.description
    batch = first_batch(trainer)
    trainer.train()  # one step: the policy moves away from the start, the reference stays
    loss, grads = trainer_loss_and_grads(trainer, batch)

    ref_logprobs = full_logprobs(make_model(seed=0), batch, grad=False)
    expected, kl = asft_oracle(full_logprobs(trainer.model, batch), ref_logprobs, batch, kl_weight=0.1)
    assert kl.item() > 0
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, oracle_grads(trainer.model, expected))


def test_kl_to_reference_by_hand():
    # q = (0.5, 0.5, 0), p = (0.25, 0.25, 0.5): KL = 2 · 0.5 · log(0.5 / 0.25) = log 2; a zero of q counts 0
    q = torch.tensor([[0.5, 0.5, 0.0]]).log()
    p = torch.tensor([[0.25, 0.25, 0.5]]).log()
    torch.testing.assert_close(kl_to_reference(p, torch.tensor([0]), q), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_to_reference(p, torch.tensor([0]), p), torch.tensor([0.0]))


def test_asft_kl_term_in_bf16_matches_float32(make_model, tokenizer, datasets_, make_args):
    """bf16 weights: the chunked projection accumulates in float32, so the KL is the float32 KL of the same bf16
    weights up to the bf16 rounding of the activations."""
    policy, reference = make_model(), make_model(seed=1)
    with torch.no_grad():  # peaked distributions, logits of magnitude ~10: where bf16 logits would lose digits
        policy.lm_head.weight.mul_(30)
        reference.lm_head.weight.mul_(30)
    policy, reference = policy.to(torch.bfloat16), reference.to(torch.bfloat16)
    policy32, reference32 = copy.deepcopy(policy).float(), copy.deepcopy(reference).float()
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, "asft", model=policy, ref_model=copy.deepcopy(reference)
    )
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    got = trainer._metrics["train"]["loss/kl_anchor"][-1] / 0.1

    with torch.no_grad():
        _, expected = asft_oracle(full_logprobs(policy32, batch), full_logprobs(reference32, batch), batch, 0.1)
    assert expected.item() > 0.01
    assert trainer.model.dtype == torch.bfloat16
    assert got == pytest.approx(expected.item(), rel=2e-3)  # measured: 2.4e-4 (bf16 logits would give 8.7e-4)


# ------------------------------------------------------------------------------------------------------------------
# Target-SFT through the trainer: the special cases of the Q-target
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", ["uniform", "reference", "policy", "guided"])
def test_target_sft_with_full_trust_is_plain_sft(prior, make_model, tokenizer, datasets_, make_args):
    args = {"alpha": "constant", "alpha_value": 1.0, "prior": prior}
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "target_sft", args)
    sft = make_trainer(make_model, tokenizer, datasets_, make_args, "sft")
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)
    expected_loss, expected_grads = trainer_loss_and_grads(sft, batch)

    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads, expected_grads, rtol=1e-5, atol=1e-7)


def test_target_sft_constant_trust_with_uniform_prior_is_label_smoothing(make_model, tokenizer, datasets_, make_args):
    epsilon = 0.2
    args = {"alpha": "constant", "alpha_value": 1 - epsilon, "prior": "uniform"}
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "target_sft", args)
    assert trainer.reference is None  # nothing here reads a reference
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)

    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=epsilon, ignore_index=-100)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, oracle_grads(trainer.model, expected))


def test_target_sft_without_trust_and_reference_prior_is_self_distillation(
    make_model, tokenizer, datasets_, make_args
):
    args = {"alpha": "constant", "alpha_value": 0.0, "prior": "reference"}
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "target_sft", args, ref_model=make_model(1))
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)

    _, mask = shifted_labels(batch)
    logprobs = full_logprobs(trainer.model, batch)
    ref_logprobs = full_logprobs(make_model(seed=1), batch, grad=False)
    cross_entropy = -(ref_logprobs.exp() * logprobs).sum(-1)  # H(π_ref, π_θ), (B, T-1)
    kl = F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="none").sum(-1)  # KL(π_ref ‖ π_θ)
    torch.testing.assert_close(loss, (cross_entropy * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, oracle_grads(trainer.model, (kl * mask).sum() / mask.sum()))


def test_target_sft_policy_trust_and_policy_prior_has_the_dft_gradient(make_model, tokenizer, datasets_, make_args):
    args = {"alpha": "policy", "prior": "policy"}
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "target_sft", args)
    assert trainer.reference is None
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)

    labels, mask = shifted_labels(batch)
    logprobs = full_logprobs(trainer.model, batch)
    nll = -logprobs.gather(-1, labels[..., None]).squeeze(-1)  # (B, T-1)
    p = torch.exp(-nll).detach()
    dft = (p * nll * mask).sum() / mask.sum()
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    torch.testing.assert_close(loss, dft.detach() + ((1 - p) * entropy * mask).sum() / mask.sum())
    assert_grads_close(grads, oracle_grads(trainer.model, dft))


def dense_q_target(logprobs, ref_logprobs, labels, alpha, alpha_value, prior, eta, top_k):
    """Q_t as a dense (B, T-1, V) distribution, built from the definition (no gradient)."""
    p, q = logprobs.detach().exp(), ref_logprobs.exp()
    vocab = p.size(-1)
    onehot = F.one_hot(labels, vocab).float()
    trust = {
        "constant": torch.full(labels.shape, alpha_value),
        "policy": (p * onehot).sum(-1),
        "reference": (q * onehot).sum(-1),
    }[alpha]
    prior_dist = {
        "uniform": torch.full_like(p, 1 / vocab),
        "policy": p,
        "reference": q,
        "guided": p ** (1 - eta) * q**eta,
    }[prior]
    prior_dist = prior_dist / prior_dist.sum(-1, keepdim=True)
    if top_k:
        kth = prior_dist.sort(-1, descending=True).values[..., top_k - 1 : top_k]  # the k-th largest entry
        prior_dist = torch.where(prior_dist >= kth, prior_dist, 0.0)
        prior_dist = prior_dist / prior_dist.sum(-1, keepdim=True)
    return trust[..., None] * onehot + (1 - trust[..., None]) * prior_dist


@pytest.mark.parametrize(
    "priority_args, lora",
    [
        ({}, True),  # the page's Target-SFT: alpha policy, guided prior, against the base with the adapter off
        ({}, False),
        ({"alpha": "reference", "prior": "reference", "top_k": 5}, False),
        ({"alpha": "constant", "alpha_value": 0.7, "prior": "guided", "eta": 0.3, "top_k": 7}, True),
    ],
    ids=["default-lora", "default", "reference-top5", "constant-guided-top7-lora"],
)
def test_target_sft_loss_and_gradients_match_the_q_target_cross_entropy(
    priority_args, lora, make_model, tokenizer, datasets_, make_args
):
    kwargs = {"peft_config": LoraConfig(**LORA, init_lora_weights=False)} if lora else {"ref_model": make_model(1)}
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, "target_sft", priority_args, **kwargs)
    resolved = trainer.priority_args
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)

    model = trainer.model
    if lora:
        with torch.no_grad(), model.disable_adapter():
            ref_logprobs = full_logprobs(model, batch, grad=False)
    else:
        ref_logprobs = full_logprobs(make_model(seed=1), batch, grad=False)
    logprobs = full_logprobs(model, batch)
    labels, mask = shifted_labels(batch)
    target = dense_q_target(logprobs, ref_logprobs, labels, **resolved)
    torch.testing.assert_close(target.sum(-1), torch.ones_like(mask, dtype=torch.float32))
    expected = (-(target * logprobs).sum(-1) * mask).sum() / mask.sum()  # mean_t H(Q_t, π_θ)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, oracle_grads(model, expected))


def test_target_sft_runs_a_reference_only_when_it_reads_one(make_model, tokenizer, datasets_, make_args):
    def reference_of(priority_args):
        return make_trainer(make_model, tokenizer, datasets_, make_args, "target_sft", priority_args).reference

    assert reference_of({"alpha": "policy", "prior": "uniform"}) is None
    assert reference_of({"alpha": "constant", "prior": "policy"}) is None
    assert reference_of({}) is not None  # guided
    assert reference_of({"alpha": "reference", "prior": "uniform"}) is not None


def test_target_sft_at_warmup_weight_zero_is_plain_sft(make_model, tokenizer, datasets_, make_args):
    """Warm-up weight 0 gives Φ = α = 1 on every token: Q_t = δ_{y_t}, the loss is the NLL alone. (The old term
    recomputed the raw α_t = p_t, so the loss was NLL + (1 − p_t)·H(A_t, π_θ): Q's mass 1 + (1 − p_t).)"""
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, "target_sft", {"prior": "policy"},
        args=dict(priority_warmup_ratio=0.5, max_steps=4),
    )  # fmt: skip
    batch = first_batch(trainer)
    assert trainer.progress == 0.0
    loss, grads = trainer_loss_and_grads(trainer, batch)

    labels, mask = shifted_labels(batch)
    logprobs = full_logprobs(trainer.model, batch)
    nll = -(logprobs.gather(-1, labels[..., None]).squeeze(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, nll.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, oracle_grads(trainer.model, nll))


def test_target_sft_term_reads_the_pooled_trust(make_model, tokenizer, datasets_, make_args):
    """With Φ pooled over words (max), the soft target uses the pooled α_t too: term = Σ_t (1 − Φ_t)·H_t / N with
    H_t the policy's entropy (prior "policy": A_t = sg(π_θ), H(A_t, π_θ) = H(π_θ))."""
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, "target_sft", {"prior": "policy"},
        args=dict(priority_granularity="word"),
    )  # fmt: skip
    batch = first_batch(trainer)
    phi = trainer.token_priorities(batch)  # (B, T-1): pooled
    loss, _ = trainer_loss_and_grads(trainer, batch)

    labels, mask = shifted_labels(batch)
    with torch.no_grad():
        logprobs = full_logprobs(trainer.model, batch, grad=False)
    p = logprobs.gather(-1, labels[..., None]).squeeze(-1).exp()  # (B, T-1)
    pooled = (phi != p) & mask
    assert pooled.any()  # some word's trust was raised to its best token's
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T-1)
    term = ((1 - phi) * entropy * mask).sum() / mask.sum()
    nll = (phi * -p.log() * mask).sum() / mask.sum()
    raw = ((1 - p) * entropy * mask).sum() / mask.sum()  # what a term recomputing α_t = p_t would give
    assert abs(raw - term).item() > 1e-4 * term.item()  # the tiny model's p_t are small: the difference is too
    assert trainer._metrics["train"]["loss/soft_target"][-1] == pytest.approx(term.item(), rel=1e-5)
    torch.testing.assert_close(loss, nll + term, rtol=1e-5, atol=1e-6)


def test_guided_prior_at_eta_0_or_1_ignores_the_other_side_minus_inf():
    """η = 1 is the reference alone, η = 0 the policy alone, even where the other side has log-probability −inf
    (where 0·(−inf) gave NaN)."""
    from trl_priority.priorities.distribution import _log_prior

    policy = torch.tensor([[0.0, float("-inf"), -1.0]]).log_softmax(-1)
    reference = torch.tensor([[-1.0, 0.0, float("-inf")]]).log_softmax(-1)
    at_one, _ = _log_prior(policy, reference, "guided", 1.0, 0)
    at_zero, _ = _log_prior(policy, reference, "guided", 0.0, 0)
    torch.testing.assert_close(at_one, reference)
    torch.testing.assert_close(at_zero, policy)
    between, _ = _log_prior(policy, reference, "guided", 0.5, 0)
    assert torch.isneginf(between[0, 1:]).all() and between[0, 0] == 0.0  # mass only where both have some

    # The term and the KL anchor: a prior or reference entry 0 against a policy entry −inf counts 0
    labels = torch.tensor([0])
    logprobs = policy.clone().requires_grad_()
    term = soft_target_cross_entropy(
        logprobs, labels, reference, torch.tensor([0.5]), prior="guided", eta=0.5, top_k=0
    )
    kl = kl_to_reference(logprobs, labels, torch.tensor([[0.0, float("-inf"), float("-inf")]]))
    assert torch.isfinite(term).all() and torch.isfinite(kl).all()
    assert term.item() == pytest.approx(0.5 * -policy[0, 0].item()) and kl.item() == pytest.approx(
        -policy[0, 0].item()
    )
    (term + kl).sum().backward()
    assert torch.isfinite(logprobs.grad).all()


def test_target_sft_top_k_needs_a_ranked_prior():
    with pytest.raises(ValueError, match="uniform prior has no most likely entries"):
        PrioritySFTConfig("out", priority="target_sft", priority_args={"prior": "uniform", "top_k": 5})
    with pytest.raises(PriorityError, match="alpha='teacher' is not one of"):
        PrioritySFTConfig("out", priority="target_sft", priority_args={"alpha": "teacher"})


# ------------------------------------------------------------------------------------------------------------------
# The soft-target term against a naive loop over positions and vocabulary entries
# ------------------------------------------------------------------------------------------------------------------
def naive_soft_target(logits, ref_logits, label, alpha, alpha_value, prior, eta, top_k):
    """(1 − α)·H(A, π_θ) for one position, from the definitions, with Python floats."""

    def softmax(xs):
        top = max(xs)
        exps = [math.exp(x - top) for x in xs]
        return [e / sum(exps) for e in exps]

    p, q = softmax(logits), softmax(ref_logits)
    vocab = len(p)
    trust = {"constant": alpha_value, "policy": p[label], "reference": q[label]}[alpha]
    if prior == "uniform":
        prior_dist = [1 / vocab] * vocab
    elif prior == "policy":
        prior_dist = p
    elif prior == "reference":
        prior_dist = q
    else:
        unnormalised = [p[v] ** (1 - eta) * q[v] ** eta for v in range(vocab)]
        prior_dist = [u / sum(unnormalised) for u in unnormalised]
    if top_k:
        kept = sorted(range(vocab), key=lambda v: prior_dist[v], reverse=True)[:top_k]
        total = sum(prior_dist[v] for v in kept)
        prior_dist = [prior_dist[v] / total if v in kept else 0.0 for v in range(vocab)]
    cross = -sum(prior_dist[v] * math.log(p[v]) for v in range(vocab))
    return (1 - trust) * cross


@pytest.mark.parametrize(
    "alpha, prior, eta, top_k",
    [
        ("policy", "guided", 0.5, 0),
        ("policy", "guided", 0.5, 3),
        ("reference", "guided", 0.2, 1),
        ("constant", "guided", 1.0, 4),
        ("constant", "uniform", 0.5, 0),
        ("reference", "reference", 0.5, 6),
        ("policy", "policy", 0.5, 2),
        ("constant", "reference", 0.5, 50),  # k above the vocabulary: the whole prior
    ],
)
def test_soft_target_term_matches_a_naive_loop(alpha, prior, eta, top_k):
    generator = torch.Generator().manual_seed(top_k)
    n, vocab = 6, 11
    logits = torch.randn(n, vocab, generator=generator) * 2
    ref_logits = torch.randn(n, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (n,), generator=generator)
    logprobs = logits.log_softmax(-1).requires_grad_()
    args = dict(alpha=alpha, alpha_value=0.6, prior=prior, eta=eta, top_k=top_k)
    # α_t as the trainer hands it to the term: target_sft's Φ
    trust = {
        "constant": torch.full((n,), 0.6),
        "policy": logits.softmax(-1).gather(1, labels[:, None]).squeeze(1),
        "reference": ref_logits.softmax(-1).gather(1, labels[:, None]).squeeze(1),
    }[alpha]
    got = soft_target_cross_entropy(
        logprobs, labels, ref_logits.log_softmax(-1), trust, prior=prior, eta=eta, top_k=top_k
    )

    assert got.shape == (n,) and got.requires_grad
    for i in range(n):
        expected = naive_soft_target(logits[i].tolist(), ref_logits[i].tolist(), int(labels[i]), **args)
        assert got[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), i


def test_soft_target_without_reference_reads_none():
    logprobs = torch.randn(3, 7).log_softmax(-1)
    labels = torch.tensor([0, 3, 6])
    p = logprobs.gather(1, labels[:, None]).squeeze(1).exp()
    got = soft_target_cross_entropy(logprobs, labels, None, p, prior="uniform", eta=0.5, top_k=0)
    torch.testing.assert_close(got, -(1 - p) * logprobs.mean(-1))


# ------------------------------------------------------------------------------------------------------------------
# Chunking: the terms never see more than a chunk of positions, and the chunk size does not change the result
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["asft", "target_sft"])
def test_chunk_size_does_not_change_loss_or_gradients(
    method, monkeypatch, make_model, tokenizer, datasets_, make_args
):
    trainer = make_trainer(make_model, tokenizer, datasets_, make_args, method, ref_model=make_model(1))
    batch = first_batch(trainer)
    loss, grads = trainer_loss_and_grads(trainer, batch)

    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 3 * vocab)  # three positions per chunk
    projected = []
    raw_logits = lm_head.Head.raw_logits

    def recording(self, hidden, dtype):
        logits = raw_logits(self, hidden, dtype)
        projected.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(lm_head.Head, "raw_logits", recording)
    chunked_loss, chunked_grads = trainer_loss_and_grads(trainer, batch)

    _, mask = shifted_labels(batch)
    assert projected and all(rows <= 3 and width == vocab for rows, width in projected)
    # The package's LM-head pass (`trl_priority.statistics.lm_head`) projects the policy twice (the statistics before Φ, then the
    # objective with its gradient, as TRL's fused head projects in its forward and again in its backward) and the
    # reference once for the term. target_sft's Φ reads `ref_logps` (a statistic of its signature), computed from the
    # reference's distribution before Φ: its reference is projected once more.
    passes = {"asft": 3, "target_sft": 4}[method]
    assert sum(rows for rows, _ in projected) == passes * mask.sum()
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-7)
    assert_grads_close(chunked_grads, grads, rtol=1e-5, atol=1e-7)
