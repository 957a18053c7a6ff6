"""Frechet distance vs closed forms and scipy, prompt-accuracy aggregation, held-out prompts."""
import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.data.captions import parse_caption
from ldm.data.shapes import generate
from ldm.eval.metrics import frechet_distance, heldout_prompts, prompt_accuracy


def with_moments(rng, n, mean, cov):
    """n samples whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(axis=0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(x, rowvar=False)))
    x = x @ np.linalg.inv(chol).T  # sample covariance = I
    return x @ np.linalg.cholesky(cov).T + mean


def random_spd(rng, f):
    a = rng.standard_normal((f, f))
    return a @ a.T + 0.1 * np.eye(f)


def test_frechet_1d_closed_form():
    # for 1-D Gaussians d^2 = (m1 - m2)^2 + (s1 - s2)^2
    rng = np.random.default_rng(0)
    a = with_moments(rng, 500, np.array([1.0]), np.array([[4.0]]))
    b = with_moments(rng, 300, np.array([-2.0]), np.array([[0.25]]))
    assert frechet_distance(a, b) == pytest.approx(9.0 + (2.0 - 0.5) ** 2, rel=1e-9)


def test_frechet_diagonal_closed_form():
    # commuting covariances: the cross term is sum sqrt(a_i b_i)
    rng = np.random.default_rng(1)
    va, vb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    ma, mb = rng.standard_normal(6), rng.standard_normal(6)
    a = with_moments(rng, 400, ma, np.diag(va))
    b = with_moments(rng, 400, mb, np.diag(vb))
    expected = np.sum((ma - mb) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_general_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    ca, cb = random_spd(rng, 8), random_spd(rng, 8)
    a = with_moments(rng, 300, rng.standard_normal(8), ca)
    b = with_moments(rng, 200, rng.standard_normal(8), cb)
    cross = scipy.linalg.sqrtm(ca @ cb).real  # the textbook, non-symmetric form
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
                - 2 * np.trace(cross))
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(expected, rel=1e-4)


def test_frechet_identical_sets_is_zero_and_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((256, 32)), rng.standard_normal((256, 32)) * 1.5 + 0.3
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert frechet_distance(a, b) > 1.0


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_prompt_accuracy_aggregates_hand_written_judgements():
    captions = ["a red circle on the left", "a small blue square",
                "a red circle above a blue square", "a green triangle below a red circle",
                ""]
    judgements = [
        {"colour_0": True, "shape_0": True, "zone": True, "count": True},
        {"colour_0": True, "shape_0": False, "size_0": True, "count": True},
        {"colour_0": True, "shape_0": True, "colour_1": True, "shape_1": True,
         "relation": True, "count": True},
        {"colour_0": True, "shape_0": True, "colour_1": False, "shape_1": True,
         "relation": False, "count": True},
        {},  # the empty prompt asks for nothing and is left out
    ]
    acc = prompt_accuracy(judgements, captions)
    assert acc["count"] == 4
    assert acc["all"] == pytest.approx(2 / 4)
    assert acc["one_object"] == pytest.approx(1 / 2)
    assert acc["two_object"] == pytest.approx(1 / 2)
    per = acc["per_attribute"]
    assert per["colour"] == pytest.approx(5 / 6)
    assert per["shape"] == pytest.approx(5 / 6)
    assert per["relation"] == pytest.approx(1 / 2)
    assert per["zone"] == per["size"] == per["count"] == 1.0
    assert acc["outcomes"] == [True, False, True, False, None]  # per prompt, in caption order


def test_prompt_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 judgements for 1 captions"):
        prompt_accuracy([{}, {}], ["a red circle"])


def test_heldout_prompts_balanced_deterministic_and_heldout():
    prompts = heldout_prompts(41, seed=3)
    assert prompts == heldout_prompts(41, seed=3)
    counts = [len(parse_caption(p)["objects"]) for p in prompts]
    assert counts.count(1) == 21 and counts.count(2) == 20
    texts = {generate(3, i, "heldout").text for i in range(300)}
    assert set(prompts) <= texts
    with pytest.raises(ValueError, match="n must be >= 1"):
        heldout_prompts(0)
