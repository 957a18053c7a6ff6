"""The ays grid (Align Your Steps, Sabour et al. 2024) against NVIDIA's published 10-step timesteps and diffusers'
AysSchedules, its log-linear interpolation against closed forms, and the kl_optimal grid against its formula."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers.schedulers import AysSchedules

from ldm.diffusion.schedules import AYS_LEVELS, SPACINGS, ays_levels, make_schedule
from ldm.models.unet import UNet, tiny_config
from ldm.pipeline import TextToImage, save_random_model

# research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html: the 10-step schedules as SD's timesteps
NVIDIA_TIMESTEPS = {"sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0],
                    "sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0]}
DIFFUSERS_NAMES = {"sd15": "StableDiffusion", "sdxl": "StableDiffusionXL"}


def _s(schedule, ts):
    alpha, sigma = schedule.alpha_sigma(ts)
    return (sigma / alpha).numpy()


def _ays(schedule, model: str):
    schedule.ays_model = model
    return schedule


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ten_steps_land_on_nvidias_timesteps(model):
    """On SD's scaled_linear schedule the 10-step grid is NVIDIA's timestep list; its final t_min is their last 0."""
    sched = _ays(make_schedule("scaled_linear"), model)
    ts = sched.timesteps(10, spacing="ays", final="t_min")
    np.testing.assert_allclose(ts.numpy(), NVIDIA_TIMESTEPS[model], atol=1e-6, rtol=0)
    assert NVIDIA_TIMESTEPS[model][:-1] == AysSchedules[DIFFUSERS_NAMES[model] + "Timesteps"]
    assert float(sched.timesteps(10, spacing="ays")[-1]) < 0          # default final: clean data, as diffusers' 0.0


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ten_step_levels_match_diffusers_sigmas(model):
    """diffusers' 3-decimal sigma lists (their last, 0.0, is the clean final entry; the levels before NVIDIA rounded
    them to integer timesteps) within 0.0035."""
    sched = _ays(make_schedule("scaled_linear"), model)
    ref = AysSchedules[DIFFUSERS_NAMES[model] + "Sigmas"]
    np.testing.assert_allclose(_s(sched, sched.timesteps(10, spacing="ays")[:-1]), ref[:-1], rtol=0, atol=3.5e-3)
    np.testing.assert_allclose(AYS_LEVELS[model][:-1], ref[:-1], rtol=0, atol=3.5e-3)


def _nvidia_loglinear_interp(t_steps, num_steps):
    """The how-to's loglinear_interp as written there: ascending log values interpolated, then reversed."""
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num_steps), xs, ys))[::-1]


@pytest.mark.parametrize("n", [1, 4, 8, 16, 25])
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_other_step_counts_interpolate_log_linearly(n, model):
    """n + 1 levels by NVIDIA's loglinear_interp (ComfyUI: steps + 1 of them, the last replaced by 0)."""
    levels = np.asarray(AYS_LEVELS[model])
    np.testing.assert_allclose(ays_levels(n, model), _nvidia_loglinear_interp(levels, n + 1), rtol=1e-12, atol=0)
    sched = _ays(make_schedule("scaled_linear"), model)
    s = _s(sched, sched.timesteps(n, spacing="ays")[:-1])
    np.testing.assert_allclose(s, _nvidia_loglinear_interp(levels, n + 1)[:n], rtol=1e-9, atol=0)


def test_twenty_steps_are_the_list_and_its_geometric_midpoints():
    """Closed form at 20 steps: the 21 positions j/20 hold the list at even j and sqrt(L_i L_(i+1)) between."""
    levels = np.asarray(AYS_LEVELS["sd15"])
    got = ays_levels(20)
    np.testing.assert_allclose(got[::2], levels, rtol=1e-13)
    np.testing.assert_allclose(got[1::2], np.sqrt(levels[:-1] * levels[1:]), rtol=1e-13)


def test_a_wider_schedule_takes_the_levels_as_they_are():
    """The shipped teacher's cosine_logsnr (s up to 22026) starts at SD's 14.6, not stretched to its range."""
    sched = make_schedule("cosine_logsnr")
    ts = sched.timesteps(10, spacing="ays")
    np.testing.assert_allclose(_s(sched, ts[:-1]), AYS_LEVELS["sd15"][:-1], rtol=1e-9)
    # cosine_logsnr's exact inverse: t = (2 / pi) atan(s)
    np.testing.assert_allclose(ts[:-1].numpy(), 2 / math.pi * np.arctan(AYS_LEVELS["sd15"][:-1]), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 16, 30])
@pytest.mark.parametrize("name", ["scaled_linear", "cosine_logsnr"])
def test_kl_optimal_closed_form(n, name):
    """s_i = tan((1 - i/(n-1)) atan(s_max) + i/(n-1) atan(s_min)): evenly spaced in atan(s) between the
    schedule's ends cut to [0.002, 80] (SD's 0.0292-14.61 lie inside, so on SD it is ComfyUI's grid)."""
    sched = make_schedule(name)
    ts = sched.timesteps(n, spacing="kl_optimal")
    s_min, s_max = (float(v) for v in _s(sched, torch.tensor([0.0, sched.t_max])))
    s_min, s_max = max(s_min, 0.002), min(s_max, 80.0)
    u = np.arange(n) / max(n - 1, 1)
    ref = np.tan((1 - u) * np.arctan(s_max) + u * np.arctan(s_min))
    np.testing.assert_allclose(_s(sched, ts[:-1]), ref, rtol=1e-6 if name == "scaled_linear" else 1e-9)
    assert float(ts[-1]) < 0


VP_VE = [("scaled_linear", {}), ("cosine_logsnr", {}), ("linear", {}), ("cosine", {}), ("ve", {}),
         ("scaled_linear", {"zero_snr": True})]


@pytest.mark.parametrize("spacing, name, options", [("ays", *case) for case in VP_VE] +
                         [("kl_optimal", *case) for case in VP_VE + [("rectified_flow", {})]])
def test_grids_fall_strictly(spacing, name, options):
    sched = make_schedule(name, **options)
    for n in range(1, 31):
        ts = sched.timesteps(n, spacing=spacing).numpy()
        assert len(ts) == n + 1 and np.all(np.diff(ts) < 0), (n, ts)


def test_ays_refusals():
    with pytest.raises(ValueError, match="rectified-flow model has no published list"):
        make_schedule("rectified_flow").timesteps(8, spacing="ays")
    with pytest.raises(ValueError, match=r"covers only \[0.01, 10\]"):
        make_schedule("ve", sigma_max=10.0).timesteps(8, spacing="ays")
    with pytest.raises(ValueError, match="steps_offset does not apply to the ays spacing"):
        make_schedule("scaled_linear").timesteps(8, spacing="ays", steps_offset=1)
    with pytest.raises(ValueError, match="AYS model must be one of"):
        ays_levels(8, "svd")
    assert {"ays", "kl_optimal"} <= set(SPACINGS)


def test_the_pipeline_gives_an_sdxl_unet_the_sdxl_list(tmp_path):
    """A U-Net with SDXL's text_time conditioning samples on the SDXL list, any other on SD 1.5's."""
    save_random_model(str(tmp_path))
    plain = TextToImage.from_folder(str(tmp_path))
    index = dataclasses.replace(plain.index, schedule={"name": "scaled_linear"})
    for unet, model in ((plain.unet, "sd15"),
                        (UNet(tiny_config(added_cond="text_time", added_in_dim=32 + 6 * 8, added_id_dim=8)), "sdxl")):
        pipe = TextToImage(plain.autoencoder, plain.text_encoder, unet, index)
        ts = pipe.schedule.timesteps(10, spacing="ays", final="t_min")
        np.testing.assert_allclose(ts.numpy(), NVIDIA_TIMESTEPS[model], atol=1e-6)
