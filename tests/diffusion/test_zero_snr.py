"""Zero terminal SNR and guidance rescale (Lin et al. 2024) against diffusers and closed forms."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm.diffusion.guidance import cfg, rescale_guided
from ldm.diffusion.losses import DiffusionLoss
from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import SAMPLERS, sample_ddim, sample_ddpm
from ldm.diffusion.schedules import make_schedule

T = 1000
DISCRETE = {"linear": ("linear", {}), "scaled_linear": ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
            "cosine": ("squaredcos_cap_v2", {})}


def v_fn(x, t):
    """An analytic v predictor: nonlinear in x, depends on t."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return torch.tanh(x) * 0.8 - 0.2 * x * t / T


def _noise(seed=0):
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", DISCRETE)
def test_rescaled_betas_match_diffusers(name):
    beta_schedule, kw = DISCRETE[name]
    ref = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=True, **kw).alphas_cumprod.double()
    ours, plain = make_schedule(name, zero_snr=True), make_schedule(name)
    torch.testing.assert_close(ours.alphas_cumprod, ref, atol=1e-6, rtol=0)
    assert ours.zero_terminal_snr and not plain.zero_terminal_snr
    assert float(ours.alphas_cumprod[-1]) == 0.0 and float(plain.alphas_cumprod[-1]) > 0
    # Alg. 1 keeps the first step: sqrt(alpha_bar_0) is shifted and scaled back to itself
    assert float(ours.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)
    alpha, sigma = ours.alpha_sigma(torch.tensor([0.0, 500.0, 999.0]))
    assert (float(alpha[-1]), float(sigma[-1])) == (0.0, 1.0)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(3, dtype=torch.float64))


def test_the_last_interval_is_continuous_and_invertible():
    """Between T-2 and T-1 log-SNR falls to -inf (alpha_bar linear to 0): no nan, monotone, inverted exactly."""
    sched = make_schedule("scaled_linear", zero_snr=True)
    t = torch.linspace(T - 3, T - 1, 81, dtype=torch.float64)
    lam = sched.logsnr(t)
    assert not bool(lam.isnan().any()) and lam[-1] == -math.inf and bool(lam[:-1].isfinite().all())
    assert bool((lam.diff() < 0).all())
    ac = sched.alphas_cumprod
    torch.testing.assert_close(sched.logsnr(torch.tensor([997.0, 998.0])), torch.log(ac[-3:-1] / (1 - ac[-3:-1])))
    alpha, _ = sched.alpha_sigma(torch.tensor(998.25, dtype=torch.float64))
    assert float(alpha) ** 2 == pytest.approx(0.75 * float(ac[-2]), rel=1e-12)
    inside = torch.cat([torch.linspace(0, T - 1, 37, dtype=torch.float64), t])
    back = sched.t_from_logsnr(sched.logsnr(inside).numpy())
    torch.testing.assert_close(torch.as_tensor(back), inside, atol=1e-6, rtol=0)


def test_eps_prediction_is_refused_on_a_zero_snr_schedule():
    sched = make_schedule("scaled_linear", zero_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR schedule needs prediction 'v', 'x0' or 'flow'"):
        Denoiser(v_fn, sched, "eps")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusionLoss(sched, "eps", time="discrete")
    Denoiser(v_fn, make_schedule("scaled_linear"), "eps")        # the plain schedule keeps eps
    loss = DiffusionLoss(sched, "v", time="discrete")            # v trains at t = T-1 too: target -x0
    x0 = torch.randn(8, 2, 3, 3)
    assert math.isfinite(float(loss(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(0))))


def _ours(sampler, ts, x, **kw):
    sched = make_schedule("scaled_linear", zero_snr=True)
    xs = []
    out = sampler(Denoiser(v_fn, sched, "v"), x, ts, sched, disable=True, callback=lambda d: xs.append(d["x"]), **kw)
    return xs + [out]


@pytest.mark.parametrize("n", [1, 4, 25])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_match_diffusers_from_pure_noise(sampler, n):
    """The first step starts at alpha = 0, x0-hat = -v: DDIM and DDPM as diffusers' zero-SNR schedulers."""
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    options = {"set_alpha_to_one": True} if sampler == "ddim" else {"variance_type": "fixed_small"}
    ref = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
              timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False, **options)
    ref.set_timesteps(n)
    assert int(ref.timesteps[0]) == T - 1
    x, gen = _noise(), torch.Generator().manual_seed(1)
    traj = [x]
    for t in ref.timesteps:
        x = ref.step(v_fn(x, t), t, x, generator=gen).prev_sample.double()
        traj.append(x)
    ts = make_schedule("scaled_linear", zero_snr=True).timesteps(n)
    fn = sample_ddim if sampler == "ddim" else sample_ddpm
    ours = _ours(fn, ts, _noise(), generator=torch.Generator().manual_seed(1))
    assert len(ours) == len(traj)
    for i, (a, b) in enumerate(zip(ours, traj)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_ode_samplers_step_from_infinite_noise_as_their_limit(name):
    """At alpha = 0 (s = sigma/alpha = inf) Euler's y + (s' - s)(y - D)/s tends to the DDIM step: the first
    step of euler, heun and dpmpp_2m equals DDIM's, and the generic formula at alpha = 1e-9 is that limit."""
    sched = make_schedule("scaled_linear", zero_snr=True)
    ts = sched.timesteps(6)
    first = [_ours(SAMPLERS[n], ts, _noise())[1] for n in ("ddim", name)]
    torch.testing.assert_close(first[1], first[0], atol=1e-12, rtol=0)
    x = _noise()
    a_next, s_next = (float(c) for c in sched.alpha_sigma(ts[1]))
    a = 1e-9
    s = math.sqrt(1 - a * a)
    denoised = a * x - s * v_fn(x, ts[0].expand(4))              # x0-hat of the v model, alpha = 1e-9
    y = x / a
    euler = a_next * (y + (s_next / a_next - s / a) * (y - denoised) / (s / a))
    torch.testing.assert_close(first[1], euler, atol=1e-6, rtol=0)
    out = _ours(SAMPLERS[name], ts, _noise())[-1]
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 0.5
    guided = cond + 6.5 * (cond - uncond)
    torch.testing.assert_close(rescale_guided(guided, cond, phi), rescale_noise_cfg(guided, cond, phi))
    rescaled = rescale_guided(guided, cond, 1.0)
    torch.testing.assert_close(rescaled.flatten(1).std(1), cond.flatten(1).std(1))   # eq. 15: cond's spread back


def test_cfg_rescales_its_model_space():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 4, 4, generator=g), torch.tensor([10.0, 900.0])
    ctx, null = torch.randn(2, 5, generator=g), torch.zeros(1, 5)

    def net(x, t, context):
        return torch.tanh(x * context[:, :1, None, None]) + context[:, 1:2, None, None]

    out = cfg(net, 3.0, {"context": null}, rescale=0.7)(x, t, context=ctx)
    cond, uncond = net(x, t, ctx), net(x, t, null.expand(2, 5))
    torch.testing.assert_close(out, rescale_noise_cfg(4 * cond - 3 * uncond, cond, 0.7))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="guidance rescale phi must be in"):
            cfg(net, 3.0, {"context": null}, rescale=bad)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde"])
def test_stochastic_samplers_start_from_pure_noise(name):
    """From alpha = 0 their first step is x0-hat at the next level plus fresh noise of that level's size."""
    sched = make_schedule("scaled_linear", zero_snr=True)
    ts = sched.timesteps(5)
    first = _ours(SAMPLERS[name], ts, _noise(), generator=torch.Generator().manual_seed(3))[1]
    a_next, s_next = (float(c) for c in sched.alpha_sigma(ts[1]))
    z = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    denoised = -v_fn(_noise(), ts[0].expand(4))                 # x0-hat = -v at alpha = 0
    torch.testing.assert_close(first, a_next * denoised + s_next * z, atol=1e-10, rtol=0)
    assert bool(torch.isfinite(_ours(SAMPLERS[name], ts, _noise(), generator=torch.Generator())[-1]).all())
