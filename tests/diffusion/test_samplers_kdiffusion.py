"""k-diffusion's LMS, DPM2, DPM2 a, DPM++ 2S a and DPM++ SDE, and DEIS (ldm.diffusion.kdiffusion) against
references: diffusers' LMSDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler and
DEISMultistepScheduler step for step with the same noise; DPM-Solver++(2S) (the eta = 0 limit of both DPM++
samplers) against diffusers' DPMSolverSinglestepScheduler run over our grid with the log-s midpoints inserted;
the ancestral DPM++ samplers against a transcription of k-diffusion's functions in VE sigmas (diffusers has no
2S a, and its DPM++ SDE needs torchsde); the noise against closed forms; orders of convergence on a closed-form
mixture, rectified flow too."""
import functools
import math

import numpy as np
import pytest
import torch
from diffusers import (DEISMultistepScheduler, DPMSolverSinglestepScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, LMSDiscreteScheduler)

from ldm.diffusion.gmm import GaussianMixture
from ldm.diffusion.kdiffusion import (sample_deis, sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral,
                                      sample_dpmpp_sde, sample_lms)
from ldm.diffusion.samplers import SAMPLERS, initial_noise, sample_dpmpp_2m
from ldm.diffusion.schedules import make_schedule
from tests.diffusion.test_samplers_vs_diffusers import BETAS, _assert_trajectories_close, _noise, _ours, eps_fn

NEW = {"lms": sample_lms, "dpm_2": sample_dpm_2, "dpm_2_ancestral": sample_dpm_2_ancestral,
       "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral, "dpmpp_sde": sample_dpmpp_sde, "deis": sample_deis}

# diffusers' discrete schedulers hand numpy torch tensors on every step (numpy 2 deprecations, its code, not ours)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]


def _ve_reference(ref, n, *, full_steps=None, generator=None):
    """diffusers' trajectory in x: it steps y = x sqrt(1 + s^2) (VE); `full_steps`: the stage indices after which a
    whole step of ours is done (the KDPM2 schedulers take two stages a step but the last), else every stage."""
    sig = ref.sigmas.double() if full_steps is None else ref.sigmas.double()[0::2][:n + 1]
    scale = (1 + sig ** 2).sqrt()
    y = _noise() * scale[0]
    traj, kw = [y / scale[0]], {} if generator is None else {"generator": generator}
    for j, t in enumerate(ref.timesteps):
        y = ref.step(eps_fn(ref.scale_model_input(y, t), t), t, y, **kw).prev_sample.double()
        if full_steps is None or j in full_steps:
            traj.append(y / scale[len(traj)])
    return traj


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 2, 10])
def test_lms_matches_diffusers(name, n):
    beta_schedule, kw = BETAS[name]
    ref = LMSDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing="trailing", **kw)
    ref.set_timesteps(n)
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    torch.testing.assert_close(ts[:-1], ref.timesteps.double())
    _assert_trajectories_close(_ours(sample_lms, name, ts, _noise()), _ve_reference(ref, n))


def _alphas_cumprod(name):
    """alpha-bar in float64: diffusers keeps betas and alpha-bar in float32, 1e-4 off where the cosine schedule's
    betas reach 0.999 (alpha-bar 2e-9 at t = 999, s = 20291). The made-up eps of these tests is no true denoiser, and
    a second-order step from s = 157 or 20291 is then a difference of terms that large: errors times s."""
    return torch.cumprod(1 - make_schedule(name).betas, 0)


def _float64_tables(ref, name, ancestral: bool) -> None:
    """The KDPM2 schedulers' sigma tables and midpoint timesteps as their set_timesteps builds them, in float64
    (`_alphas_cumprod`)."""
    ac = _alphas_cumprod(name)
    grid = ref.timesteps[0::2].double()
    sigmas = torch.cat([((1 - ac) / ac).sqrt()[grid.long()], torch.zeros(1, dtype=torch.float64)])
    if ancestral:
        sigmas_next = torch.cat([sigmas[1:], torch.zeros(1, dtype=torch.float64)])
        sigmas_up = (sigmas_next ** 2 * (sigmas ** 2 - sigmas_next ** 2) / sigmas ** 2) ** 0.5
        sigmas_down = (sigmas_next ** 2 - sigmas_up ** 2) ** 0.5
        sigmas_down[-1] = 0.0
        interpol = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        interpol[-2:] = 0.0
    else:
        interpol = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
    pairs = lambda v: torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])   # noqa: E731
    ref.sigmas, ref.sigmas_interpol = pairs(sigmas), pairs(interpol)
    log_sigmas = ((1 - ac) / ac).sqrt().log().numpy()
    mids = torch.tensor([float(ref._sigma_to_t(np.array(v), log_sigmas)) for v in interpol.tolist()],
                        dtype=torch.float64)
    mids = mids[:-2] if ancestral else mids[1:-1]           # the n - 1 midpoints, as the schedulers pick them
    ref.timesteps = torch.cat([grid[:1], torch.stack([mids, grid[1:]], -1).flatten()])
    if ancestral:
        ref.sigmas_up, ref.sigmas_down = pairs(sigmas_up), pairs(sigmas_down)


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 2, 10])
@pytest.mark.parametrize("ancestral", [False, True], ids=["dpm_2", "dpm_2_ancestral"])
def test_dpm_2_matches_diffusers(name, n, ancestral):
    """2n - 1 stages: a first-order one to the midpoint and a second-order one a step, the last step Euler alone.
    The ancestral scheduler draws its noise once a step but the last, with the generator, in y, as we do."""
    beta_schedule, kw = BETAS[name]
    cls = KDPM2AncestralDiscreteScheduler if ancestral else KDPM2DiscreteScheduler
    # their default betas are SD's: give DDPM's linear ones explicitly
    ref = cls(beta_schedule=beta_schedule, timestep_spacing="trailing", **{"beta_start": 1e-4, "beta_end": 0.02, **kw})
    ref.set_timesteps(n)
    assert len(ref.timesteps) == 2 * n - 1
    _float64_tables(ref, name, ancestral)
    gen = (lambda: {"generator": torch.Generator().manual_seed(1)}) if ancestral else dict
    expected = _ve_reference(ref, n, full_steps={*range(1, 2 * n - 2, 2), 2 * n - 2}, **gen())
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    ours = _ours(sample_dpm_2_ancestral if ancestral else sample_dpm_2, name, ts, _noise(), **gen())
    _assert_trajectories_close(ours, expected)


def _midpoint_grid(name, n):
    """VE sigmas of diffusers' trailing grid with the log-s midpoint of each step inserted, but the last step's (to
    0), and their timesteps: the midpoints' by diffusers' own log-sigma interpolation (_sigma_to_t)."""
    beta_schedule, kw = BETAS[name]
    ref = DPMSolverSinglestepScheduler(beta_schedule=beta_schedule, solver_order=2, algorithm_type="dpmsolver++",
                                       solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", **kw)
    ac = _alphas_cumprod(name).numpy()
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    ts = make_schedule(name).timesteps(n, spacing="trailing")[:-1].numpy()
    s = np.exp(np.interp(ts, np.arange(len(ac)), log_sigmas))
    sigmas, times = [], []
    for k in range(n):
        sigmas.append(s[k]), times.append(ts[k])
        if k < n - 1:
            mid = math.sqrt(s[k] * s[k + 1])
            sigmas.append(mid), times.append(float(ref._sigma_to_t(np.array(mid), log_sigmas)))
    return ref, sigmas + [0.0], times


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 2, 10])
@pytest.mark.parametrize("sampler", [sample_dpmpp_2s_ancestral, sample_dpmpp_sde], ids=["2s_ancestral", "sde"])
def test_dpmpp_eta_0_is_diffusers_singlestep_2s(name, n, sampler):
    """At eta = 0 both are DPM-Solver++(2S) with r = 1/2. diffusers' singlestep scheduler of order 2 pairs grid
    intervals, a first-order stage to the inner point then a second-order one from the pair's start with
    D0 + (1 / 2 r0)(D(inner) - D0), r0 the inner point's share of the step in lambda: on a grid whose inner points
    are the log-s midpoints (r0 = 1/2) that is D(inner), k-diffusion's step. Its grid can only hold integer
    timesteps, so its sigmas are set to that grid; its order list for 2n - 1 stages ([1, 2] ... [1]) is unchanged."""
    ref, sigmas, times = _midpoint_grid(name, n)
    ref.set_timesteps(2 * n - 1)
    assert ref.order_list == [1, 2] * (n - 1) + [1]
    ref.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    ref.set_begin_index(0)
    x, traj = _noise(), [_noise()]
    for j, t in enumerate(times):
        x = ref.step(eps_fn(x, torch.tensor(t)), t, x).prev_sample
        if j % 2 == 1 or j == len(times) - 1:
            traj.append(x)
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    _assert_trajectories_close(_ours(sampler, name, ts, _noise(), eta=0.0), traj)


def _kdiff_denoiser(name):
    """k-diffusion's view of our eps model: D(y, s) = y - s eps(y / sqrt(1 + s^2), t(s)), t(s) by diffusers'
    interpolation."""
    ref, _, _ = _midpoint_grid(name, 1)
    ac = _alphas_cumprod(name).numpy()
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)

    def model(y, s):
        t = torch.tensor(float(ref._sigma_to_t(np.array(s), log_sigmas)), dtype=torch.float64)
        return y - s * eps_fn(y / math.sqrt(1 + s ** 2), t)
    return model, log_sigmas


def _get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """k-diffusion's get_ancestral_step, verbatim but for floats."""
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _kdiff_dpmpp_2s_ancestral(model, x, sigmas, noise_sampler):
    """k-diffusion's sample_dpmpp_2s_ancestral (eta = s_noise = 1), transcribed."""
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda sigma: -math.log(sigma))
    traj = [x]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _get_ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        traj.append(x)
    return traj


def _kdiff_dpmpp_sde(model, x, sigmas, noise_sampler):
    """k-diffusion's sample_dpmpp_sde (eta = s_noise = 1, r = 1/2), transcribed."""
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda sigma: -math.log(sigma))
    traj = [x]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h / 2
            sd, su = _get_ancestral_step(sigma_fn(t), sigma_fn(s))
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * su
            denoised_2 = model(x_2, sigma_fn(s))
            sd, su = _get_ancestral_step(sigma_fn(t), sigma_fn(t_next))
            t_next_ = t_fn(sd)
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_2
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * su
        traj.append(x)
    return traj


class _BrownianSteps:
    """A Brownian path in the noise level, the stand-in for k-diffusion's torchsde tree over one DPM++ SDE step:
    the call over [s_mid, s] draws the increment a of that interval and b of [s_next, s_mid] from the generator
    (our sampler's order of draws) and returns a / sqrt(len); the call over [s_next, s] returns (a + b) / sqrt(len)."""

    def __init__(self, generator, shape):
        self.gen, self.shape, self.first = generator, shape, None

    def __call__(self, sigma, sigma_next):
        if self.first is None:
            a, b = (torch.randn(self.shape, generator=self.gen, dtype=torch.float64) for _ in range(2))
            self.first = (a * math.sqrt(sigma - sigma_next), b, sigma_next)
            return a
        a, b, s_mid = self.first
        self.first = None
        return (a + b * math.sqrt(s_mid - sigma_next)) / math.sqrt(sigma - sigma_next)


@pytest.mark.parametrize("name", ["scaled_linear", "cosine"])
@pytest.mark.parametrize("n", [1, 2, 10])
@pytest.mark.parametrize("which", ["dpmpp_2s_ancestral", "dpmpp_sde"])
def test_ancestral_dpmpp_match_kdiffusion(name, n, which):
    """eta = 1 against k-diffusion's functions transcribed in VE sigmas (from diffusers' alphas_cumprod), same draws."""
    model, log_sigmas = _kdiff_denoiser(name)
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    sigmas = [float(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))) for t in ts[:-1]] + [0.0]
    gen = torch.Generator().manual_seed(1)
    if which == "dpmpp_sde":
        ref = _kdiff_dpmpp_sde(model, _noise() * math.hypot(1, sigmas[0]), sigmas, _BrownianSteps(gen, _noise().shape))
    else:
        draw = lambda *_: torch.randn(_noise().shape, generator=gen, dtype=torch.float64)   # noqa: E731
        ref = _kdiff_dpmpp_2s_ancestral(model, _noise() * math.hypot(1, sigmas[0]), sigmas, draw)
    ref = [y / math.hypot(1, s) for y, s in zip(ref, sigmas)]
    ours = _ours(NEW[which], name, ts, _noise(), generator=torch.Generator().manual_seed(1))
    _assert_trajectories_close(ours, ref)


def test_eta_0_limits():
    """dpm_2_ancestral at eta = 0 is dpm_2; dpmpp_sde at eta = 0 is dpmpp_2s_ancestral at eta = 0; bad eta refused."""
    sched = make_schedule("scaled_linear")
    ts = sched.timesteps(7)
    model = lambda x, t: torch.tanh(x) * 0.7   # noqa: E731
    run = lambda f, **kw: f(model, _noise(), ts, sched, disable=True, **kw)   # noqa: E731
    torch.testing.assert_close(run(sample_dpm_2_ancestral, eta=0.0), run(sample_dpm_2), atol=0, rtol=0)
    torch.testing.assert_close(run(sample_dpmpp_sde, eta=0.0), run(sample_dpmpp_2s_ancestral, eta=0.0), atol=0, rtol=0)
    for f in (sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_sde):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            run(f, eta=1.5)
    with pytest.raises(ValueError, match="LMS order"):
        run(sample_lms, order=0)
    with pytest.raises(ValueError, match="DEIS order"):
        run(sample_deis, order=4)


@pytest.mark.parametrize("which", ["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"])
@pytest.mark.parametrize("name, kw", [("scaled_linear", {}), ("rectified_flow", {})], ids=["vp", "rectified_flow"])
def test_ancestral_noise_keeps_the_marginals_of_data_at_zero(which, name, kw):
    """Data all at 0: D = 0 is the exact denoiser and x_t ~ N(0, sigma_t^2) exactly at every time, so each step's
    output, and each midpoint the net sees, must have variance sigma^2 there (the s_down / s_up split; on rectified
    flow also the pure-noise first step). 200k draws: the variance's standard error is 0.3%."""
    sched = make_schedule(name, **kw)
    ts = sched.timesteps(5)
    seen = []                                          # (t, var) of every net input
    def model(x, t):
        seen.append((float(t[0]), x.var().item()))
        return torch.zeros_like(x)
    sigma0 = float(sched.alpha_sigma(ts[0])[1])
    x = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma0
    NEW[which](model, x, ts, sched, disable=True, generator=torch.Generator().manual_seed(1))
    assert len(seen) > len(ts) - 1                     # midpoints included
    for t, var in seen:
        assert var == pytest.approx(float(sched.alpha_sigma(t)[1]) ** 2, rel=0.02), t


def test_dpmpp_sde_noises_are_one_brownian_path():
    """DPM++ SDE's two noises in a step are increments of one Brownian motion in s over [s_mid, s] and [s_next, s]:
    correlation sqrt((s - s_mid) / (s - s_next)), each of unit variance. Read back from what the net sees (D = 0:
    y_mid = (s_down / s) y + s_up z1) and from the step's output (y' = (s_down' / s) y + s_up' z2)."""
    sched = make_schedule("scaled_linear")
    ts = sched.timesteps(2, final="t_min")             # two SDE steps, both with a midpoint
    inputs = {}
    def model(x, t):
        inputs[float(t[0])] = x.clone()
        return torch.zeros_like(x)
    y0 = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, sg = (float(c) for c in sched.alpha_sigma(ts[0]))
    x1 = sample_dpmpp_sde(model, y0 * sg, ts[:2], sched, disable=True, generator=torch.Generator().manual_seed(1))
    (t0, _), (t_mid, x_mid) = sorted(inputs.items(), reverse=True)
    s = sg / a
    a_mid, sg_mid = (float(c) for c in sched.alpha_sigma(t_mid))
    a1, sg1 = (float(c) for c in sched.alpha_sigma(ts[1]))
    s_mid, s1 = sg_mid / a_mid, sg1 / a1
    y = y0 * s                                          # x / alpha at the start: data 0 plus s times noise
    def split(s_to):                                    # k-diffusion's get_ancestral_step, eta = 1
        up = math.sqrt(s_to ** 2 * (s ** 2 - s_to ** 2) / s ** 2)
        return math.sqrt(s_to ** 2 - up ** 2), up
    (d1, u1), (d2, u2) = split(s_mid), split(s1)
    z1 = (x_mid / a_mid - d1 / s * y) / u1
    z2 = (x1 / a1 - d2 / s * y) / u2
    assert z1.var().item() == pytest.approx(1, rel=0.01) and z2.var().item() == pytest.approx(1, rel=0.01)
    corr = torch.corrcoef(torch.stack([z1, z2]))[0, 1].item()
    assert corr == pytest.approx(math.sqrt((s - s_mid) / (s - s1)), abs=0.005)
    assert abs(torch.corrcoef(torch.stack([z1, y0]))[0, 1].item()) < 0.005


@functools.lru_cache(maxsize=2)
def _mixture_problem(name):
    """(model, schedule, start, exact end): a 1-D two-Gaussian mixture's probability-flow ODE, whose x0-hat is
    closed-form, solved by 2000 DPM-Solver++(2M) steps."""
    gmm = GaussianMixture(weights=torch.tensor([0.4, 0.6], dtype=torch.float64),
                          means=torch.tensor([[-1.0], [1.5]], dtype=torch.float64),
                          stds=torch.tensor([0.3, 0.5], dtype=torch.float64))
    sched = make_schedule(name)
    x = initial_noise(sched, sched.timesteps(2), (256, 1), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    model = gmm.model(sched)
    return model, sched, x, sample_dpmpp_2m(model, x, sched.timesteps(2000), sched, disable=True)


def _gmm_error(name, sampler, n, **kw):
    model, sched, x, exact = _mixture_problem(name)
    return (sampler(model, x, sched.timesteps(n), sched, disable=True, **kw) - exact).abs().mean().item()


@pytest.mark.parametrize("name", ["cosine_logsnr", "rectified_flow"])
@pytest.mark.parametrize("which, kw", [("lms", {}), ("dpm_2", {}), ("dpmpp_2s_ancestral", {"eta": 0.0}),
                                      ("deis", {}), ("deis", {"order": 3})],
                         ids=["lms", "dpm_2", "dpmpp_2s", "deis", "deis-order3"])
def test_ode_samplers_converge_faster_than_first_order(name, which, kw):
    """Halving the step (20 -> 40 steps) cuts the error by more than 2.5x (DDIM: 2x), on rectified flow too, whose
    first step starts at alpha = 0 (the pure-noise limit step, left out of LMS's history)."""
    assert _gmm_error(name, NEW[which], 20, **kw) > 2.5 * _gmm_error(name, NEW[which], 40, **kw)


def test_registered_and_finite_from_zero_snr():
    assert all(SAMPLERS[name] is f for name, f in NEW.items())
    sched = make_schedule("scaled_linear", zero_snr=True)
    ts = sched.timesteps(6)
    assert float(sched.alpha_sigma(ts[0])[0]) == 0.0
    calls = []
    model = lambda x, t: calls.append(t) or torch.tanh(x)   # noqa: E731
    for name, f in NEW.items():
        calls.clear()
        out = f(model, _noise(), ts, sched, disable=True, generator=torch.Generator().manual_seed(0))
        assert out.isfinite().all(), name
        # the single-step second-order samplers: one call on the first step (pure noise) and the last, else two
        assert len(calls) == (6 if name in ("lms", "deis") else 2 * 6 - 2), name


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 2, 5, 20])     # 20: no lower-order steps at the end (diffusers: from 15 steps)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(name, n, order):
    """DEISMultistepScheduler (log-rho) ends at t = 0's sigma, not 0: our grid with final="t_min". Its sigma table in
    float64 (`_alphas_cumprod`)."""
    beta_schedule, kw = BETAS[name]
    ref = DEISMultistepScheduler(beta_schedule=beta_schedule, solver_order=order, timestep_spacing="trailing", **kw)
    ref.set_timesteps(n)
    sigmas = ((1 - _alphas_cumprod(name)) / _alphas_cumprod(name)).sqrt()
    ref.sigmas = torch.cat([sigmas[ref.timesteps], sigmas[:1]])
    x, traj = _noise(), [_noise()]
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t), t, x).prev_sample
        traj.append(x)
    ts = make_schedule(name).timesteps(n, spacing="trailing", final="t_min")
    torch.testing.assert_close(ts[:-1], ref.timesteps.double())
    _assert_trajectories_close(_ours(sample_deis, name, ts, _noise(), order=order), traj)
