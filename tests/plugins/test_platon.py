"""PLATON state and cubic schedule, against hand-computed sequences."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from vlprune.errors import VLPruneError
from vlprune.plugins.platon import Platon, cubic_schedule

torch.set_num_threads(1)


def _param(values: list[float]) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _feed(platon: Platon, param: nn.Parameter, grads: list[list[float]]) -> list[bool]:
    closed = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        closed.append(platon.update([("w", param)]))
    return closed


def test_window_and_emas_follow_hand_computed_sequence() -> None:
    theta = [2.0, -1.0]
    grads = [[1.0, 0.5], [3.0, -0.5], [-2.0, 4.0], [0.0, 2.0], [1.0, 1.0], [5.0, 0.0]]
    b1, b2, dt = 0.5, 0.75, 2
    platon = Platon(beta1=b1, beta2=b2, delta_t=dt)
    closed = _feed(platon, _param(theta), grads)
    assert closed == [False, True, False, True, False, True]
    # independent plain-Python computation, element by element
    for k in range(2):
        ibar = ubar = 0.0
        for w in range(3):
            window = grads[2 * w : 2 * w + 2]
            current = sum(abs(theta[k] * g[k]) for g in window) / dt
            ibar = b1 * ibar + (1 - b1) * current
            ubar = b2 * ubar + (1 - b2) * abs(current - ibar)
        assert platon.ibar["w"][k].item() == pytest.approx(ibar)
        assert platon.ubar["w"][k].item() == pytest.approx(ubar)
        assert platon.score("w")[k].item() == pytest.approx(ibar * ubar)
    assert platon.calls == 6 and platon.windows == 3


def test_no_score_before_first_window_then_partial_window_does_not_move_emas() -> None:
    param = _param([1.0, 1.0])
    platon = Platon(beta1=0.85, beta2=0.95, delta_t=3)
    _feed(platon, param, [[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(VLPruneError, match="delta_t"):
        platon.score("w")
    _feed(platon, param, [[1.0, 2.0]])
    first = platon.score("w").clone()
    _feed(platon, param, [[9.0, 9.0], [9.0, 9.0]])  # window still open
    assert torch.equal(platon.score("w"), first)


def test_beta2_one_scores_by_ibar() -> None:
    param = _param([2.0, 3.0])
    platon = Platon(beta1=0.0, beta2=1.0, delta_t=1)
    _feed(platon, param, [[1.0, -1.0]])
    assert torch.allclose(platon.score("w"), torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert platon.ubar == {}


def test_parameter_without_grad_is_skipped_with_a_warning() -> None:
    layer = nn.Linear(3, 2)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model = nn.Sequential(layer, frozen)
    platon = Platon(delta_t=1)
    with pytest.warns(UserWarning, match="without a gradient"):
        platon.update(model)  # no backward yet: nothing to score, warns
    model(torch.randn(4, 3)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per parameter, frozen ones never
        platon.update(model)
    assert set(platon.names()) == {"0.weight", "0.bias"}


def test_parameters_the_loss_does_not_reach_are_skipped_quietly(caplog) -> None:
    """A model with a layer the loss never uses (LLaVA's vision post-norm) is no mistake: no warning."""
    used, unused = nn.Linear(3, 2), nn.Linear(3, 2)
    model = nn.ModuleDict({"used": used, "unused": unused})
    used(torch.randn(4, 3)).sum().backward()
    platon = Platon(delta_t=1)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="vlprune.plugins.platon"):
        warnings.simplefilter("error")
        platon.update(model)
    assert set(platon.names()) == {"used.weight", "used.bias"}
    assert "unused.weight" in caplog.text


def test_prune_reparametrisation_keeps_plain_names() -> None:
    layer = nn.Linear(4, 2)
    torch_prune.random_unstructured(layer, "weight", amount=0.5)
    layer(torch.randn(3, 4)).sum().backward()
    platon = Platon(delta_t=1)
    platon.update(layer)
    assert "weight" in platon.names() and platon.score("weight").shape == (2, 4)
    mask = layer.weight_mask.bool()
    assert torch.all(platon.score("weight")[~mask] == 0)  # masked weights have no sensitivity


def test_remove_slices_state_and_state_dict_round_trips() -> None:
    param = _param([1.0, 2.0, 3.0])
    platon = Platon(beta1=0.5, beta2=0.5, delta_t=1)
    _feed(platon, param, [[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    before = platon.score("w").clone()
    platon.remove("w", 0, [1])
    assert torch.equal(platon.score("w"), before[[0, 2]])
    clone = Platon()
    clone.load_state_dict(platon.state_dict())
    assert torch.equal(clone.score("w"), platon.score("w")) and clone.delta_t == 1


@pytest.mark.parametrize("kwargs", [dict(beta1=1.0), dict(beta2=1.5), dict(delta_t=0)])
def test_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(VLPruneError):
        Platon(**kwargs)


def test_cubic_schedule_hand_computed() -> None:
    args = dict(total_steps=100, initial_ratio=1.0, final_ratio=0.2, warmup_steps=10, initial_warmup=1, final_warmup=2, delta_t=10)
    assert cubic_schedule(0, **args) == (1.0, False)
    assert cubic_schedule(10, **args) == (1.0, False)
    ratio, mask = cubic_schedule(11, **args)
    assert ratio == pytest.approx(0.2 + 0.8 * (69 / 70) ** 3) and mask is False
    ratio, mask = cubic_schedule(50, **args)  # t_i = 10, cubic phase 70 steps
    assert ratio == pytest.approx(0.2 + 0.8 * (3 / 7) ** 3) and mask is True
    assert cubic_schedule(80, **args) == (pytest.approx(0.2), True)
    assert cubic_schedule(81, **args) == (0.2, True)
    assert cubic_schedule(99, **args) == (0.2, True)
    ratios = [cubic_schedule(t, **args)[0] for t in range(100)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))  # never un-prunes


def test_cubic_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(VLPruneError, match="above the initial"):
        cubic_schedule(0, 100, initial_ratio=0.5, final_ratio=0.8)
    with pytest.raises(VLPruneError, match="warm-ups"):
        cubic_schedule(0, 100, 1.0, 0.2, warmup_steps=20, initial_warmup=1, final_warmup=5)
    with pytest.raises(VLPruneError):
        cubic_schedule(0, 100, 1.0, 0.0)
