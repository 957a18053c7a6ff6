"""Stable Diffusion layouts for the model tests: a tiny random diffusers SD pipeline, and test-side maps
of diffusers' parameter names to the CompVis (original SD) layout. Loaded as the module `sd_layouts` by
tests/models/conftest.py (pytest's importlib mode puts no test folder on sys.path)."""
import json
import re
import warnings

import diffusers
import torch

from ldm.bench_models import TINY, write_clip_folder

PROMPTS = ["a red cube on a blue floor", "a cat"]      # different lengths: the padding differs


def perturb(model, seed=0, std=0.1):
    """Randomise every parameter (norm gains and zero-initialised ones too) so that a swapped name cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def write_sd_pipeline(folder, prediction_type: str = "epsilon", unet_options: dict | None = None, **scheduler_options):
    from transformers import CLIPTextModel, CLIPTokenizer
    clip = write_clip_folder(TINY, str(folder / "clip-src"))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL(**TINY.vae), text_encoder=CLIPTextModel.from_pretrained(clip),
            tokenizer=CLIPTokenizer.from_pretrained(clip), unet=diffusers.UNet2DConditionModel(**{**TINY.unet, **(unet_options or {})}),
            scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              prediction_type=prediction_type, clip_sample=False,
                                              **scheduler_options),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(folder / "sd"))
    return pipe


def on_our_grid(pipeline):
    """A diffusers pipeline set to sample as ours does: DDIM on the trailing grid ending at clean data
    (alpha = 1), no progress bar. Its DDIM steps to t - T // n: the same grid when n divides T = 1000."""
    pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing",
                                                             set_alpha_to_one=True, steps_offset=1)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_images(theirs, pipe, prompts, steps: int, guidance_scale: float, seed: int = 0, size=None, **call):
    """What diffusers' pipeline `theirs` draws on our grid (`on_our_grid`) from the noise our TextToImage
    `pipe` starts `prompts` from with `seed`, at `size` = (width, height) (default the model's square):
    images (B, 3, H, W) in [0, 1]. `call`: more of the pipeline's arguments (negative_prompt, image, ...)."""
    from ldm.diffusion.samplers import initial_noise
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(prompts), size),
                          generator=torch.Generator().manual_seed(seed))
    width, height = size or (pipe.index.resolution,) * 2
    with torch.no_grad():
        return on_our_grid(theirs)(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise,
                                   height=height, width=width, output_type="pt", **call).images


def unet_to_compvis(state, levels, n):
    """Independent test-side map of diffusers names to the CompVis openaimodel layout."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    out = {}
    for key, v in state.items():
        new = None
        if m := re.fullmatch(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
            b = 1 + int(m[1]) * (n + 1) + int(m[3])
            new = f"input_blocks.{b}.{0 if m[2] == 'resnets' else 1}.{m[4]}"
        elif m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * (n + 1) + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.(.+)", key):
            has_attn = any(k.startswith(f"up_blocks.{m[1]}.attentions") for k in state)
            new = f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if has_attn else 1}.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
            new = f"middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}.{m[3]}"
        else:
            new = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",   # SDXL
                   "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[key.rsplit(".", 1)[0]]
            new += "." + key.rsplit(".", 1)[1]
        for d, c in res.items():
            new = re.sub(rf"^((?:input|output)_blocks\.\d+\.0|middle_block\.[02])\.{d}\.", rf"\1.{c}.", new)
        out["model.diffusion_model." + new] = v
    return out



def vae_key_to_compvis(key: str, levels: int) -> str:
    """Inverse map written from the CompVis layout (ldm/modules/diffusionmodules/model.py)."""
    key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"attn_1.{old}.", f"attn_1.{new}.")
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", key)
    return "first_stage_model." + key


def openclip_text_model(seed: int = 0, width: int = 128, layers: int = 3):
    """A tiny random open_clip CLIP (its own modules and init) whose text tower has SD 2.x's structure:
    64-wide heads, GELU, the full CLIP vocabulary and 77 positions."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32, head_width=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=layers))
    return model.eval()


@torch.no_grad()
def openclip_tokens(model, prompts, penultimate: bool = True) -> torch.Tensor:
    """SD 2.x's conditioning by open_clip's own code: its tokenizer, then encode_text up to the final
    LayerNorm, whose (B, 77, D) output is caught; `penultimate` runs all but the last layer, as SD 2.x's
    FrozenOpenCLIPEmbedder does."""
    import open_clip
    caught = []
    blocks = model.transformer.resblocks
    hook = model.ln_final.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        if penultimate:
            model.transformer.resblocks = blocks[:-1]
        model.encode_text(open_clip.tokenize(prompts))
    finally:
        hook.remove()
        model.transformer.resblocks = blocks
    return caught[0]


def _bigg():
    """A random 48-wide stand-in for SDXL's OpenCLIP bigG (CLIPTextModelWithProjection, GELU, 24-d projection)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection(CLIPTextConfig(**{
        **TINY.clip, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 3,
        "projection_dim": 24, "hidden_act": "gelu"}))


def _sdxl_unet(cross_attention_dim: int, pooled: int, numbers: int, **options) -> dict:
    """SDXL's U-Net structure at toy widths: a plain first level, 1 and 2 transformer blocks, linear
    projections, the text_time embedding of the pooled text and `numbers` size numbers (8-wide sinusoids)."""
    return {**dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                   transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
                   cross_attention_dim=cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=pooled + numbers * 8), **options}   # options may replace


def write_sdxl_pipeline(folder, text_encoder_2=None, unet_options: dict | None = None):
    """A tiny random diffusers StableDiffusionXLPipeline saved in folder / "sdxl": SDXL's block structure at toy
    widths (a plain first level, 1 and 2 transformer blocks, linear projections, the text_time embedding),
    both tokenizers on the real CLIP vocabulary (the second padding with "!"), the VAE's SDXL scaling factor.
    `text_encoder_2`: a CLIPTextModelWithProjection to use (default: a random 48-wide one); `unet_options`:
    U-Net config entries to change (e.g. in_channels 9 for an inpainting model)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.models.clip_bpe import write_clip_tokenizer
    write_clip_tokenizer(folder / "tok")
    write_clip_tokenizer(folder / "tok2", pad_token="!")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY.clip))
    text_encoder_2 = text_encoder_2 or _bigg()
    unet = _sdxl_unet(text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
                      text_encoder_2.config.projection_dim, 6, **(unet_options or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=diffusers.AutoencoderKL(**{**TINY.vae, "scaling_factor": 0.13025}), text_encoder=text_encoder,
            text_encoder_2=text_encoder_2, tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tok")),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tok2")), unet=diffusers.UNet2DConditionModel(**unet),
            scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              clip_sample=False),
            force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(str(folder / "sdxl"))
    return pipe


def write_sdxl_refiner(folder, text_encoder_2=None):
    """A tiny random diffusers SDXL refiner (StableDiffusionXLImg2ImgPipeline) saved in folder / "refiner":
    bigG alone (`text_encoder_2`, default a random 48-wide one), the U-Net's added embedding taking 5
    numbers (size, crop, aesthetic score)."""
    from transformers import CLIPTokenizer

    from ldm.models.clip_bpe import write_clip_tokenizer
    write_clip_tokenizer(folder / "tok2", pad_token="!")
    torch.manual_seed(5)
    text_encoder_2 = text_encoder_2 or _bigg()
    unet = _sdxl_unet(text_encoder_2.config.hidden_size, text_encoder_2.config.projection_dim, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=diffusers.AutoencoderKL(**{**TINY.vae, "scaling_factor": 0.13025}), text_encoder=None,
            text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tok2")),
            unet=diffusers.UNet2DConditionModel(**unet),
            scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              clip_sample=False),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        pipe.save_pretrained(str(folder / "refiner"))
    return pipe


EMBED = 16                                              # the IP-Adapter tests' image embedding width


def write_image_encoder(folder):
    """A tiny random CLIPVisionModelWithProjection (EMBED-wide image embeddings) and its processor in `folder`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=EMBED)
    torch.manual_seed(2)
    CLIPVisionModelWithProjection(config).save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(str(folder))
    return folder


def write_ip_adapter(path, unet, tokens=4):
    """A random IP-Adapter for the diffusers `unet`, keys as IP-Adapter files have them: i = the
    cross-attention's place in diffusers' attn_processors."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    dim = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(tokens * dim, EMBED, generator=g) * 0.3,
             "image_proj.proj.bias": torch.randn(tokens * dim, generator=g) * 0.1,
             "image_proj.norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
             "image_proj.norm.bias": 0.1 * torch.randn(dim, generator=g)}
    for i, (name, processor) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            for key in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{i}.{key}.weight"] = torch.randn(inner, dim, generator=g) * 0.3
    save_file(state, str(path))
    return path


def ip_image():
    """The IP-Adapter tests' image prompt: random RGB pixels, 48x40 (not the encoder's square size)."""
    import numpy as np
    from PIL import Image
    return Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))


def with_ip_adapter(pipeline_class, theirs, encoder, adapter, scale: float):
    """A diffusers pipeline of `pipeline_class` on `theirs`' components plus the image encoder folder
    `encoder`, with the IP-Adapter file `adapter` loaded by diffusers' own load_ip_adapter at `scale`."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    pipe = pipeline_class(**{**theirs.components,
                             "image_encoder": CLIPVisionModelWithProjection.from_pretrained(str(encoder)),
                             "feature_extractor": CLIPImageProcessor.from_pretrained(str(encoder))})
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe


SD3_WIDTHS = dict(clip_l=32, clip_g=48, t5=96)          # context: 32 + 48 zero-padded to 96; pooled: 32 + 48
T5_WORDS = ("a", "an", "red", "blue", "green", "cube", "cat", "dog", "on", "the", "floor", "and", "of", "photo")


def write_t5_tokenizer(directory) -> str:
    """A T5 tokenizer (transformers' T5TokenizerFast: a Unigram model in tokenizer.json) on a toy vocabulary,
    no download: <pad> 0, </s> 1, <unk> 2 as T5's own, then a few whole words and single characters (any
    lower-case text tokenizes; other characters are <unk>). Appends </s>, pads with <pad>."""
    from transformers import T5TokenizerFast
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    pieces.update({f"\u2581{w}": -1.0 for w in T5_WORDS})              # whole words win over their letters
    pieces.update({p: -4.0 for c in chars for p in (c, f"\u2581{c}") if p not in pieces})
    tokenizer = T5TokenizerFast(vocab=list(pieces.items()), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def write_sd3_text_parts(folder, t5: bool = True) -> None:
    """SD3's text encoders at toy widths (SD3_WIDTHS) in `folder` as a diffusers SD3 pipeline names them:
    text_encoder/ + tokenizer/ (a random CLIPTextModelWithProjection, 32 wide, 32-d projection, quick_gelu,
    the real CLIP vocabulary padding with the end token), text_encoder_2/ + tokenizer_2/ (48 wide, 48-d
    projection, gelu, padding with "!"), and with `t5` text_encoder_3/ + tokenizer_3/ (a random 96-wide
    gated-gelu T5EncoderModel, write_t5_tokenizer's vocabulary)."""
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.models.clip_bpe import write_clip_tokenizer
    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    torch.manual_seed(0)
    CLIPTextModelWithProjection(CLIPTextConfig(**TINY.clip)).save_pretrained(str(folder / "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(**{
        **TINY.clip, "hidden_size": SD3_WIDTHS["clip_g"], "intermediate_size": 2 * SD3_WIDTHS["clip_g"],
        "projection_dim": SD3_WIDTHS["clip_g"], "hidden_act": "gelu"})
    ).save_pretrained(str(folder / "text_encoder_2"))
    if t5:
        _write_t5(folder / "text_encoder_3", folder / "tokenizer_3")


def _write_t5(encoder_dir, tokenizer_dir) -> None:
    """write_t5_tokenizer's vocabulary in `tokenizer_dir`, a random 96-wide gated-gelu T5EncoderModel on it
    in `encoder_dir` (drawn from the global RNG)."""
    from transformers import T5Config, T5EncoderModel
    write_t5_tokenizer(tokenizer_dir)
    with open(tokenizer_dir / "tokenizer.json") as f:
        vocab = len(json.load(f)["model"]["vocab"])
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=SD3_WIDTHS["t5"], d_kv=16, d_ff=128, num_layers=2,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                            feed_forward_proj="gated-gelu", dropout_rate=0.0)
                   ).save_pretrained(str(encoder_dir))


FLUX_WIDTHS = dict(pooled=SD3_WIDTHS["clip_l"], t5=SD3_WIDTHS["t5"])   # pooled: CLIP-L's width; context: T5's


def write_flux_text_parts(folder) -> dict:
    """FLUX.1's text encoders at toy widths (FLUX_WIDTHS, returned) in `folder` as diffusers' Flux pipeline
    names them: text_encoder/ + tokenizer/ (a random CLIPTextModel, SD3's 32-wide CLIP-L config, the real
    CLIP vocabulary padding with the end token) and text_encoder_2/ + tokenizer_2/ (SD3's random 96-wide T5)."""
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.clip_bpe import write_clip_tokenizer
    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**TINY.clip)).save_pretrained(str(folder / "text_encoder"))
    _write_t5(folder / "text_encoder_2", folder / "tokenizer_2")
    return FLUX_WIDTHS


# A tiny SD3: the transformer takes write_sd3_text_parts' widths (joint 96, pooled 80), a 16-channel autoencoder
SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                       attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                       pooled_projection_dim=80, pos_embed_max_size=24)
SD3_VAE = {**TINY.vae, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
           "scaling_factor": 1.5305, "shift_factor": 0.0609}


def write_sd3_pipeline(folder, t5: bool = True, shift: float = 3.0, **transformer):
    """A tiny random SD3 pipeline saved at `folder` (its transformer in two shards, as large checkpoints come)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
    write_sd3_text_parts(folder / "parts", t5=t5)
    parts = folder / "parts"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(**{**SD3_TRANSFORMER, **transformer}),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), vae=diffusers.AutoencoderKL(**SD3_VAE),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(parts / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(parts / "text_encoder_2"),
            tokenizer_2=CLIPTokenizer.from_pretrained(parts / "tokenizer_2"),
            text_encoder_3=T5EncoderModel.from_pretrained(parts / "text_encoder_3") if t5 else None,
            tokenizer_3=AutoTokenizer.from_pretrained(parts / "tokenizer_3") if t5 else None)
        pipe.save_pretrained(str(folder / "sd3"), max_shard_size="100KB")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_images(theirs, pipe, prompts, steps: int, guidance_scale: float, seed: int = 0, **call):
    """diffusers' SD3 images (B, 3, H, W) in [0, 1] on our trailing grid (it shifts the sigmas it is given
    itself) from the noise our TextToImage `pipe` starts `prompts` from with `seed`."""
    import numpy as np

    from ldm.diffusion.samplers import initial_noise
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(prompts)),
                          generator=torch.Generator().manual_seed(seed))
    side = pipe.index.resolution
    with torch.no_grad():
        return theirs(prompts, num_inference_steps=steps, sigmas=list(1 - np.arange(steps) / steps),
                      guidance_scale=guidance_scale, latents=noise, height=side, width=side, output_type="pt",
                      **call).images


# A tiny FLUX.1: the transformer takes write_flux_text_parts' widths (context 96, pooled 32), a 16-channel VAE
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32,
                        axes_dims_rope=(4, 6, 6))
FLUX_VAE = {**TINY.vae, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": 0.3611, "shift_factor": 0.1159}


def write_flux_pipeline(folder, guidance_embeds: bool = True, dynamic: bool = True, pipeline_class=None,
                        in_channels: int = 64):
    """A tiny random FLUX.1 pipeline saved at folder/"flux": -dev (the guidance embedding, the scheduler's
    resolution-dependent shift) or -schnell (neither). Returns diffusers' FluxPipeline, or `pipeline_class`
    (Fill, Control, Kontext) whose transformer takes `in_channels` packed channels and predicts 64."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel
    parts = folder / "parts"
    write_flux_text_parts(parts)
    torch.manual_seed(0)
    scheduler = (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                           base_image_seq_len=256, max_image_seq_len=4096)
                 if dynamic else diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = (pipeline_class or diffusers.FluxPipeline)(
            transformer=diffusers.FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "in_channels": in_channels},
                                                         out_channels=64, guidance_embeds=guidance_embeds),
            scheduler=scheduler, vae=diffusers.AutoencoderKL(**FLUX_VAE),
            text_encoder=CLIPTextModel.from_pretrained(parts / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(parts / "text_encoder_2"),
            tokenizer_2=AutoTokenizer.from_pretrained(parts / "tokenizer_2"))
        pipe.save_pretrained(str(folder / "flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_images(theirs, pipe, prompts, steps: int, guidance_scale: float, seed: int = 0, size=None, **call):
    """diffusers' FLUX.1 images (B, 3, H, W) in [0, 1] from the noise our TextToImage `pipe` starts `prompts` from
    with `seed` (packed into its 2x2 tokens), on its default grid linspace(1, 1/n, n) = our trailing grid, at
    `size` = (width, height) (default the model's square)."""
    from ldm.diffusion.samplers import initial_noise
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(prompts), size),
                          generator=torch.Generator().manual_seed(seed))
    B, C, h, w = noise.shape
    packed = noise.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
    width, height = size or (pipe.index.resolution,) * 2
    with torch.no_grad():
        return theirs(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=packed,
                      height=height, width=width, output_type="pt", **call).images
