"""FLUX.1's IP-Adapter (ldm.models.ip_adapter_flux) against diffusers' FluxPipeline.load_ip_adapter: a tiny random
FLUX.1 of two double blocks, a random adapter file in XLabs' layout (flux-ip-adapter's key names), a tiny random CLIP
image encoder, the same image prompt: the same images."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_layouts import EMBED, FLUX_TRANSFORMER, flux_images, ip_image, write_flux_pipeline, write_image_encoder

from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage, save_random_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
PROMPTS = ["a red cube on a blue floor", "a cat"]


def write_xlabs_adapter(path, transformer, tokens=4):
    """A random FLUX.1 IP-Adapter for the diffusers `transformer`, keys as XLabs' ip_adapter.safetensors has them."""
    g = torch.Generator().manual_seed(3)
    dim, width = transformer.config.joint_attention_dim, transformer.inner_dim
    state = {"ip_adapter_proj_model.proj.weight": torch.randn(tokens * dim, EMBED, generator=g) * 0.3,
             "ip_adapter_proj_model.proj.bias": torch.randn(tokens * dim, generator=g) * 0.1,
             "ip_adapter_proj_model.norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
             "ip_adapter_proj_model.norm.bias": 0.1 * torch.randn(dim, generator=g)}
    for i in range(len(transformer.transformer_blocks)):
        for kv in "kv":
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            state[f"{name}.weight"] = torch.randn(width, dim, generator=g) * 0.3
            state[f"{name}.bias"] = torch.randn(width, generator=g) * 0.3
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX.1-dev with two double blocks (the adapter's block order counts), imported; its adapter, its
    image encoder."""
    folder = tmp_path_factory.mktemp("flux-ip")
    theirs = write_flux_pipeline(folder)
    torch.manual_seed(1)
    theirs.transformer = diffusers.FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": 2}, out_channels=64,
                                                          guidance_embeds=True)
    theirs.transformer.save_pretrained(str(folder / "flux" / "transformer"))
    convert(str(folder / "flux"), str(folder / "model"))
    adapter = write_xlabs_adapter(folder / "ip_adapter.safetensors", theirs.transformer)
    return theirs, folder / "model", adapter, write_image_encoder(folder / "image_encoder")


def with_flux_ip_adapter(theirs, encoder, adapter, scale: float):
    """diffusers' FluxPipeline on `theirs`' parts plus the image encoder, the adapter loaded by its load_ip_adapter."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    pipe = diffusers.FluxPipeline(**{**theirs.components,
                                     "image_encoder": CLIPVisionModelWithProjection.from_pretrained(str(encoder)),
                                     "feature_extractor": CLIPImageProcessor.from_pretrained(str(encoder))})
    pipe.load_ip_adapter(str(adapter.parent), weight_name=adapter.name,
                         image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_prompt_draws_what_diffusers_draws(flux, one_thread):
    """FLUX.1-dev, one call a step (diffusers' true_cfg_scale 1, its default): the image prompt's attention in every
    double block, scaled; no image prompt, or scale 0: the plain net."""
    theirs, model, adapter, encoder = flux
    image = ip_image()
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    plain, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    pipe.add_ip_adapter(str(adapter), str(encoder), scale=0.7)
    ours, info = pipe.generate(PROMPTS, steps=3, seed=0, ip_image=image)
    assert info["nfe"] == 3
    reference = flux_images(with_flux_ip_adapter(theirs, encoder, adapter, 0.7), pipe, PROMPTS, 3, 3.5,
                            ip_adapter_image=image)
    print("max |ours - diffusers|", ((ours * 0.5 + 0.5) - reference).abs().max().item())
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-2                                # the image prompt mattered
    torch.testing.assert_close(pipe.generate(PROMPTS, steps=3, seed=0)[0], plain)   # no image: the plain net
    pipe._ip[1].scale = 0.0
    torch.testing.assert_close(pipe.generate(PROMPTS, steps=3, seed=0, ip_image=image)[0], plain)


def test_schnell_cfg_is_diffusers_true_cfg(tmp_path, one_thread):
    """FLUX.1-schnell with w > 0: CFG against the empty prompt and a black image prompt, which is diffusers' true CFG
    (true_cfg_scale 1 + w, negative_prompt "", its default negative_ip_adapter_image)."""
    theirs = write_flux_pipeline(tmp_path, guidance_embeds=False, dynamic=False)
    convert(str(tmp_path / "flux"), str(tmp_path / "model"))
    adapter = write_xlabs_adapter(tmp_path / "ip_adapter.safetensors", theirs.transformer)
    encoder = write_image_encoder(tmp_path / "image_encoder")
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    pipe.add_ip_adapter(str(adapter), str(encoder))
    image = ip_image()
    ours, info = pipe.generate(PROMPTS, steps=2, seed=0, guidance=2.0, ip_image=image)
    assert info["nfe"] == 4
    reference = flux_images(with_flux_ip_adapter(theirs, encoder, adapter, 1.0), pipe, PROMPTS, 2, 0.0,
                            ip_adapter_image=image, negative_prompt="", true_cfg_scale=3.0)
    print("max |ours - diffusers|", ((ours * 0.5 + 0.5) - reference).abs().max().item())
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-5, rtol=0)


def test_wrong_adapters_are_refused(flux, tmp_path, capsys, one_thread):
    """An SD adapter on FLUX.1, FLUX.1's on a U-Net, one for another FLUX.1: refused by name, the CLI's too (which
    draws with the right one); the adapter under diffusers' names loads as XLabs' does."""
    _, model, adapter, encoder = flux
    sd = {"image_proj.proj.weight": torch.zeros(4 * 96, EMBED), "image_proj.proj.bias": torch.zeros(4 * 96),
          "image_proj.norm.weight": torch.ones(96), "image_proj.norm.bias": torch.zeros(96),
          "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 96), "ip_adapter.1.to_v_ip.weight": torch.zeros(32, 96)}
    save_file(sd, str(tmp_path / "sd.safetensors"))
    one_block = {k: v for k, v in load_file(str(adapter)).items() if not k.startswith("double_blocks.1.")}
    save_file(one_block, str(tmp_path / "one_block.safetensors"))
    pipe = TextToImage.from_folder(str(model))
    with pytest.raises(ValueError, match="an IP-Adapter for a U-Net"):
        pipe.add_ip_adapter(str(tmp_path / "sd.safetensors"), str(encoder))
    with pytest.raises(ValueError, match="image attention for 1 double blocks, this FLUX.1 has 2"):
        pipe.add_ip_adapter(str(tmp_path / "one_block.safetensors"), str(encoder))
    assert all(block.ip is None for block in pipe.unet.double_blocks)      # refused before any change
    renamed = {k.replace("ip_adapter_proj_model.", "image_proj.").replace("double_blocks.", "ip_adapter.")
               .replace("processor.ip_adapter_double_stream_k_proj", "to_k_ip")
               .replace("processor.ip_adapter_double_stream_v_proj", "to_v_ip"): v
               for k, v in load_file(str(adapter)).items()}
    assert "ip_adapter.1.to_v_ip.bias" in renamed and "image_proj.proj.weight" in renamed
    save_file(renamed, str(tmp_path / "diffusers_names.safetensors"))
    pipe.add_ip_adapter(str(tmp_path / "diffusers_names.safetensors"), str(encoder))
    torch.testing.assert_close(pipe.unet.double_blocks[1].ip.to_v_ip.bias, renamed["ip_adapter.1.to_v_ip.bias"])
    save_random_model(str(tmp_path / "unet-model"))
    with pytest.raises(ValueError, match="an IP-Adapter for FLUX.1"):
        TextToImage.from_folder(str(tmp_path / "unet-model")).add_ip_adapter(str(adapter), str(encoder))
    ip_image().save(tmp_path / "prompt.png")
    from ldm import txt2img
    def cli(path):
        return ["a cat", "--model", str(model), "--ip-adapter", str(path), "--image-encoder", str(encoder),
                "--ip-image", str(tmp_path / "prompt.png"), "--steps", "1", "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        txt2img.main(cli(tmp_path / "sd.safetensors"))
    assert e.value.code == 2 and "an IP-Adapter for a U-Net" in capsys.readouterr().err
    txt2img.main(cli(adapter))
    assert (tmp_path / "x.png").is_file()
