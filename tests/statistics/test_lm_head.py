"""The package's chunked LM-head pass (`trl_priority.statistics.lm_head`) against a float64 oracle written from the definitions.

The oracle projects every supervised position at once, in float64, and differentiates with autograd:

    ℓ_t = log_softmax(c·tanh(s·(W h_t + b)/c))             (the model's scale s and soft cap c, when set)
    Φ_t = exp(ℓ_t[y_t])  (no gradient)                      an asft-like Φ, read from the pass's own statistics
    L   = Σ_t Φ_t·(−ℓ_t[y_t]) + λ_kl·Σ_t KL(π_ref,t ‖ π_t) + λ_st·Σ_t (1 − Φ_t)·H(A_t, π_t)
    A_t ∝ sg(π_t)^(1−η)·π_ref,t^η                            (target_sft's guided prior)

and the statistics: log π(y), H(π), top-1, mass = Σ_v π(v)·1[π(v) < π(y)] + π(y), the top-k renormalised entropy, and
the reference's log π_ref(y) and mass. The pass must give the same values, and the same gradients of L with respect
to the final hidden states and the LM-head weight (and bias), whatever the chunk size, under padding, padding-free
(position ids, no attention mask) and packing layouts.
"""

from __future__ import annotations

import math

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from trl_priority import statistics as stats
from trl_priority.objectives import DistributionTerm
from trl_priority.priorities.distribution import kl_to_reference, soft_target_cross_entropy
from trl_priority.statistics import lm_head


ARGS = {"k": 5, "prior": "guided", "eta": 0.5, "top_k": 0}
TERM_WEIGHTS = {"kl_anchor": 0.3, "soft_target": 1.0}
TERMS = (
    DistributionTerm("kl_anchor", kl_to_reference),
    DistributionTerm("soft_target", soft_target_cross_entropy),
)
POLICY_STATISTICS = ("mass", "topk_entropy")
REFERENCE_STATISTICS = ("logps", "mass")


# ------------------------------------------------------------------------------------------------------------------
# Layouts: the same kind of sequences padded, padding-free (one row, position ids) and packed (rows of sequences)
# ------------------------------------------------------------------------------------------------------------------
def _sequences(vocab: int) -> list[tuple[torch.Tensor, int]]:
    """Four sequences (token ids, prompt length) of uneven lengths."""
    generator = torch.Generator().manual_seed(3)
    return [(torch.randint(4, vocab, (length,), generator=generator), prompt) for length, prompt in
            ((9, 3), (6, 2), (11, 4), (5, 1))]  # fmt: skip


def _labels(ids: torch.Tensor, prompt: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:prompt] = -100
    return labels


def layout(kind: str, vocab: int, pad: int = 1) -> dict[str, torch.Tensor]:
    """A batch in `kind` layout: 'padding' (right-padded rows, attention mask), 'padding_free' (all sequences in
    one row, position ids restarting at each, no attention mask, the first label of each -100), 'packing' (two rows
    of two sequences each, position ids, no attention mask, the shorter row padded)."""
    sequences = _sequences(vocab)
    if kind == "padding":
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), width), pad)
        labels = torch.full((len(sequences), width), -100)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (ids, prompt) in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = _labels(ids, prompt)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    rows = [sequences] if kind == "padding_free" else [sequences[:2], sequences[2:]]
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ids, prompt in row:
            end = start + len(ids)
            input_ids[r, start:end] = ids
            labels[r, start:end] = _labels(ids, max(prompt, 1))  # a sequence's first token is never a target
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


# ------------------------------------------------------------------------------------------------------------------
# The float64 oracle
# ------------------------------------------------------------------------------------------------------------------
def oracle_logprobs(hidden, weight, bias, scale, softcap):
    """ℓ = log_softmax(c·tanh(s·(W h + b)/c)) in float64, every row at once: `(N, V)`."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1)


def oracle_statistics(logprobs, labels, k):
    """The statistics, from their definitions, per row: `{name: (N,)}`."""
    probs = logprobs.exp()
    target = probs.gather(1, labels[:, None])  # (N, 1)
    top = logprobs.topk(k, dim=-1).values  # (N, k)
    renormalised = top.exp() / top.exp().sum(-1, keepdim=True)
    return {
        "logps": target.squeeze(1).log(),
        "entropy": -(probs * logprobs).sum(-1),
        "is_top1": (logprobs.argmax(-1) == labels).double(),
        "mass": (probs * (probs < target)).sum(-1) + target.squeeze(1),
        "topk_entropy": -(renormalised * renormalised.log()).sum(-1),
    }


def oracle(hidden, weight, bias, ref_hidden, ref_weight, labels, scale, softcap):
    """Values and gradients of the module docstring's L, float64: `(statistics, terms, L, grads)`, the statistics and
    per-token terms `(B, T-1)`, grads of the hidden states, weight and bias."""
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    bias = None if bias is None else bias.detach().double().requires_grad_()
    shifted = labels[:, 1:]
    mask = shifted != -100
    targets = shifted[mask]
    logprobs = oracle_logprobs(hidden[:, :-1][mask], weight, bias, scale, softcap)  # (N, V)
    with torch.no_grad():
        ref_logprobs = oracle_logprobs(ref_hidden[:, :-1][mask], ref_weight, None, scale, softcap)  # (N, V)
        values = oracle_statistics(logprobs, targets, ARGS["k"])
        ref_values = oracle_statistics(ref_logprobs, targets, ARGS["k"])
        values.update({f"ref_{name}": ref_values[name] for name in REFERENCE_STATISTICS})
    phi = values["logps"].exp()  # (N,), no gradient
    logps = logprobs.gather(1, targets[:, None]).squeeze(1)
    ref_probs = ref_logprobs.exp()
    kl = (ref_probs * (ref_logprobs - logprobs)).sum(-1)  # KL(π_ref ‖ π)
    eta = ARGS["eta"]
    prior = ((1 - eta) * logprobs.detach() + eta * ref_logprobs).softmax(-1)  # A ∝ π^(1−η)·π_ref^η
    soft = (1 - phi) * -(prior * logprobs).sum(-1)
    terms = {"kl_anchor": kl, "soft_target": soft}
    loss = (phi * -logps).sum() + sum(TERM_WEIGHTS[name] * value.sum() for name, value in terms.items())
    loss.backward()

    def positions(rows):
        full = torch.zeros(mask.shape, dtype=torch.float64)
        full[mask] = rows.detach()
        return full

    grads = {"hidden": hidden.grad, "weight": weight.grad, "bias": None if bias is None else bias.grad}
    return (
        {name: positions(v) for name, v in values.items()},
        {name: positions(v) for name, v in terms.items()},
        loss.detach(),
        grads,
    )


# ------------------------------------------------------------------------------------------------------------------
# The pass, as the trainer drives it
# ------------------------------------------------------------------------------------------------------------------
def request_for(ref_hidden, ref_model, chunk_elements):
    """The trainer's request: distribution statistics, the reference's (from its distribution), Φ computed from the
    pass's statistics, and the two distribution terms."""

    def before_terms(outputs, request):
        phi = outputs.log_probs.exp() * outputs.label_mask  # (B, T-1)
        request.nll_weight = phi
        request.term_inputs = {"priority": phi}

    return stats.DistributionRequest(
        statistics=POLICY_STATISTICS,
        args=ARGS,
        terms=TERMS,
        term_weights=tuple(TERM_WEIGHTS[term.name] for term in TERMS),
        reference=stats.ReferenceDistribution(ref_hidden, ref_model, REFERENCE_STATISTICS),
        before_terms=before_terms,
        chunk_elements=chunk_elements,
    )


def backbone_hidden(model, inputs):
    """The final hidden states, as the trainer runs the model: without a KV cache (with one, transformers does not
    read packed sequences from the position ids, and padding-free rows would attend across sequences)."""
    kwargs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
    with torch.no_grad():
        return model.model(**kwargs).last_hidden_state


def with_transform(model, scale: float, softcap: float | None):
    model.config.logit_scale = scale if scale != 1.0 else None
    model.config.final_logit_softcapping = softcap
    return model


# fp32: the pass computes in float32 against a float64 oracle; sums over a 320-token vocabulary and the chunk's rows
# agree to about 1e-6 relative.
FP32 = {"rtol": 1e-5, "atol": 1e-5}
# bf16 autocast: the products h·W are taken in bf16 (8 bits of mantissa, relative error 2^-8 ≈ 4e-3 per operand)
# and accumulated in float32, so logits of size ~1 are off by ~1e-2; log-probabilities, statistics, the loss and the
# gradients inherit errors of a few 1e-3 to 1e-2. The tolerance is set well above that and far below the values.
BF16 = {"rtol": 5e-2, "atol": 5e-2}


@pytest.mark.parametrize("kind", ["padding", "padding_free", "packing"])
@pytest.mark.parametrize(
    "rows_per_chunk", [1, 4, 5, None]
)  # None: every row in one chunk; 4 and 5 split 21 rows unevenly
@pytest.mark.parametrize("transform", [(1.0, None), (0.7, 3.0)])  # plain, and scaled and soft-capped logits
def test_the_pass_matches_the_float64_oracle(kind, rows_per_chunk, transform, make_model):
    model, ref_model = with_transform(make_model(0), *transform), with_transform(make_model(1), *transform)
    model.lm_head.bias = torch.nn.Parameter(0.1 * torch.randn(model.lm_head.out_features))  # a head with a bias
    vocab = model.lm_head.out_features
    inputs = layout(kind, vocab)
    labels = inputs["labels"]
    num_rows = int((labels[:, 1:] != -100).sum())
    assert num_rows == 21 and (rows_per_chunk in (1, None) or num_rows % rows_per_chunk != 0)  # uneven chunks
    hidden = backbone_hidden(model, inputs).requires_grad_()
    ref_hidden = backbone_hidden(ref_model, inputs)
    chunk_elements = None if rows_per_chunk is None else rows_per_chunk * vocab

    request = request_for(ref_hidden, ref_model, chunk_elements)
    outputs = stats.serve_request(hidden, labels, model, request)
    request.objective.backward()

    expected, expected_terms, expected_loss, grads = oracle(
        hidden, model.lm_head.weight, model.lm_head.bias, ref_hidden, ref_model.lm_head.weight, labels, *transform
    )
    got = {
        "logps": outputs.log_probs, "entropy": outputs.entropy, "is_top1": outputs.is_top1.double(),
        **request.values,
    }  # fmt: skip
    assert set(got) == set(expected)
    for name, value in got.items():
        torch.testing.assert_close(value.double(), expected[name], **FP32, msg=name)
    for name, value in request.term_values.items():
        torch.testing.assert_close(value.double(), expected_terms[name], **FP32, msg=name)
    torch.testing.assert_close(request.objective.double(), expected_loss, **FP32)
    torch.testing.assert_close(hidden.grad.double(), grads["hidden"], **FP32)
    torch.testing.assert_close(model.lm_head.weight.grad.double(), grads["weight"], **FP32)
    torch.testing.assert_close(model.lm_head.bias.grad.double(), grads["bias"], **FP32)
    assert ref_model.lm_head.weight.grad is None  # the reference gets no gradient


@pytest.mark.parametrize("kind", ["padding", "packing"])
def test_the_pass_under_bf16_autocast_matches_the_float64_oracle(kind, make_model):
    model, ref_model = make_model(0), make_model(1)
    with torch.no_grad():  # logits of a few units, where bf16 products matter
        model.lm_head.weight.mul_(20)
        ref_model.lm_head.weight.mul_(20)
    vocab = model.lm_head.out_features
    inputs = layout(kind, vocab)
    hidden = backbone_hidden(model, inputs).requires_grad_()
    ref_hidden = backbone_hidden(ref_model, inputs)
    request = request_for(ref_hidden, ref_model, 4 * vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = stats.serve_request(hidden, inputs["labels"], model, request)
    request.objective.backward()

    expected, expected_terms, expected_loss, grads = oracle(
        hidden, model.lm_head.weight, None, ref_hidden, ref_model.lm_head.weight, inputs["labels"], 1.0, None
    )
    for name, value in {"logps": outputs.log_probs, "entropy": outputs.entropy, **request.values}.items():
        torch.testing.assert_close(value.double(), expected[name], **BF16, msg=name)
    for name, value in request.term_values.items():
        torch.testing.assert_close(value.double(), expected_terms[name], **BF16, msg=name)
    torch.testing.assert_close(request.objective.double(), expected_loss, **BF16)
    # Gradients: compared relative to their own scale (entries near 0 carry the products' absolute error)
    for got, want in ((hidden.grad, grads["hidden"]), (model.lm_head.weight.grad, grads["weight"])):
        error = (got.double() - want).norm() / want.norm()
        assert error < 2e-2, error
    assert hidden.grad.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32


def test_a_bf16_weight_keeps_its_gradient_in_bf16_and_matches_the_oracle(make_model):
    """A bf16 model: the weight gradient is accumulated in bf16 (no float32 V × H buffer is held from the forward to
    the backward), and still matches the oracle within bf16's resolution."""
    model, ref_model = make_model(0).to(torch.bfloat16), make_model(1).to(torch.bfloat16)
    vocab = model.lm_head.out_features
    inputs = layout("padding", vocab)
    hidden = backbone_hidden(model, inputs).requires_grad_()
    ref_hidden = backbone_hidden(ref_model, inputs)
    request = request_for(ref_hidden, ref_model, 3 * vocab)
    stats.serve_request(hidden, inputs["labels"], model, request)
    saved = request.objective.grad_fn.saved_tensors  # what the forward keeps for the backward
    assert all(t is None or t.shape != model.lm_head.weight.shape or t.dtype == torch.bfloat16 for t in saved)
    request.objective.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16

    _, _, expected_loss, grads = oracle(
        hidden, model.lm_head.weight, None, ref_hidden, ref_model.lm_head.weight, inputs["labels"], 1.0, None
    )
    torch.testing.assert_close(request.objective.double(), expected_loss, **BF16)
    for got, want in ((hidden.grad, grads["hidden"]), (model.lm_head.weight.grad, grads["weight"])):
        assert (got.double() - want).norm() / want.norm() < 2e-2


@pytest.mark.parametrize("kind", ["padding", "padding_free", "packing"])
def test_the_model_forward_hands_the_pass_its_hidden_states(kind, make_model, monkeypatch):
    """Through the model: `forward_statistics` runs the model once (its head on one position per row), the pass
    gets the final hidden states through a forward hook, and the loss and the LM-head weight's gradient equal the
    oracle's from the model's own full logits. The reference's statistics and distribution come from its hidden
    states, run the way the trainer runs them."""
    model, ref_model = make_model(0), make_model(1)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 5 * model.lm_head.out_features)  # 5 rows per chunk
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    add_fused_lm_head(ref_model, outputs=("log_probs", "entropy"))
    inputs = layout(kind, model.lm_head.out_features)
    reference = stats.DistributionRequest(backbone_only=True)
    with torch.no_grad():
        stats.forward_statistics(ref_model, inputs, (), {}, keep_outputs=False, request=reference)
    request = request_for(reference.hidden, ref_model, None)
    lm_head_calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: lm_head_calls.append(tuple(output.shape)))
    outputs, got = stats.forward_statistics(model, inputs, ["logps", *POLICY_STATISTICS], ARGS, request=request)
    request.objective.backward()
    assert lm_head_calls == [(inputs["input_ids"].shape[0], 1, model.lm_head.out_features)]  # logits_to_keep=1

    # The oracle from the model's own full logits (the head applied to its hidden states, in float64)
    labels = inputs["labels"]
    hidden, ref_hidden = backbone_hidden(model, inputs), backbone_hidden(ref_model, inputs)
    expected, expected_terms, expected_loss, grads = oracle(
        hidden, model.lm_head.weight, None, ref_hidden, ref_model.lm_head.weight, labels, 1.0, None
    )
    for name in ("logps", *POLICY_STATISTICS):
        torch.testing.assert_close(got[name].double(), expected[name], **FP32, msg=name)
    torch.testing.assert_close(request.values["ref_mass"].double(), expected["ref_mass"], **FP32)
    torch.testing.assert_close(request.objective.double(), expected_loss, **FP32)
    torch.testing.assert_close(model.lm_head.weight.grad.double(), grads["weight"], **FP32)
    assert model.model.embed_tokens.weight.grad is not None  # the gradient reaches the backbone
    assert not model.model._forward_hooks  # the pass's hook was removed


def test_no_supervised_row_gives_a_differentiable_zero(make_model):
    """A micro-batch whose labels are all -100 (a long prompt cut by truncation): the objective is 0 and still
    connected to the model, as TRL's fused head keeps it, so `backward()` works."""
    model = make_model(0)
    inputs = layout("padding", model.lm_head.out_features)
    inputs["labels"][:] = -100
    hidden = backbone_hidden(model, inputs).requires_grad_()
    request = stats.DistributionRequest(before_terms=lambda outputs, request: None)
    stats.serve_request(hidden, inputs["labels"], model, request)
    assert request.objective.item() == 0 and request.objective.requires_grad
    request.objective.backward()
    assert float(hidden.grad.abs().sum()) == 0 and not math.isnan(float(model.lm_head.weight.grad.sum()))


def test_the_pass_projects_each_head_the_expected_number_of_times(make_model, monkeypatch):
    """The policy's head twice per row (statistics, then the objective), the reference's once for the terms and once
    for its statistics (read before Φ); never a (B, T, V) tensor: each projection is at most one chunk."""
    model, ref_model = make_model(0), make_model(1)
    vocab = model.lm_head.out_features
    inputs = layout("packing", vocab)
    hidden = backbone_hidden(model, inputs).requires_grad_()
    ref_hidden = backbone_hidden(ref_model, inputs)
    projected = []
    raw_logits = lm_head.Head.raw_logits

    def recording(self, rows, dtype):
        logits = raw_logits(self, rows, dtype)
        projected.append((self.weight is ref_model.lm_head.weight, logits.shape[0]))
        return logits

    monkeypatch.setattr(lm_head.Head, "raw_logits", recording)
    num_rows = int((inputs["labels"][:, 1:] != -100).sum())
    request = request_for(ref_hidden, ref_model, 4 * vocab)
    stats.serve_request(hidden, inputs["labels"], model, request)
    assert all(rows <= 4 for _, rows in projected)
    assert sum(rows for is_ref, rows in projected if not is_ref) == 2 * num_rows
    assert sum(rows for is_ref, rows in projected if is_ref) == 2 * num_rows
    projected.clear()
    request = request_for(ref_hidden, ref_model, 4 * vocab)
    request.reference.statistics = ()  # Φ reads no reference statistic (asft): the reference is projected once
    stats.serve_request(hidden, inputs["labels"], model, request)
    assert sum(rows for is_ref, rows in projected if is_ref) == num_rows
