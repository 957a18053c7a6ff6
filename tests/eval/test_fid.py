"""ldm/eval/fid.py: Frechet distance and KID against independent computations; the FID Inception against
torchvision's Inception3 run with hand-computed TF pooling (random weights: the real file is not here);
strict weight loading; `python -m ldm.eval fid` / `fid-stats` end to end on tiny folders."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision.models.inception as tv
from PIL import Image
from torch import nn

from ldm.eval import fid
from ldm.eval.__main__ import main
from ldm.eval.metrics import frechet_distance

SIDE = 107  # smallest convenient input for the whole net: Mixed_7b/7c see 2x2 maps, every pixel on the border


# ------------------------------------------------------------------ Frechet distance, KID

def random_psd(rng, d):
    x = rng.standard_normal((d, 2 * d))
    return x @ x.T / (2 * d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.standard_normal(5), rng.standard_normal(5)
    var_a, var_b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert fid.frechet_distance_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(closed, rel=1e-12)


def test_frechet_distance_equals_the_scipy_sqrtm_form():
    """pytorch-fid's formula: |mu_a - mu_b|^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b)), non-commuting covariances."""
    rng = np.random.default_rng(1)
    mu_a, mu_b, sigma_a, sigma_b = rng.standard_normal(6), rng.standard_normal(6), random_psd(rng, 6), random_psd(rng, 6)
    assert not np.allclose(sigma_a @ sigma_b, sigma_b @ sigma_a)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    expected = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(sigma_a + sigma_b - 2 * root)
    assert fid.frechet_distance_stats(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_features():
    """From features: equals metrics.frechet_distance; identical sets give ~0 even when N < F (singular C)."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((10, 20)), rng.standard_normal((12, 20)) + 0.3
    assert fid.frechet_distance_stats(*fid.gaussian_stats(a), *fid.gaussian_stats(b)) == \
        pytest.approx(frechet_distance(a, b), rel=1e-12)
    mu, sigma = fid.gaussian_stats(a)
    # the F x F route loses ~sqrt(eps) to the singular covariance (measured: 1.9e-8 of tr C here)
    assert abs(fid.frechet_distance_stats(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    with pytest.raises(ValueError, match="mismatched statistics"):
        fid.frechet_distance_stats(mu, sigma, mu[:5], sigma)


@pytest.mark.parametrize("n", [5, 19, 20, 40])  # N < F, N = F - 1, N = F: the N x N route; N > F: F x F
def test_frechet_distance_to_statistics(n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, 20)) * rng.uniform(0.5, 2, 20), rng.standard_normal((30, 20)) + 0.2
    mu, sigma = fid.gaussian_stats(b)
    # rel 1e-7: the F x F reference loses ~sqrt(eps) to the singular C_a when N <= F (measured: 2.3e-9)
    assert fid.frechet_distance_to(a, mu, sigma) == pytest.approx(frechet_distance(a, b), rel=1e-7)
    mu_a, sigma_a = fid.gaussian_stats(a)
    assert abs(fid.frechet_distance_to(a, mu_a, sigma_a)) < 1e-6 * np.trace(sigma_a)


def test_kid_is_the_unbiased_polynomial_mmd():
    """Subsets as large as both sets: every subset is the whole set, so KID is the full-set estimate."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)) + 0.5
    k = lambda x, y: (x @ y / 4 + 1) ** 3  # noqa: E731
    m = 5
    within = sum(k(s[i], s[j]) for s in (a, b) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    expected = within - 2 * sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m ** 2
    kid = fid.kernel_inception_distance(a, b, subsets=3, subset_size=100)
    assert kid["subset_size"] == 5 and kid["mean"] == pytest.approx(expected, rel=1e-12) and kid["std"] < 1e-12


def test_kid_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(4)
    a, b, c = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.5
    same, shifted = (fid.kernel_inception_distance(a, x, subsets=20, subset_size=100)["mean"] for x in (b, c))
    assert abs(same) < shifted / 20


# ------------------------------------------------------------------------- the network

def random_inception(seed: int = 0) -> fid.FIDInception:
    """Random weights keeping activations O(1) through the 94 convs (He init, BatchNorm near identity)."""
    torch.manual_seed(seed)
    model = fid.FIDInception()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
    return model


def shifted(x, fill: float):
    """The 9 views x[i + di, j + dj], di, dj in {-1, 0, 1}, of x padded by 1 pixel of `fill`."""
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    h, w = x.shape[-2:]
    return [padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]


def mean_of_real_pixels(x):
    """3x3 mean over the window's pixels inside the image (TF's SAME average pool), by hand."""
    return sum(shifted(x, 0.0)) / sum(shifted(torch.ones_like(x), 0.0))


def max_3x3(x):
    return torch.stack(shifted(x, -math.inf)).amax(0)


def with_torchvision_pool(monkeypatch, choose):
    """Make torchvision's blocks pool their pool branch with `choose()`'s function instead of
    F.avg_pool2d(x, 3, 1, 1) (zero padding counted): patches the F that torchvision's inception.py uses."""
    def avg_pool2d(x, kernel_size, stride, padding):
        assert (kernel_size, stride, padding) == (3, 1, 1)  # the pool branches' pool, nothing else
        return choose()(x)
    monkeypatch.setattr(tv, "F", SimpleNamespace(**{**vars(F), "avg_pool2d": avg_pool2d}))


def test_pools_are_tf_pools():
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(fid.tf_avg_pool(x), mean_of_real_pixels(x))
    torch.testing.assert_close(fid.tf_max_pool(x), max_3x3(x))


BLOCKS = {  # label: (ours, torchvision's, input channels, reference pool)
    "InceptionA (Mixed_5b)": (lambda: fid.FIDInceptionA(192, pool_features=32), lambda: tv.InceptionA(192, 32), 192,
                              mean_of_real_pixels),
    "InceptionC (Mixed_6b)": (lambda: fid.FIDInceptionC(768, channels_7x7=128), lambda: tv.InceptionC(768, 128), 768,
                              mean_of_real_pixels),
    "InceptionE (Mixed_7b)": (lambda: fid.FIDInception().Mixed_7b, lambda: tv.InceptionE(1280), 1280,
                              mean_of_real_pixels),
    "InceptionE max (Mixed_7c)": (lambda: fid.FIDInception().Mixed_7c, lambda: tv.InceptionE(2048), 2048, max_3x3),
}


@pytest.mark.parametrize("label", BLOCKS)
def test_block_is_torchvision_block_with_tf_pooling(label, monkeypatch):
    ours, theirs, channels, pool = BLOCKS[label]
    torch.manual_seed(0)
    ours, theirs = ours().eval(), theirs().eval()
    theirs.load_state_dict(ours.state_dict())           # same names: only the pooling differs
    x = torch.randn(2, channels, 5, 5)                   # 16 of 25 pixels on the border
    with torch.no_grad():
        plain, got = theirs(x), ours(x)                  # ours before the patch: it must not rely on it
        with_torchvision_pool(monkeypatch, lambda: pool)
        expected = theirs(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2              # the pooling matters: the test can fail


def test_network_layout():
    """Which blocks pool how, the 1008-class fc, no aux head, no input transform."""
    model = fid.FIDInception()
    avg = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"]
    assert [name for name, m in model.named_children() if getattr(m, "pool", None) is fid.tf_avg_pool] == avg
    assert model.Mixed_7c.pool is fid.tf_max_pool
    assert type(model.Mixed_6a) is tv.InceptionB and type(model.Mixed_7a) is tv.InceptionD
    assert model.fc.out_features == 1008 and model.AuxLogits is None and not model.transform_input


@pytest.fixture(scope="module")
def nets():
    """(our random FID Inception, torchvision's Inception3 with its weights and fc -> identity, inputs)."""
    ours = random_inception()
    theirs = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    theirs.load_state_dict(ours.state_dict())
    theirs.fc = nn.Identity()                            # its forward then ends at pool3 (dropout: eval)
    torch.manual_seed(1)
    return ours, theirs.eval(), torch.rand(2, 3, SIDE, SIDE) * 2 - 1


def test_net_is_torchvision_inception_with_tf_pools(nets, monkeypatch):
    """Whole net: torchvision's forward, pools by hand: real-pixel means, max in Mixed_7c only (hooks)."""
    ours, theirs, x = nets
    with torch.no_grad():
        got = ours.features(x)                           # before the patch: it must not rely on it
    pools = [mean_of_real_pixels]
    with_torchvision_pool(monkeypatch, lambda: pools[-1])
    pre = theirs.Mixed_7c.register_forward_pre_hook(lambda *_: pools.append(max_3x3))
    post = theirs.Mixed_7c.register_forward_hook(lambda *_: pools.pop() and None)  # None: keep the output
    try:
        with torch.no_grad():
            expected = theirs(x)
    finally:
        pre.remove(), post.remove()
    assert got.shape == (2, 2048) and pools == [mean_of_real_pixels]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.std() > 0.1                               # O(1) features: the comparison means something


def test_net_with_pools_switched_back_is_torchvision_inception(nets):
    """Our blocks' other branches and the wiring: with torchvision's pooling, torchvision's forward exactly."""
    ours, theirs, x = nets
    plain = lambda y: F.avg_pool2d(y, kernel_size=3, stride=1, padding=1)  # noqa: E731
    blocks = [m for m in ours.children() if hasattr(m, "pool")]
    try:
        for block in blocks:
            block.pool = plain
        with torch.no_grad():
            switched, expected = ours.features(x), theirs(x)
    finally:
        for block in blocks:
            del block.pool                               # back to the class's pool
        ours.Mixed_7c.pool = fid.tf_max_pool
    torch.testing.assert_close(switched, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (ours.features(x) - switched).abs().max() > 1e-2


def test_preprocess_is_bilinear_299_then_2x_minus_1():
    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    expected = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(fid.preprocess(images), expected, rtol=0, atol=0)
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(fid.preprocess(same), same.float() / 127.5 - 1, rtol=0, atol=1e-6)
    ends = fid.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)).aminmax()
    # 0 and 255 map to -1 and 1 (to a float's rounding: with one thread ATen's bilinear kernel gives 1 - 6e-8)
    torch.testing.assert_close(torch.stack(tuple(ends)), torch.tensor([-1.0, 1.0]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ weights

@pytest.fixture(scope="module")
def weights(nets, tmp_path_factory):
    """Our random network saved as pytorch-fid's file is: a torchvision-named state dict."""
    path = tmp_path_factory.mktemp("inception") / fid.FID_WEIGHTS_NAME
    torch.save(nets[0].state_dict(), path)
    return path


def test_weights_load_strictly(nets, weights, tmp_path):
    ours, _, x = nets
    loaded = fid.load_fid_inception(str(weights))
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), ours.features(x), rtol=0, atol=0)
    state = torch.load(weights, weights_only=True)
    old = tmp_path / "old.pth"                          # files from before BatchNorm counted its steps
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old)
    fid.load_fid_inception(str(old))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("Mixed_7c.branch_pool.conv.weight"), r"1 missing keys: Mixed_7c\.branch_pool\.conv\.weight"),
    (lambda s: s.update({"AuxLogits.fc.weight": torch.zeros(1000, 768)}), r"1 unexpected keys: AuxLogits\.fc\.weight"),
    (lambda s: s.update({"fc.weight": torch.zeros(1000, 2048)}), r"fc\.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"),
])
def test_wrong_weights_are_named(weights, tmp_path, change, message):
    state = torch.load(weights, weights_only=True)
    change(state)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=message):
        fid.load_fid_inception(str(tmp_path / "wrong.pth"))


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded|Nothing is downloaded") as err:
        fid.load_fid_inception(str(tmp_path / "absent.pth"))
    assert fid.FID_WEIGHTS_URL in str(err.value)


# ------------------------------------------------------------------------------- the CLI

def write_images(folder, seed: int, corrupt: bool = False):
    """Images of several sizes and modes (RGB, L as JPEG, RGBA, P), plus a text file and maybe a bad PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 20, 4), np.uint8), "RGBA").save(folder / "c.PNG")
    if corrupt:
        (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def expected_features(model, folder):
    """Features of the folder's readable images, one by one, by hand: PIL RGB -> [0, 1] -> bilinear -> 2x - 1."""
    rows = []
    for name in ("a.png", "b.jpg", "c.PNG"):
        with Image.open(folder / name) as image:
            x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(fid.SIZE, fid.SIZE), mode="bilinear", align_corners=False)
        with torch.no_grad():
            rows.append(model.features(2 * x - 1))
    return torch.cat(rows).double().numpy()


def test_cli_fid_and_stats_round_trip(nets, weights, tmp_path, capsys, monkeypatch):
    """fid-stats of a folder with a bad PNG, then fid against the statistics and against the folder itself."""
    monkeypatch.setattr(fid, "SIZE", SIDE)  # the net at 107 px, 8x cheaper than 299 (which test_preprocess checks)
    a, b = write_images(tmp_path / "a", 0, corrupt=True), write_images(tmp_path / "b", 1)
    common = ["--inception", str(weights), "--workers", "0", "--batch-size", "2", "--device", "cpu"]
    main(["fid-stats", "--images", str(a), "--out", str(tmp_path / "a.npz"), *common])
    assert f"wrote {tmp_path / 'a.npz'}: mu, sigma of 3 images" in capsys.readouterr().out
    mu, sigma = fid.gaussian_stats(expected_features(nets[0], a))
    with np.load(tmp_path / "a.npz") as f:
        assert set(f.files) == {"mu", "sigma", "n"} and int(f["n"]) == 3
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-4, atol=1e-4)

    main(["fid", "--images", str(b), "--ref", str(tmp_path / "a.npz"), "--out", str(tmp_path / "s.json"), *common])
    from_stats = json.loads((tmp_path / "s.json").read_text())
    assert from_stats["ref"] == {"kind": "stats", "path": str(tmp_path / "a.npz"), "n": 3}
    assert from_stats["kid"] is None and from_stats["images"]["n"] == 3 and from_stats["fid"] > 1
    capsys.readouterr()
    main(["fid", "--images", str(b), "--ref", str(a), "--kid-subsets", "5", "--out", str(tmp_path / "r.json"), *common])
    printed, result = capsys.readouterr().out, json.loads((tmp_path / "r.json").read_text())
    assert result["ref"] == {"kind": "folder", "path": str(a), "n": 3, "skipped": 1, "skipped_files": ["d.png"]}
    assert "1 unreadable skipped: d.png" in printed and f"FID       {result['fid']:.4f}" in printed
    assert result["fid"] == pytest.approx(from_stats["fid"], rel=1e-9)
    assert result["kid"]["subset_size"] == 3 and not result["inception"]["pytorch_fid_weights"]


def test_cli_errors(tmp_path, capsys):
    folder = write_images(tmp_path / "a", 0)
    with pytest.raises(SystemExit) as err:
        main(["fid", "--images", str(folder), "--ref", str(folder), "--inception", str(tmp_path / "none.pth")])
    assert err.value.code == 2 and fid.FID_WEIGHTS_URL in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fid", "--images", str(folder), "--ref", str(tmp_path / "missing.npz")])
    assert "neither an images folder nor a statistics .npz" in capsys.readouterr().err
