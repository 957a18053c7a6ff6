"""Prompt editing on SDXL and FLUX.1-dev (ldm.models.prompt_schedule): each step's text reaches the network as its
tokens and its pooled vector, against a hand-run DDIM whose model function switches both itself, counting calls;
tiny random diffusers pipelines converted to our folders (tests/models/sd_layouts.py). SDXL runs CFG against a
negative prompt; FLUX.1-dev its distilled guidance, one call a step."""
import pytest
import torch
from sd_layouts import write_flux_pipeline, write_sdxl_pipeline

from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.diffusion.schedules import shifted
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage

pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def pipe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    (write_sdxl_pipeline if request.param == "sdxl" else write_flux_pipeline)(folder)
    convert(str(folder / request.param), str(folder / "model"))
    pipe = TextToImage.from_folder(str(folder / "model"), decoder_precision="fp32")
    pipe.prompt_weights = True
    return pipe


def test_tokens_and_pooled_vector_switch_as_a_hand_run(pipe, one_thread):
    steps, seed, w = 4, 2, 3.0
    negative = "" if pipe.index.guidance_embed else "a green cube"      # FLUX.1-dev: no CFG, no negative
    prompts = ["a [red cube:blue sphere:0.5] on a floor", "a yellow lamp"]
    z, _ = pipe.sample(prompts, steps=steps, seed=seed, guidance=w, negative=negative)
    texts = [["a red cube on a floor", "a yellow lamp"]] * 2 + [["a blue sphere on a floor", "a yellow lamp"]] * 2
    chunks = pipe.prompt_chunks([*texts[0], *texts[-1], negative])
    shape = pipe.latent_shape(2)
    model, extra_args, _ = pipe.model_function(steps, w, negative=negative, chunks=chunks, shape=shape)
    shift = pipe.grid_shift(shape)                       # FLUX.1-dev: the grid shifted for the image's size
    ts = (pipe.schedule if shift is None else shifted(pipe.schedule, shift)).timesteps(steps, spacing="trailing")
    sizes = {"time_ids": pipe.size_ids(shape)} if "time_ids" in pipe.encode_prompts([""], chunks) else {}

    def hand_run(keys):
        """DDIM with call k's `keys` of extra_args taken from texts[k]'s encoding (others from texts[0]'s)."""
        conds = [{**pipe.encode_prompts(t, chunks), **sizes} for t in texts]
        calls = []

        def switching(x, t, **args):
            args = {**args, **{key: conds[len(calls)][key] for key in keys}}
            calls.append(t)
            return model(x, t, **args)
        x = initial_noise(pipe.schedule, ts, shape, generator=torch.Generator().manual_seed(seed))
        return sample_ddim(switching, x, ts, pipe.schedule, extra_args=extra_args(conds[0]), disable=True)

    both = hand_run(("context", "pooled"))
    err = (z - both).abs().max().item()
    assert err < 1e-5, err
    tokens_only = hand_run(("context",))                 # the pooled vector left at the first text's: it matters
    assert (z - tokens_only).abs().max() > 100 * max(err, 1e-6)
