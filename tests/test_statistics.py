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
@pytest.mark.parametrize("keep_outputs", [True, False])  # policy (fused head + capture) or reference (backbone only)
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
    model = tiny("llama")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    outputs, got = stats.forward_statistics(model, batch(), ["logps", "mass"], {})
    assert len(calls) == 1  # the distribution statistic reused the captured hidden states
    assert outputs.log_probs.requires_grad and not got["logps"].requires_grad
    assert len(model.model._forward_hooks) == 1  # only the counter: the capture hook was removed


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
    original = stats.gathered_head

    def recording(causal_lm):
        seen.append(bool(inside) and inside[-1])
        return original(causal_lm)

    monkeypatch.setattr(stats, "gathered_head", recording)
    # The policy's statistics come from TRL's fused head, which gathers the head itself: record where it serves them
    fused = stats._statistics_in_fused_head

    def recording_fused(job):
        if job is not None:
            seen.append(bool(inside) and inside[-1])
        return fused(job)

    monkeypatch.setattr(stats, "_statistics_in_fused_head", recording_fused)
    for keep_outputs in (True, False):  # the policy (fused head) and a reference (backbone alone)
        with torch.no_grad():
            stats.forward_statistics(wrapper, batch(), ["logps", "mass"], {}, keep_outputs=keep_outputs)
    assert seen == [True, True]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("autocast", [False, True])  # float32, bf16 products accumulated in float32
@pytest.mark.parametrize("compact", [False, True])  # TRL's layout off Triton (every position) or on it (supervised)
@pytest.mark.parametrize("names", [("logps", "entropy", "mass", "topk_entropy"), ("topk_entropy",)])
def test_policy_statistics_come_from_the_fused_heads_own_tiles(kind, autocast, compact, names, monkeypatch):
    """One LM-head projection per forward: the distribution statistics are computed from the tiles TRL's fused head
    projects, and its log-probs, entropy, top-1 flags and gradients stay TRL's. The tiles hold fewer rows than TRL's
    (bounded memory), and a float32 GEMM's sums depend on the row count: float32 values may differ from TRL's in the
    last bit (about 2e-7 here); in bf16 the product rounded to bf16 is TRL's tile (equal here)."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 3 * 50)  # three positions per tile
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 16)  # TRL folds the vocabulary in 4 chunks
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: compact)  # the layout only; folds stay in torch
    args = {"k": 5}  # topk_entropy alone: shift-invariant, computed from the logits without their log-softmax

    def run(fused: bool):
        model = tiny(kind)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        passes = []
        original = stats._distribution_pass
        with monkeypatch.context() as patch:
            patch.setattr(stats, "_distribution_pass", lambda *a: passes.append(1) or original(*a))
            if not fused:
                patch.setattr(stats, "_tile_statistics_for", lambda *a: None)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outputs, got = stats.forward_statistics(model, batch(), names, args)
                (outputs.loss + 0.1 * outputs.entropy.sum()).backward()  # gradients through log_probs and entropy
        grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
        return outputs, got, grads, len(passes)

    expected, expected_stats, expected_grads, expected_passes = run(fused=False)
    outputs, got, grads, passes = run(fused=True)
    assert (expected_passes, passes) == (1, 0)  # the fused head served every statistic: no second projection
    assert torch.equal(outputs.is_top1, expected.is_top1)
    for field in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(outputs, field), getattr(expected, field), rtol=1e-6, atol=1e-6, msg=field)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in names:
        torch.testing.assert_close(got[name], expected_stats[name], rtol=1e-6, atol=1e-6, msg=name)
        assert not got[name].requires_grad
    mask = batch()["labels"][:, 1:] != -100
    assert (got["topk_entropy"][~mask] == 0).all() and (got["topk_entropy"][mask] > 0).all()
    import trl.kernels.chunked_logprob as trl_kernel

    assert trl_utils._ChunkedLogProbFunction is trl_kernel.ChunkedLogProbFunction  # TRL's kernel is back


def test_policy_statistics_fall_back_to_the_chunked_pass_when_the_fused_head_cannot_serve_them():
    """At a temperature other than 1, TRL's head scores another distribution than the statistics describe: the
    statistics come from the separate pass, at temperature 1, as the full logits give them."""
    model = tiny("llama")
    inputs = batch()
    expected = full_logits_statistics(model, inputs, k=5)
    add_fused_lm_head(model, temperature=2.0, outputs=("log_probs", "entropy"))
    with torch.no_grad():
        _, got = stats.forward_statistics(model, inputs, ["mass", "topk_entropy"], {"k": 5})
    for name in ("mass", "topk_entropy"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("keep_outputs", [True, False])  # the fused head's tiles, or the reference's chunked pass
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
