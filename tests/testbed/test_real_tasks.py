"""Real-tier task metrics measure something: real DINOv2 separates handwritten digits far better than
the same architecture randomly initialised, real SmolLM2 answers simple questions and models
template text, and a SmolLM2 with its MLPs zeroed does neither.

Skipped (reason names ``make real``) when the real-tier packages are not installed.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from tests.testbed.real_marks import needs_dinov2, needs_smollm2
from vlprune.errors import DataError
from vlprune.testbed import real_tasks as rt

logger = logging.getLogger(__name__)

# small and fast: 112 px input (DINOv2 interpolates its position grid), 200 train / 100 test digits
KNN_KW = dict(dataset="digits", n_train=200, n_test=100, k=5, image_size=112)


# ------------------------------------------------------------------------------- no packages needed
def test_texts_are_deterministic_and_domain_specific() -> None:
    math = rt.smollm2_texts("math", 6, seed=0)
    assert math == rt.smollm2_texts("math", 6, seed=0)
    assert math != rt.smollm2_texts("math", 6, seed=1)
    general = rt.smollm2_texts("general", 6, seed=0)
    assert all(any(ch.isdigit() for ch in t) for t in math)
    assert not any(ch.isdigit() for t in general for ch in t)
    with pytest.raises(DataError, match="domain"):
        rt.smollm2_texts("poetry", 2)  # type: ignore[arg-type]


def test_prompt_sets_and_matching_rules() -> None:
    assert 20 <= len(rt.ARITHMETIC_PROMPTS) <= 30 and 20 <= len(rt.FACTUAL_PROMPTS) <= 30
    # every arithmetic answer is the true result of its expression (independent eval)
    for prompt, (expected,) in rt.ARITHMETIC_PROMPTS:
        expr = prompt.split("What is ")[1].split("?")[0]
        assert eval(expr) == float(expected), prompt  # noqa: S307 - fixed, module-defined strings
    p = "What is 7 + 5? Answer with just the number."
    assert rt.arithmetic_match("7 + 5 = 12", p, "12")
    assert rt.arithmetic_match("The answer is 12.", p, "12")
    assert not rt.arithmetic_match("7 + 5 = 13, not 12", p, "12")  # first number after the echo
    assert not rt.arithmetic_match("7 + 5 = 112", p, "12")
    assert not rt.arithmetic_match("I cannot say.", p, "12")
    assert rt.answer_matches("The capital is PARIS.", ["Paris"])
    assert not rt.answer_matches("Parisian food", ["Paris"])
    assert not rt.answer_matches("17 legs", ["7"])


def test_digit_data_split_is_disjoint_balanced_and_seeded() -> None:
    pytest.importorskip("sklearn")
    xtr, ytr, xte, yte = rt.dinov2_digit_data("digits", 100, 50, seed=0)
    assert xtr.shape == (100, 8, 8) and xte.shape == (50, 8, 8)
    assert np.bincount(ytr).tolist() == [10] * 10 and np.bincount(yte).tolist() == [5] * 10
    again = rt.dinov2_digit_data("digits", 100, 50, seed=0)
    assert np.array_equal(again[0], xtr) and np.array_equal(again[3], yte)
    with pytest.raises(DataError, match="n_train"):
        rt.dinov2_digit_data("digits", 1790, 50)
    with pytest.raises(DataError, match="dataset"):
        rt.dinov2_digit_data("cifar", 10, 10)  # type: ignore[arg-type]


def test_knn_accuracy_matches_a_brute_force_vote() -> None:
    g = torch.Generator().manual_seed(0)
    ftr, fte = torch.randn(60, 8, generator=g), torch.randn(30, 8, generator=g)
    ytr, yte = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (30,), generator=g)
    correct = 0
    for f, y in zip(fte, yte):
        sims = torch.nn.functional.cosine_similarity(ftr, f[None], dim=1)
        top = sims.argsort(descending=True)[:5]
        counts = np.bincount(ytr[top].numpy(), minlength=3)
        best = [c for c in range(3) if counts[c] == counts.max()]
        pred = max(best, key=lambda c: float(sims[top][ytr[top] == c].sum()))
        correct += int(pred == int(y))
    assert rt.knn_accuracy(ftr, ytr, fte, yte, k=5) == pytest.approx(correct / 30)


# --------------------------------------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def dinov2():
    from vlprune.testbed import real

    return real.load("dinov2-s")


@needs_dinov2
def test_dinov2_knn_far_above_chance_and_above_random_init(dinov2) -> None:
    from transformers import Dinov2Model

    before = {k: v.clone() for k, v in dinov2.state_dict().items()}
    real_scores = rt.dinov2_knn(dinov2, **KNN_KW)
    assert all(torch.equal(before[k], v) for k, v in dinov2.state_dict().items())  # model untouched
    torch.manual_seed(0)
    random_model = Dinov2Model(dinov2.config).eval()
    random_scores = rt.dinov2_knn(random_model, **KNN_KW)
    logger.info("DINOv2 digits k-NN real %s, random init %s", real_scores, random_scores)
    assert real_scores["chance"] == pytest.approx(0.1)
    assert real_scores["knn"] > 0.6 and real_scores["linear_probe"] > 0.7
    assert real_scores["knn"] > random_scores["knn"] + 0.15
    assert real_scores["linear_probe"] > random_scores["linear_probe"] + 0.1
    assert rt.dinov2_knn(dinov2, **KNN_KW) == real_scores  # deterministic


# -------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from vlprune.testbed import real

    return real.load("smollm2"), real.processor("smollm2")


@needs_smollm2
def test_smollm2_perplexity_natural_far_below_shuffled(smollm2) -> None:
    model, tok = smollm2
    ppl = {d: rt.smollm2_perplexity(model, d, n_texts=8, tokenizer=tok) for d in ("math", "general")}
    shuffled = {d: rt.smollm2_perplexity(model, d, n_texts=8, tokenizer=tok, shuffle_tokens=True) for d in ppl}
    logger.info("SmolLM2 perplexity %s, shuffled tokens %s", ppl, shuffled)
    for d in ppl:
        assert 1.0 < ppl[d] < 60.0
        assert shuffled[d] > 10 * ppl[d]
    assert rt.smollm2_perplexity(model, "math", n_texts=8, tokenizer=tok) == ppl["math"]  # deterministic


@needs_smollm2
def test_smollm2_exact_match_well_above_zero_and_collapses_without_mlps(smollm2) -> None:
    model, tok = smollm2
    real_em = {k: rt.smollm2_exact_match(model, k, tokenizer=tok) for k in ("arithmetic", "factual")}
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for layer in broken.model.layers:
            layer.mlp.down_proj.weight.zero_()
    broken_em = {k: rt.smollm2_exact_match(broken, k, tokenizer=tok, max_new_tokens=12) for k in real_em}
    logger.info("SmolLM2 exact match %s, MLPs zeroed %s", real_em, broken_em)
    assert real_em["arithmetic"] >= 0.3 and real_em["factual"] >= 0.5
    for k in real_em:
        assert broken_em[k] <= 0.1 < real_em[k] - 0.2
