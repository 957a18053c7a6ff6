"""CFG++ samplers (ldm.diffusion.cfgpp; Chung et al. 2024) against ComfyUI's sample_*_cfg_pp transcribed below in
k-diffusion's sigma space (the VP-SD schedule, x = y / sqrt(1 + s^2)), on a toy x0 model whose conditional and
unconditional predictions differ; equal to their plain twins when the two predictions agree, on any schedule; the
guidance scale lambda = 1 + w; models without the unconditional path refused."""
import math

import pytest
import torch

from ldm.diffusion.guidance import cfg, edm_sigma
from ldm.diffusion.param import append_dims
from ldm.diffusion.samplers import CFG_PP_SAMPLERS, ETA_OPTIONS, SAMPLERS, initial_noise
from ldm.diffusion.schedules import make_schedule

SHAPE = (3, 2, 5)
M_UNCOND = torch.linspace(-0.5, 0.4, 30, dtype=torch.float64).reshape(1, *SHAPE)


def _mean(batch: int, seed: int = 5):
    """Per-sample data means m: the toy's conditioning."""
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def toy(schedule):
    """x0-hat of data ~ N(m, I) under x_t = alpha x0 + sigma eps, m + alpha (x - alpha m) / (alpha^2 + sigma^2), plus a
    nonlinear term sigma tanh(x) / 10; finite at alpha = 0 (pure noise)."""
    def model(x, t, m):
        alpha, sigma = (append_dims(c.to(x.dtype), x.ndim) for c in schedule.alpha_sigma(t))
        return m + alpha * (x - alpha * m) / (alpha ** 2 + sigma ** 2) + 0.1 * sigma * torch.tanh(x)
    return model


def toy_ve(y, s, m):
    """The same toy as a function of k-diffusion's y = x / alpha and s = sigma / alpha on a VP schedule
    (alpha = 1 / sqrt(1 + s^2), sigma = s alpha), written independently of `toy`."""
    r = math.sqrt(1 + s * s)
    return m + (y - m) / (1 + s * s) + 0.1 * (s / r) * torch.tanh(y / r)


# ----------------------------------------------------------------------------- ComfyUI, transcribed
# comfy/k_diffusion/sampling.py: sample_euler_cfg_pp, sample_euler_ancestral_cfg_pp, sample_dpmpp_2m_cfg_pp,
# sample_dpmpp_2s_ancestral_cfg_pp; `denoise(x, sigma)` returns (denoised, uncond_denoised), what ComfyUI's
# post-CFG hook captures (temp[0]); ComfyUI's denoised = uncond + cfg_scale (cond - uncond).

def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def comfy_euler_cfg_pp(denoise, x, sigmas, states):
    for i in range(len(sigmas) - 1):
        states.append(x)
        denoised, uncond_denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], uncond_denoised)
        x = denoised + d * sigmas[i + 1]
    return x


def comfy_euler_ancestral_cfg_pp(denoise, x, sigmas, states, eta, noise_sampler):
    for i in range(len(sigmas) - 1):
        states.append(x)
        denoised, uncond_denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], uncond_denoised)
        x = denoised + d * sigma_down
        if sigmas[i + 1] > 0:
            x = x + noise_sampler() * sigma_up
    return x


def comfy_dpmpp_2m_cfg_pp(denoise, x, sigmas, states):
    t_fn = lambda sigma: sigma.log().neg()   # noqa: E731
    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        states.append(x)
        denoised, uncond_denoised = denoise(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


def comfy_dpmpp_2s_ancestral_cfg_pp(denoise, x, sigmas, states, eta, noise_sampler):
    sigma_fn = lambda t: t.neg().exp()       # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()   # noqa: E731
    for i in range(len(sigmas) - 1):
        states.append(x)
        denoised, uncond_denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        noise = noise_sampler() if sigmas[i + 1] > 0 else None   # ComfyUI draws after the midpoint call; the toy
        if sigma_down == 0:                                       # draws nothing, so the order is the same
            d = to_d(x, sigmas[i], uncond_denoised)
            x = denoised + d * sigma_down
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * (x + (denoised - uncond_denoised)) - (-h * r).expm1() * denoised
            denoised_2 = denoise(x_2, sigma_fn(s))[0]
            x = (sigma_fn(t_next) / sigma_fn(t)) * (x + (denoised - uncond_denoised)) - (-h).expm1() * denoised_2
        if noise is not None:
            x = x + noise * sigma_up
    return x


COMFY = {"euler_cfg_pp": comfy_euler_cfg_pp, "euler_ancestral_cfg_pp": comfy_euler_ancestral_cfg_pp,
         "dpmpp_2m_cfg_pp": comfy_dpmpp_2m_cfg_pp, "dpmpp_2s_ancestral_cfg_pp": comfy_dpmpp_2s_ancestral_cfg_pp}


@pytest.mark.parametrize("w", [-0.4, 0.0, 2.0])           # lambda 0.6 (the paper's range), 1, 3
@pytest.mark.parametrize("name", sorted(COMFY))
def test_matches_comfyui_step_for_step(name, w):
    sched = make_schedule("scaled_linear")                 # SD's VP schedule
    ts = sched.timesteps(7)
    x = initial_noise(sched, ts, (2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = _mean(2)
    options = {"eta": 0.7} if name in ETA_OPTIONS else {}
    ours = []
    out = SAMPLERS[name](cfg(toy(sched), w, {"m": M_UNCOND}), x, ts, sched, extra_args={"m": m}, disable=True,
                         generator=torch.Generator().manual_seed(1),
                         callback=lambda d: ours.append(d["x"] / float(sched.alpha_sigma(d["t"])[0])), **options)

    lam = 1 + w                                            # ComfyUI's cfg scale

    def denoise(y, s):
        s = float(s)
        cond, uncond = toy_ve(y, s, m), toy_ve(y, s, M_UNCOND)
        return uncond + lam * (cond - uncond), uncond

    alpha, sigma = (c.double() for c in sched.alpha_sigma(ts[:-1]))
    sigmas = torch.cat([sigma / alpha, torch.zeros(1, dtype=torch.float64)])     # k-diffusion's sigmas, then 0
    gen = torch.Generator().manual_seed(1)
    noise = {"noise_sampler": lambda: torch.randn(x.shape, generator=gen, dtype=x.dtype)} if options else {}
    states = []
    ref = COMFY[name](denoise, x / alpha[0], sigmas, states, **options, **noise)
    assert len(ours) == len(states) == 7
    for i, (a, b) in enumerate(zip(ours, states)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda msg: f"step {i}: {msg}")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)        # at the end alpha = 1: x = y


TWINS = [("euler_cfg_pp", "euler", {}), ("euler_cfg_pp", "ddim", {}), ("dpmpp_2m_cfg_pp", "dpmpp_2m", {}),
         ("euler_ancestral_cfg_pp", "euler_a", {}),                 # euler_a: eta 1, the default
         ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral", {"eta": 0.6}),
         ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral", {"eta": 0.0})]
SCHEDULES = {"vp_sd": ("scaled_linear", {}), "zero_snr": ("scaled_linear", {"zero_snr": True}),
             "rectified_flow": ("rectified_flow", {"shift": 3.0}), "cosine": ("cosine", {})}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("cfg_pp, plain, options", TWINS)
def test_equals_its_plain_twin_when_cond_and_uncond_agree(cfg_pp, plain, options, schedule):
    """The unconditional and conditional halves the same network output (uncond = cond): CFG++'s eps_u is the guided
    eps, so each CFG++ sampler is its plain sampler, on VP, zero terminal SNR (alpha = 0 at the start) and rectified
    flow (alpha = 0 at t = 1) alike."""
    name, kwargs = SCHEDULES[schedule]
    sched = make_schedule(name, **kwargs)
    ts = sched.timesteps(6)
    x = initial_noise(sched, ts, (2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = _mean(2)
    runs = []
    for sampler in (cfg_pp, plain):
        model = cfg(toy(sched), 1.5, {"m": m})
        runs.append(SAMPLERS[sampler](model, x, ts, sched, extra_args={"m": m}, disable=True,
                                      generator=torch.Generator().manual_seed(2), **options))
    assert bool(torch.isfinite(runs[0]).all())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-10)


def test_the_guidance_scale_is_one_plus_w():
    """w = -1 (the paper's lambda = 0) is the unconditional model: CFG++ then equals the plain sampler on model(uncond)
    alone; at w = 0 (lambda = 1) its x0-hat is the conditional one, unlike CFG's renoising direction, so it differs
    from the plain conditional sampler."""
    sched = make_schedule("scaled_linear")
    ts = sched.timesteps(5)
    x = initial_noise(sched, ts, (2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = _mean(2)
    net = toy(sched)
    run = lambda sampler, model, c: SAMPLERS[sampler](model, x, ts, sched, extra_args={"m": c}, disable=True)  # noqa
    for cfg_pp, plain in (("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m")):
        torch.testing.assert_close(run(cfg_pp, cfg(net, -1.0, {"m": M_UNCOND}), m),
                                   run(plain, net, M_UNCOND.expand(2, *SHAPE)), rtol=1e-10, atol=1e-10)
        at_zero = run(cfg_pp, cfg(net, 0.0, {"m": M_UNCOND}), m)
        assert (at_zero - run(plain, net, m)).abs().max() > 1e-3


def test_the_unconditional_pass_runs_at_w_0():
    """CFG's w = 0 shortcut (one pass of B) is off for CFG++: guided_and_uncond runs both halves."""
    sched = make_schedule("scaled_linear")
    batches = []

    def net(x, t, m):
        batches.append(x.shape[0])
        return toy(sched)(x, t, m)

    ts = sched.timesteps(3)
    x = initial_noise(sched, ts, (2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    SAMPLERS["euler_cfg_pp"](cfg(net, 0.0, {"m": M_UNCOND}), x, ts, sched, extra_args={"m": _mean(2)}, disable=True)
    assert batches == [4, 4, 4]


@pytest.mark.parametrize("name", sorted(CFG_PP_SAMPLERS))
def test_refuses_a_model_without_the_unconditional_path(name):
    sched = make_schedule("scaled_linear")
    ts = sched.timesteps(3)
    x = torch.zeros(1, *SHAPE, dtype=torch.float64)
    interval = cfg(toy(sched), 2.0, {"m": M_UNCOND}, interval=(0.5, 5.0), noise_level=edm_sigma(sched))
    for model in (toy(sched), interval):        # a student-like plain x0 model; CFG limited to an interval
        with pytest.raises(ValueError, match=f"{name} \\(CFG\\+\\+\\) needs the unconditional prediction"):
            SAMPLERS[name](model, x, ts, sched, extra_args={"m": _mean(1)}, disable=True)


def test_eta_is_checked_and_registered():
    assert ETA_OPTIONS["euler_ancestral_cfg_pp"] == ETA_OPTIONS["dpmpp_2s_ancestral_cfg_pp"] == "eta"
    assert "euler_cfg_pp" not in ETA_OPTIONS and "dpmpp_2m_cfg_pp" not in ETA_OPTIONS
    sched = make_schedule("scaled_linear")
    with pytest.raises(ValueError, match="eta must be in"):
        SAMPLERS["euler_ancestral_cfg_pp"](cfg(toy(sched), 1.0, {"m": M_UNCOND}), torch.zeros(1, *SHAPE),
                                           sched.timesteps(2), sched, extra_args={"m": _mean(1)}, eta=1.5)
