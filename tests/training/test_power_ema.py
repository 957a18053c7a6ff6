"""EDM2's power-function EMA and its post-hoc reconstruction against independent references: numeric integrals of
the profile, the direct weighted average of the weights, and a third EMA of a synthetic training run."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from ldm.training import Checkpointer, ConfigError, TrainConfig, build_optimizer, build_scheduler, load_config, setup
from ldm.training.posthoc_ema import combine, list_snapshots, plan, profile_inner, solve_weights
from ldm.training.power_ema import PowerEMA, gamma_of_sigma_rel, sigma_rel_of_gamma

GAMMAS = [0.0, 0.5, 2.0, 6.94, 16.97, 60.0]


def profile(tau, t, gamma):
    """p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (Karras et al. 2024, appendix C)."""
    return (gamma + 1) * tau ** gamma / t ** (gamma + 1) if 0 <= tau <= t else 0.0


@pytest.mark.parametrize("gamma", GAMMAS)
def test_sigma_rel_is_the_profiles_numeric_std_over_its_length(gamma):
    t = 7.0
    mean = quad(lambda tau: tau * profile(tau, t, gamma), 0, t, epsabs=0, epsrel=1e-12)[0]
    second = quad(lambda tau: tau * tau * profile(tau, t, gamma), 0, t, epsabs=0, epsrel=1e-12)[0]
    assert sigma_rel_of_gamma(gamma) == pytest.approx(math.sqrt(second - mean ** 2) / t, rel=1e-7)
    assert gamma_of_sigma_rel(sigma_rel_of_gamma(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_the_papers_two_profiles_and_the_range():
    # sec. 3.1: the stored profiles sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            gamma_of_sigma_rel(bad)


@pytest.mark.parametrize("a,b", [((5.0, 6.94), (9.0, 16.97)), ((9.0, 2.0), (4.0, 0.5)), ((3.0, 1.0), (3.0, 40.0))])
def test_profile_inner_product_matches_numeric_integral(a, b):
    (t_a, g_a), (t_b, g_b) = a, b
    numeric = quad(lambda tau: profile(tau, t_a, g_a) * profile(tau, t_b, g_b), 0, min(t_a, t_b),
                   epsabs=0, epsrel=1e-12)[0]
    assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-9)
    assert profile_inner(t_b, g_b, t_a, g_a) == pytest.approx(numeric, rel=1e-9)


class Weights(nn.Module):
    """A parameter vector set by hand (the "training"), and a frozen one the EMA must leave out."""

    def __init__(self, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


def random_walk(steps, d, seed=0):
    """theta_1..theta_steps (float64): a drifting random walk, as weights wander in training."""
    g = np.random.default_rng(seed)
    return np.cumsum(g.standard_normal((steps, d)) + 0.05, axis=0)


def direct_ema(theta, t, gamma):
    """The power EMA at update t as a weighted average: step s weighs p's integral over (s-1, s]."""
    s = np.arange(1, t + 1, dtype=np.float64)
    w = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / t ** (gamma + 1)
    return w @ theta[:t]


def track(theta, sigma_rels, every, folder, dtype=torch.float32):
    model = Weights(theta.shape[1])
    ema = PowerEMA(model, sigma_rels, every, folder, dtype)
    for step, value in enumerate(theta, start=1):
        with torch.no_grad():
            model.theta.copy_(torch.from_numpy(value))
        ema.update()
        ema.maybe_snapshot(step, len(theta))
    return ema


def test_tracked_power_ema_is_the_direct_weighted_average(tmp_path):
    theta = random_walk(400, 16)
    for t in (1, 2, 37, 400):
        ema = track(theta[:t], [0.03, 0.10, 0.25], every=1000, folder=tmp_path)
        assert set(ema.shadows[0]) == {"theta"}                     # the frozen parameter is not tracked
        for sigma_rel, shadow in zip(ema.sigma_rels, ema.shadows):
            want = direct_ema(theta, t, gamma_of_sigma_rel(sigma_rel))
            np.testing.assert_allclose(shadow["theta"].double().numpy(), want, rtol=2e-6, atol=2e-5 * np.sqrt(t))
    assert ema.shadows[0]["theta"].dtype == torch.float32


def test_reconstructs_a_third_ema_from_two_stored_ones(tmp_path):
    steps, every, d = 1000, 50, 32
    theta = random_walk(steps, d, seed=1)
    track(theta, [0.05, 0.10], every, tmp_path / "run" / "posthoc-ema")
    snapshots = list_snapshots(tmp_path / "run")
    assert len(snapshots) == 2 * steps // every and {s.updates for s in snapshots} == set(range(every, steps + 1, every))

    stored_gap = np.linalg.norm(direct_ema(theta, steps, gamma_of_sigma_rel(0.05)) -
                                direct_ema(theta, steps, gamma_of_sigma_rel(0.10)))
    for sigma_rel, step in [(0.08, 1000), (0.07, 500), (0.15, 1000)]:
        gamma = gamma_of_sigma_rel(sigma_rel)
        used, x, err, end = plan(snapshots, sigma_rel=sigma_rel, step=step)
        assert end.updates == step and all(s.step <= step for s in used)
        rebuilt = combine(used, x)["theta"].double().numpy()
        target = direct_ema(theta, step, gamma)
        gap = np.linalg.norm(rebuilt - target)
        # Cauchy-Schwarz: |<r, theta_j>| <= ||r|| ||theta_j||, with ||r|| = err ||p*|| and theta piecewise constant
        bound = err * math.sqrt(profile_inner(step, gamma, step, gamma)) * np.linalg.norm(theta[:step])
        assert gap <= bound + 1e-4 * np.linalg.norm(target)
        assert gap < 0.01 * stored_gap, (sigma_rel, gap, stored_gap)

    # A stored profile at a snapshot step is that snapshot, up to float error.
    used, x, err, end = plan(snapshots, sigma_rel=0.10, step=500)
    assert err < 1e-6 and np.abs(x).max() == pytest.approx(1.0, abs=1e-6)
    stored = [s for s in used if s.step == 500 and s.sigma_rel == 0.10][0]
    from safetensors.torch import load_file
    torch.testing.assert_close(combine(used, x)["theta"], load_file(str(stored.path))["theta"], rtol=1e-6, atol=1e-5)


def test_more_snapshots_reconstruct_better():
    g05, g10, target = gamma_of_sigma_rel(0.05), gamma_of_sigma_rel(0.10), gamma_of_sigma_rel(0.08)
    errors = []
    for every in (500, 100, 20):
        ts = [t for t in range(every, 1001, every) for _ in range(2)]
        errors.append(solve_weights(ts, [g05, g10] * (len(ts) // 2), 1000, target)[1])
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


def test_float16_snapshots_and_checkpoint_state(tmp_path):
    theta = random_walk(20, 8)
    ema = track(theta, [0.05, 0.10], every=10, folder=tmp_path, dtype=torch.float16)
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "phema-000010-0.0500.safetensors"))["theta"].dtype == torch.float16
    other = PowerEMA(Weights(8), [0.05, 0.10], 10, tmp_path)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 20 and torch.equal(other.shadows[1]["theta"], ema.shadows[1]["theta"])
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerEMA(Weights(8), [0.05], 10, tmp_path).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="post-hoc EMA weights do not match"):
        PowerEMA(Weights(9), [0.05, 0.10], 10, tmp_path).load_state_dict(ema.state_dict())


def test_snapshot_folder_on_start_and_resume(tmp_path):
    theta = random_walk(30, 4)
    ema = track(theta, [0.05], every=10, folder=tmp_path)
    with pytest.raises(FileExistsError, match="earlier run"):
        ema.settle_folder(0)
    ema.settle_folder(20)                               # resumed at 20: step 30's snapshot will be redone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phema-000010-0.0500.safetensors",
                                                          "phema-000020-0.0500.safetensors"]


@pytest.mark.parametrize("override,message", [
    ("posthoc_ema.sigma_rels=[0.05,0.5]", "out of range"),
    ("posthoc_ema.sigma_rels=[0.1,0.10001]", "must differ"),
    ("posthoc_ema.every=0", "every must be >= 1"),
    ("posthoc_ema.dtype=bfloat16", "expected one of"),
    ("posthoc_ema.sigma=[0.1]", "did you mean 'sigma_rels'"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(TrainConfig, None, [override])
    assert "posthoc_ema" in str(e.value)


def test_a_stage_without_power_emas_refuses_the_key(tmp_path):
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path}", "tracker=none", "min_free_disk_gb=0",
                                          "posthoc_ema.sigma_rels=[0.05,0.1]"])
    accelerator = setup(cfg)
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    with pytest.raises(ValueError, match="stage 'toy' does not track post-hoc EMAs"):
        Checkpointer(accelerator, cfg, stage="toy", model_config={}, model=model, optimizer=optimizer,
                     scheduler=build_scheduler(optimizer, cfg))
