"""The position probe: centroids from their definition, the data's shifts, the CLI on the shipped model."""
import math

import numpy as np
import pytest
import torch

from ldm.data.shapes import COLOURS
from ldm.eval.position import data_centres, red_centroid, shifts, spread


def test_red_centroid_of_known_discs():
    """Two exact-red discs at known centres on a gray canvas; a blue disc carries no redness."""
    img = np.full((2, 64, 64, 3), 128, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    for i, (cx, cy) in enumerate([(10.0, 40.0), (50.0, 20.0)]):
        img[i][(xx - cx) ** 2 + (yy - cy) ** 2 <= 36] = COLOURS["red"]
        img[i][(xx - 32) ** 2 + (yy - 5) ** 2 <= 9] = COLOURS["blue"]  # must not pull the centroid
    x, y = red_centroid(torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(x, torch.tensor([10.0, 50.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(y, torch.tensor([40.0, 20.0]), atol=1e-3, rtol=0)


def test_data_obeys_its_position_words():
    """Rendered scenes: 'on the left' puts the circle in the left third, etc. (the probe's reference)."""
    c = data_centres(16, 64)
    assert c["left"][0] < 64 / 3 < 2 * 64 / 3 < c["right"][0]
    assert c["top"][1] < 64 / 3 < 2 * 64 / 3 < c["bottom"][1]
    s = shifts(c)
    assert s["horizontal"] < -25 and s["vertical"] < -25 and not math.isnan(s["horizontal"])


def test_spread_separates_noise_from_prompt():
    """Prompt offsets a_p plus noise terms b_n: the two variances are those of a and b alone."""
    a = torch.tensor([0.0, 1.0, 2.0, 5.0])       # per prompt; unbiased variance 14/3
    b = torch.tensor([-1.0, 1.0, 0.0])           # per noise draw; unbiased variance 1
    images = (a[:, None] + b[None, :])[:, :, None, None, None].expand(4, 3, 3, 2, 2)
    got = spread(images)
    assert math.isclose(got["noise"], 1.0, rel_tol=1e-6) and math.isclose(got["prompt"], 14 / 3, rel_tol=1e-6)
    assert spread(images[:, :1].expand(4, 3, 3, 2, 2))["noise"] == 0.0  # noise-blind: the ideal first step


@pytest.mark.slow
def test_cli_on_the_shipped_model(capsys):
    from ldm.eval.__main__ import main

    main(["position", "--model", "ldm/assets/shapes64", "--n", "2", "--steps", "1", "--ws", "0"])
    out = capsys.readouterr().out
    assert "x(left)-x(right)" in out and "steps=1 w=0" in out and "across noise" in out
