"""The priority contract, checked for every registered method, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import phi_of
from trl_priority import PriorityError, available_priorities, get_priority, register_priority
from trl_priority import statistics as stats_vocab
from trl_priority.priorities import registry
from trl_priority.statistics.state import TokenState


B, T = 3, 7


def random_statistics(names, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible random values for every statistic: log-probs ≤ 0, entropies ≥ 0, masses in (0, 1], data columns
    (per example: one value per row), the trainer's progress and a state bound to the tokens' identities."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=generator) > 0.3
    mask[-1] = False  # one row without a supervised token
    stats = {"mask": mask}
    for name in names:
        base = name.removeprefix("ref_")
        if base == "logps":
            stats[name] = torch.rand(B, T, generator=generator).clamp(min=1e-4).log()
        elif base == "entropy":
            stats[name] = torch.rand(B, T, generator=generator) * 5
        elif base == "topk_entropy":
            stats[name] = torch.rand(B, T, generator=generator) * math.log(20)
        elif base == "mass":
            stats[name] = torch.rand(B, T, generator=generator).clamp(min=1e-4)
        elif base == "image_attention":  # an attention mass in [0, 1]
            stats[name] = torch.rand(B, T, generator=generator)
        elif name == "response_mask":
            stats[name] = (torch.rand(B, T, generator=generator) > 0.5).long()
        elif stats_vocab.source_of(name) == "data":
            per_example = (torch.rand(B, 1, generator=generator) > 0.5).float() * torch.rand(B, 1, generator=generator)
            stats[name] = per_example.expand(B, T).clone()
    stats = {name: torch.where(stats["mask"], value, 0) if name != "mask" else value for name, value in stats.items()}
    stats["progress"] = torch.tensor(0.5)
    if "state" in names:
        identity = torch.arange(B)[:, None].expand(B, T), torch.arange(T).expand(B, T)
        stats["state"] = TokenState().bind(*identity)
    return stats


@pytest.fixture
def scratch_registry():
    """Lets a test register priorities without leaving them behind."""
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


@pytest.mark.parametrize("name", available_priorities())
def test_every_method_honours_the_contract(name):
    priority = get_priority(name)
    stats = random_statistics(priority.all_statistics)
    stats["logps"] = stats.get("logps", torch.zeros(B, T)).requires_grad_()
    phi = phi_of(priority, stats, 0.5)

    mask = stats["mask"]
    assert phi.shape == mask.shape and phi.dtype == torch.float32
    assert not phi.requires_grad
    assert torch.all(phi[~mask] == 0)
    assert torch.isfinite(phi).all()
    if not priority.signed:
        assert torch.all(phi >= 0)
    if priority.regime == "hard":
        assert set(phi.unique().tolist()) <= {0.0, 1.0}
    # A batch with no supervised token gives Φ = 0 everywhere
    empty = {
        k: (torch.zeros_like(v, dtype=torch.bool) if k == "mask" else v.detach() if torch.is_tensor(v) else v)
        for k, v in stats.items()
    }
    assert torch.all(phi_of(priority, empty, 0.5) == 0)


@pytest.mark.parametrize("name", available_priorities())
def test_every_method_documents_its_paper_and_formula(name):
    priority = get_priority(name)
    doc = priority.fn.__doc__ or ""
    assert priority.paper and "Φ" in doc
    if name not in ("sft", "weighted"):  # `weighted`: the users' own weights, from a TRL issue and Mistral's format
        assert "Paper:" in doc and "arXiv" in doc
    priority.resolve_args({})  # the defaults are valid


def test_unknown_name_lists_the_methods_and_suggests_a_close_one():
    with pytest.raises(PriorityError, match=r"Unknown priority 'rho'\. Did you mean 'rho1'\?") as error:
        get_priority("rho")
    for name in available_priorities():
        assert name in str(error.value)


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("rho1", {"ratio": 0}, r"ratio=0.0 is outside \(0, 1\]"),
        ("rho1", {"ratio": 1.5}, r"ratio=1.5 is outside"),
        ("rho1", {"ratio": "0.5"}, "has type str, expected float"),
        ("rho1", {"ratio": True}, "has type bool, expected float"),
        ("profit", {"tau": -0.1}, r"tau=-0.1 is outside \[0, 1\]"),
        ("profit", {"strategy": "sideways"}, "strategy='sideways' is not one of"),
        ("profit", {"strategy": "middle", "tau": 0.7, "tau_upper": 0.3}, "tau .* must be below tau_upper"),
        ("eaft", {"k": 1}, r"k=1 is outside \[2, inf\)"),
        ("eaft", {"k": 2.5}, "has type float, expected int"),
        ("eaft", {"alpha": float("nan")}, "is not finite"),
        ("wit", {"prompt_weight": -1}, "prompt_weight=-1.0 is outside"),
        ("prift_mass", {"treshold": 0.5}, r"Unknown priority_args \['treshold'\].*Valid: threshold"),
    ],
)
def test_bad_arguments_name_the_parameter(name, args, message):
    with pytest.raises(PriorityError, match=message):
        get_priority(name).resolve_args(args)


def test_integers_are_accepted_for_floats():
    assert get_priority("rho1").resolve_args({"ratio": 1}) == {"ratio": 1.0, "scope": "step"}


def test_register_a_user_priority(scratch_registry):
    @register_priority(regime="soft", paper="a test")
    def squared_probability(logps, mask, *, power: float = 2.0):
        """Φ = p^power"""
        return logps.exp().pow(power) * mask

    assert "squared_probability" in available_priorities()
    priority = get_priority("squared_probability")
    assert priority.source == "intrinsic" and priority.hyperparameters["power"].default == 2.0
    logps = torch.tensor([[math.log(0.5), math.log(0.25)]])
    mask = torch.tensor([[True, True]])
    phi = priority({"logps": logps, "mask": mask}, priority.resolve_args({"power": 3}))
    torch.testing.assert_close(phi, torch.tensor([[0.125, 0.015625]]))
    with pytest.raises(PriorityError, match="already registered"):
        register_priority(squared_probability, name="squared_probability")
    register_priority(squared_probability, name="squared_probability", overwrite=True)


def test_registration_checks_the_signature(scratch_registry):
    with pytest.raises(PriorityError, match=r"positional parameters \['temperature'\] are not statistics.*ref_logps"):

        @register_priority
        def bad_positional(logps, mask, temperature=1.0):
            return logps

    with pytest.raises(PriorityError, match="'tau' has no default"):

        @register_priority
        def no_default(logps, mask, *, tau):
            return logps

    with pytest.raises(PriorityError, match="must take the `mask` statistic"):

        @register_priority
        def no_mask(logps):
            return logps

    with pytest.raises(PriorityError, match="'topk_entropy' is computed with the hyperparameter 'k'"):

        @register_priority
        def missing_k(topk_entropy, mask):
            return topk_entropy

    with pytest.raises(PriorityError, match="regime 'sometimes'"):
        register_priority(lambda mask: mask, name="x", regime="sometimes")


def test_a_plain_callable_is_an_unregistered_soft_priority():
    def halves(mask):
        return 0.5 * mask

    priority = get_priority(halves)
    assert priority.name == "halves" and priority.regime == "soft" and "halves" not in available_priorities()
    mask = torch.tensor([[True, False]])
    assert priority({"mask": mask}, {}).tolist() == [[0.5, 0.0]]


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda logps, mask: -logps.exp() * mask, "negative Φ .* not declared signed"),
        (lambda logps, mask: torch.full_like(logps, float("nan")), "non-finite Φ on 2 of 2"),
        (lambda logps, mask: logps[:, :1], r"shape \(1, 1\).*\(1, 2\)"),
        (lambda logps, mask: 1.0, "shape float"),
    ],
)
def test_invalid_phi_is_an_error_naming_the_method(fn, message):
    fn.__name__ = "broken_method"
    priority = get_priority(fn)
    stats = {"logps": torch.tensor([[-0.5, -1.0]]), "mask": torch.tensor([[True, True]])}
    with pytest.raises(PriorityError, match=f"'broken_method'.*{message}"):
        priority(stats, {})


def test_phi_is_zeroed_where_the_label_is_ignored():
    priority = get_priority(lambda mask: torch.ones(mask.shape))  # forgets the mask
    assert priority({"mask": torch.tensor([[True, False]])}, {}).tolist() == [[1.0, 0.0]]


def test_signed_priorities_may_be_negative(scratch_registry):
    @register_priority(regime="signed", paper="a test")
    def unlearn_everything(mask):
        """Φ = −1"""
        return -mask.float()

    assert get_priority("unlearn_everything")({"mask": torch.tensor([[True]])}, {}).item() == -1.0
