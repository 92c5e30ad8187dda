"""Statistics: chunked full-distribution statistics against the model's own full logits; the forward helper."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_priority import statistics as stats


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    # Gemma 2 scales and soft-caps its logits: the chunked projection must do the same
    config = Gemma2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=5.0,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 50, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def full_logits_statistics(model, inputs, k):
    """The same statistics from the model's own (batch, seq, vocab) logits."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    logprobs = logits.float().log_softmax(-1)  # (B, T-1, V)
    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    flat_logprobs, flat_labels = logprobs[mask], labels[mask]
    out = {}
    for name, kwargs in (("mass", {}), ("topk_entropy", {"k": k})):
        full = torch.zeros(mask.shape)
        full[mask] = getattr(stats, name)(flat_logprobs, flat_labels, **kwargs)
        out[name] = full
    logps = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    entropy = -(logprobs.exp() * logprobs).sum(-1) * mask
    return out | {"logps": logps, "entropy": entropy}


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk_elements", [stats.CHUNK_ELEMENTS, 60])  # 60: one position per chunk
@pytest.mark.parametrize("keep_outputs", [True, False])  # the policy or a reference (no loss)
def test_forward_statistics_match_the_full_logits(kind, chunk_elements, keep_outputs, monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", chunk_elements)
    model = tiny(kind)
    inputs = batch()
    expected = full_logits_statistics(model, inputs, k=5)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    names = ["logps", "entropy", "mass", "topk_entropy"]
    with torch.no_grad():
        outputs, got = stats.forward_statistics(model, inputs, names, {"k": 5}, keep_outputs=keep_outputs)
    assert set(got) == set(names)
    for name, value in got.items():
        assert value.shape == (2, 8) and not value.requires_grad
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    if keep_outputs:
        assert torch.equal(outputs.label_mask, inputs["labels"][:, 1:] != -100)
    else:
        assert outputs is None


def test_forward_statistics_run_the_model_once_and_keep_the_loss_gradient():
    """A distribution statistic: the package's LM-head pass serves the forward from the hidden states a hook hands
    over (the model runs once, its own head on one position per sequence); the statistics carry no gradient, the
    loss (`request.objective`, once Φ is known) does, and the hook is removed afterwards."""
    model = tiny("llama")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))

    def before_terms(outputs, request):
        request.nll_weight = outputs.log_probs.exp() * outputs.label_mask  # a Φ read from the pass's statistics

    request = stats.DistributionRequest(before_terms=before_terms)
    outputs, got = stats.forward_statistics(model, batch(), ["logps", "mass"], {}, request=request)
    assert len(calls) == 1
    assert not outputs.log_probs.requires_grad and not got["logps"].requires_grad and not got["mass"].requires_grad
    assert request.objective.requires_grad
    request.objective.backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None
    assert len(model.model._forward_hooks) == 1  # only the counter: the pass's hook was removed


def test_vocabulary_of_statistics():
    assert stats.source_of("mask") == "labels"
    assert stats.source_of("logps") == stats.source_of("mass") == "policy"
    assert stats.source_of("ref_topk_entropy") == "reference"
    assert stats.source_of("response_mask") == "data"
    assert stats.source_of("ref_response_mask") is None and stats.source_of("temperature") is None
    assert stats.hyperparameters_of("ref_topk_entropy") == ("k",) and stats.hyperparameters_of("logps") == ()
    assert stats.source_of("progress") == stats.source_of("state") == stats.source_of("selected") == "trainer"


def test_bf16_statistics_are_accumulated_in_fp32():
    """In bf16, `mass` and `logps` match a float32 computation from the same bf16 weights within 1e-3, where logits
    rounded to bf16 before the softmax (the old code) miss by far more."""
    model = tiny("llama").to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # realistic logit magnitudes (a few units), where bf16 rounding shows
    inputs = batch()
    with torch.no_grad():
        hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    got = stats.distribution_statistics(hidden, inputs["labels"], model, ["mass", "logps"], {})

    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    rows, targets = hidden[:, :-1][mask], labels[mask]

    def oracle(logits):
        logprobs = logits.float().log_softmax(-1)
        return {"mass": stats.mass(logprobs, targets), "logps": logprobs.gather(1, targets[:, None]).squeeze(1)}

    exact = oracle(rows.float() @ model.lm_head.weight.float().t())
    rounded = oracle((rows @ model.lm_head.weight.t()).to(torch.bfloat16))  # products rounded to bf16
    for name in ("mass", "logps"):
        torch.testing.assert_close(got[name][mask], exact[name], rtol=0, atol=1e-3, msg=name)
    assert (rounded["logps"] - exact["logps"]).abs().max() > 1e-2  # the test can tell the two apart


def test_vocabulary_size_is_read_from_sharded_weights():
    model = tiny("llama")
    assert stats.vocab_size_of(model) == 50
    # DeepSpeed ZeRO-3: the local weight is empty and the full shape is in `ds_shape`
    head = model.lm_head
    head.weight = torch.nn.Parameter(torch.empty(0))
    head.weight.ds_shape = torch.Size([50, 16])
    assert stats.vocab_size_of(model) == 50
    # A flat-sharded weight without `ds_shape`: the module's `out_features`
    del head.weight.ds_shape
    assert stats.vocab_size_of(model) == 50


def test_distribution_statistics_are_computed_inside_the_model_forward(monkeypatch):
    """ZeRO-3 and FSDP gather parameters only during the (wrapped) model's forward: the LM head must be read there."""
    model = tiny("llama")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    wrapper = torch.nn.Module()  # stands for the FSDP / DeepSpeed root wrapper around the model
    wrapper.module = model
    wrapper.forward = lambda **kwargs: model(**kwargs)
    inside = []
    wrapper.register_forward_pre_hook(lambda *args: inside.append(True))
    wrapper.register_forward_hook(lambda *args: inside.append(False))
    seen = []
    original = stats.lm_head.gathered_head

    def recording(causal_lm):
        seen.append(bool(inside) and inside[-1])
        return original(causal_lm)

    monkeypatch.setattr(stats.lm_head, "gathered_head", recording)
    for keep_outputs in (True, False):  # the policy and a reference (its backbone's hidden states)
        with torch.no_grad():
            stats.forward_statistics(wrapper, batch(), ["logps", "mass"], {}, keep_outputs=keep_outputs)
    assert seen == [True, True]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("autocast", [False, True])  # float32, bf16 products accumulated in float32
def test_the_lm_head_pass_gives_the_fused_heads_statistics_loss_and_gradients(kind, autocast, monkeypatch):
    """A method served by the package's LM-head pass gets what TRL's fused head gives the others: the same
    `log_probs`, `entropy`, `is_top1`, and with Φ = 1 the same loss Σ −log p / N and the same gradients.

    Tolerances: float32 sums depend on the GEMM's row count (the pass projects 3 rows at a time), about 1e-6. Under
    bf16 autocast TRL's tile rounds the logits to bf16 before its log-sum-exp while the pass keeps them float32
    (`lm_head` module docstring): log-probabilities differ by up to about 1e-2 on these logits, gradients by a few
    1e-3 relative."""
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 3 * 50)  # three positions per chunk, 15 supervised rows: uneven

    def run(pass_: bool):
        model = tiny(kind)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        inputs = batch()
        num_items = (inputs["labels"][:, 1:] != -100).sum()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if pass_:

                def before_terms(outputs, request):
                    request.nll_weight = outputs.label_mask.float()

                request = stats.DistributionRequest(before_terms=before_terms)
                outputs, _ = stats.forward_statistics(model, inputs, ["logps", "mass"], {}, request=request)
                loss = request.objective / num_items
            else:
                outputs = model(**inputs, fused_lm_head=True)
                loss = outputs.loss
        loss.backward()
        grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
        return outputs, loss, grads

    expected, expected_loss, expected_grads = run(pass_=False)
    outputs, loss, grads = run(pass_=True)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    mask = expected.label_mask
    assert torch.equal(outputs.label_mask, mask)
    if not autocast:  # in bf16 a near-tie between the top two logits may flip
        assert torch.equal(outputs.is_top1, expected.is_top1)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(
            getattr(outputs, field), getattr(expected, field).detach().float(), **tolerance, msg=field
        )
    torch.testing.assert_close(loss, expected_loss.float(), **tolerance)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=name)


def test_distribution_statistics_describe_the_models_own_distribution_whatever_the_fused_heads_temperature():
    """TRL's head may score at a temperature other than 1; the distribution statistics, from the package's pass,
    describe the model's own distribution, as the full logits give it."""
    model = tiny("llama")
    inputs = batch()
    expected = full_logits_statistics(model, inputs, k=5)
    add_fused_lm_head(model, temperature=2.0, outputs=("log_probs", "entropy"))
    with torch.no_grad():
        _, got = stats.forward_statistics(model, inputs, ["mass", "topk_entropy"], {"k": 5})
    for name in ("mass", "topk_entropy"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("keep_outputs", [True, False])  # the policy's pass, or a reference's
def test_statistics_under_bf16_autocast_are_accumulated_in_fp32(keep_outputs):
    """Under CPU autocast, `mm` runs in bf16: the projection turns autocast off and accumulates in float32, as without
    autocast, instead of rounding every logit to bf16."""
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # realistic logit magnitudes (a few units), where bf16 rounding shows
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    inputs = batch()
    captured = []
    model.model.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = stats.forward_statistics(model, inputs, ["mass"], {}, keep_outputs=keep_outputs)

    mask = inputs["labels"][:, 1:] != -100
    rows, targets = captured[0][:, :-1][mask].to(torch.bfloat16), inputs["labels"][:, 1:][mask]
    weight = model.lm_head.weight.to(torch.bfloat16)
    exact = stats.mass((rows.float() @ weight.float().t()).log_softmax(-1), targets)
    rounded = stats.mass((rows @ weight.t()).float().log_softmax(-1), targets)  # logits rounded to bf16
    torch.testing.assert_close(got["mass"][mask], exact, rtol=0, atol=1e-4)
    assert (rounded - exact).abs().max() > 3e-4  # the test can tell the two apart


def test_chunk_size_by_device_unless_set(monkeypatch):
    """Large chunks on CUDA (GEMM efficiency), small ones elsewhere (peak memory); a request or the module setting
    wins."""
    assert stats.chunk_elements_for(torch.device("cuda")) == 2**24
    assert stats.chunk_elements_for(torch.device("cpu")) == 2**22
    assert stats.chunk_elements_for(torch.device("cpu"), requested=60) == 60
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 120)
    assert stats.chunk_elements_for(torch.device("cuda")) == 120
    assert stats.chunk_elements_for(torch.device("cuda"), requested=60) == 60
