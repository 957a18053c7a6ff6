"""The shipped oracle weights: held-out accuracy, input formats, features, errors."""
import json

import numpy as np
import pytest
import torch

from ldm.data.shapes import generate, render
from ldm.eval.metrics import frechet_distance
from ldm.eval.oracle import WEIGHTS, Oracle, degrade, evaluate, to_unit

N_HELDOUT = 200


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)  # nothing random at inference; keeps any accidental use reproducible
    return Oracle.load()


def heldout_images(n, start=0, resolution=64):
    samples = [generate(0, i, "heldout") for i in range(start, start + n)]
    images = np.stack([render(s.scene, resolution) for s in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.text for s in samples]


def assert_accurate(report, floor):
    for name, row in report.items():
        assert row["holds"] >= floor, (name, row)
        assert row.get("does_not_hold", 1.0) >= floor, (name, row)


def test_shipped_weights_are_small_and_documented():
    assert WEIGHTS.stat().st_size < 2 * 2**20
    measured = json.loads(WEIGHTS.with_suffix(".json").read_text())
    for split in ("clean", "degraded"):
        assert_accurate(measured[split], 0.99)


def test_heldout_accuracy_clean(oracle):
    report = evaluate(oracle, N_HELDOUT)
    assert set(report) == {"background", "colour", "count", "relation", "shape", "size", "zone"}
    assert_accurate(report, 0.99)


def test_heldout_accuracy_degraded(oracle):
    assert_accurate(evaluate(oracle, N_HELDOUT, degraded=True), 0.98)


def test_input_formats_agree(oracle):
    uint8, texts = heldout_images(48, start=500)
    signed = uint8.float() / 127.5 - 1
    big, _ = heldout_images(48, start=500, resolution=128)
    judged = oracle.judge_batch(uint8, texts)
    assert oracle.judge_batch(signed, texts) == judged
    assert np.mean([all(j.values()) for j in judged]) >= 0.97
    # 128 px renders are resized to 64: the same scenes, so nearly the same verdicts
    same = np.mean([a == b for a, b in zip(oracle.judge_batch(big, texts), judged)])
    assert same >= 0.9


def test_features_separate_real_from_corrupted(oracle):
    a, _ = heldout_images(128, start=1000)
    b, _ = heldout_images(128, start=2000)
    feats_a, feats_b = oracle.features(a), oracle.features(b)
    assert feats_a.shape == (128, 128) and torch.isfinite(feats_a).all()
    gen = torch.Generator().manual_seed(0)
    noisy = degrade(to_unit(b), gen) * 0.5 + 0.5 * torch.rand(b.shape, generator=gen)
    feats_noisy = oracle.features(noisy * 2 - 1)
    assert frechet_distance(feats_a, feats_b) * 3 < frechet_distance(feats_a, feats_noisy)


def test_bad_inputs_are_named(oracle, tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 64, 64\)"):
        oracle.judge_batch(torch.zeros(3, 64, 64), ["a red circle"])
    with pytest.raises(ValueError, match="2 images for 1 captions"):
        oracle.judge_batch(torch.zeros(2, 3, 64, 64), ["a red circle"])
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        oracle.judge_batch(torch.zeros(1, 3, 64, 64), ["a dog"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Oracle.load(tmp_path / "missing.safetensors")
