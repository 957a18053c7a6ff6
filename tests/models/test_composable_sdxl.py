"""Composable prompts "a AND b :0.7" on SDXL (ldm.diffusion.composable): each sub-prompt's tokens and pooled vector
(and the drawn size's numbers) reach the net, against a hand-run DDIM whose model function computes Liu et al.
2022's conjunction from one net call a row; a tiny random diffusers pipeline converted to our folder
(tests/models/sd_layouts.py). FLUX.1-dev (guidance an input of the net) refuses AND."""
import pytest
import torch
from sd_layouts import write_flux_pipeline, write_sdxl_pipeline

from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage

pytest.importorskip("diffusers")


def load(tmp_path, kind):
    (write_sdxl_pipeline if kind == "sdxl" else write_flux_pipeline)(tmp_path)
    convert(str(tmp_path / kind), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    pipe.prompt_weights = True
    return pipe


def test_sdxl_sub_prompts_take_their_tokens_and_pooled_vectors(tmp_path, one_thread):
    pipe = load(tmp_path, "sdxl")
    steps, seed, w, negative = 3, 2, 3.0, "a green cube"
    parts = [("a red cube on a floor", 1.0), ("a blue sphere", 0.7)]
    z, info = pipe.sample(["a red cube on a floor AND a blue sphere :0.7"], steps=steps, seed=seed, guidance=w,
                          negative=negative)
    assert info["nfe"] == steps * 3
    shape = pipe.latent_shape(1)
    chunks = pipe.prompt_chunks([text for text, _ in parts] + [negative])
    ts = pipe.schedule.timesteps(steps, spacing="trailing")
    net = Denoiser(pipe.unet, pipe.schedule, pipe.index.prediction, time_scale=pipe.index.time_scale)
    sizes = {"time_ids": pipe.size_ids(shape)}

    def hand_run(pooled_from_negative: bool):
        u = {**pipe.encode_prompts([negative], chunks), **sizes}
        conds = [{**pipe.encode_prompts([text], chunks), **sizes} for text, _ in parts]
        if pooled_from_negative:                        # a wrong wiring: the test must be able to tell
            conds = [{**c, "pooled": u["pooled"]} for c in conds]

        def model(x, t, **_):
            d_u = net(x, t, **u)
            return d_u + sum(weight * (1 + w) * (net(x, t, **c) - d_u) for c, (_, weight) in zip(conds, parts))
        x = initial_noise(pipe.schedule, ts, shape, generator=torch.Generator().manual_seed(seed))
        return sample_ddim(model, x, ts, pipe.schedule, disable=True)
    err = (z - hand_run(False)).abs().max().item()         # float rounding only: these latents reach ~50, and
    assert err < 1e-5 * z.abs().max().item(), err           # plain CFG's own batched vs one-row runs differ by 6e-5
    assert (z - hand_run(True)).abs().max() > 100 * max(err, 1e-6)


def test_flux_dev_refuses_and(tmp_path, one_thread):
    pipe = load(tmp_path, "flux")
    with pytest.raises(ValueError, match="need a model with plain CFG.*FLUX.1-dev"):
        pipe.sample(["a red cube AND a blue sphere"], steps=2, seed=0)
