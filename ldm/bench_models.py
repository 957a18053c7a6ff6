"""Paired models for `ldm.bench`: a diffusers module and ours holding the very same weights.

Each pair is built from a diffusers config (random init, fixed seed) and converted into
ours through our own converters, so the benchmark compares implementations, not weights.
`max_error` runs both on one small fp32 input on CPU: the proof that the pair matches.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch

from ldm.models.from_single_file import SDXL_UNET


@dataclass(frozen=True, kw_only=True)
class Size:
    """Model configs and input sizes of one benchmark size; a model left out (None) skips its benches."""
    unet: dict | None = None    # diffusers UNet2DConditionModel config
    vae: dict | None = None     # diffusers AutoencoderKL config
    clip: dict | None = None    # transformers CLIPTextConfig (the text encoder of txt2img)
    mmdit: dict | None = None   # diffusers SD3Transformer2DModel config
    flux: dict | None = None    # diffusers FluxTransformer2DModel config
    latent: int                 # latent side (image side = latent * 8)
    image: int                  # image side of txt2img / VAE decode
    infer_batch: int            # denoiser inference batch (2 = one prompt under CFG)
    train_batch: int            # training-step batch
    tokens: int = 77            # text tokens in the context
    pooled: int = 0             # SDXL: the pooled text width beside the six size numbers (0: no added embedding)

    def added(self, batch: int, generator: torch.Generator) -> dict:
        """SDXL's added inputs for a batch, in our U-Net's names ({} for SD): a pooled text vector and the
        six size numbers of an uncropped picture at the image size."""
        if not self.pooled:
            return {}
        return {"pooled": torch.randn(batch, self.pooled, generator=generator),
                "time_ids": torch.tensor([[self.image, self.image, 0, 0, self.image, self.image]] * batch,
                                         dtype=torch.float32)}


SD15 = Size(
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json): 859.5M parameters.
    unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32),
    # The SD VAE (f = 8, 4 latent channels): 83.7M parameters.
    vae=dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, force_upcast=False),
    # CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14): 123M parameters.
    clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    latent=64, image=512, infer_batch=2, train_batch=8,
)

TINY = Size(
    # The same block types at toy widths: runs on CPU in seconds.
    unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8),
    vae=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             latent_channels=4, norm_num_groups=8, scaling_factor=0.18215, force_upcast=False),
    clip=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
    latent=16, image=32, infer_batch=2, train_batch=2,
)

SDXL = Size(
    # SDXL base, the config the single-file importer builds in (sd_xl_base.yaml): 2,567,463,684 parameters.
    unet=SDXL_UNET,
    # SDXL's VAE: SD's architecture, its own weights and scaling factor.
    vae={**SD15.vae, "sample_size": 1024, "scaling_factor": 0.13025},
    clip=SD15.clip, latent=128, image=1024, infer_batch=2, train_batch=2, pooled=1280,
)

TINY_XL = Size(
    # SDXL's block structure (a plain first level, 1 and 2 transformer blocks, the added embedding) at toy widths.
    unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=2, transformer_layers_per_block=(1, 2), cross_attention_dim=32,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8),
    vae=TINY.vae, clip=TINY.clip, latent=16, image=32, infer_batch=2, train_batch=2, pooled=16,
)

SD3 = Size(
    # SD3 medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json, our
    # MMDiTConfig defaults): 2,028,328,000 parameters. 1024 px; text = 77 CLIP + 256 T5 tokens at T5's width.
    mmdit=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    latent=128, image=1024, infer_batch=2, train_batch=2, tokens=77 + 256,
)

TINY_SD3 = Size(
    # SD3 medium's layout (16 latent channels, patch 2, a context-pre-only last block) at toy widths.
    mmdit=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
               num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
               pos_embed_max_size=24),
    latent=16, image=128, infer_batch=2, train_batch=2, tokens=77 + 256,
)

FLUX_SLICE = Size(
    # FLUX.1-dev's widths and sequence at 1024 px (3072 = 24 heads of 128, T5's 4096-wide 512 tokens, 64 x 64 = 4096
    # image tokens, the guidance input) with 2 of its 19 double and 4 of its 38 single blocks: 1.31B of its 11.9B
    # parameters, so that both copies, their fp32 masters and AdamW's moments fit one GPU. Time per block scales.
    flux=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56)),
    latent=128, image=1024, infer_batch=1, train_batch=1, tokens=512,
)

TINY_FLUX = Size(
    # FLUX.1-dev's layout (double then single blocks, packed 2 x 2 patches, the guidance input) at toy widths.
    flux=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6)),
    latent=16, image=128, infer_batch=1, train_batch=2, tokens=64,
)

SIZES = {"sd15": SD15, "tiny": TINY, "sdxl": SDXL, "tiny-xl": TINY_XL, "sd3": SD3, "tiny-sd3": TINY_SD3,
         "flux-slice": FLUX_SLICE, "tiny-flux": TINY_FLUX}
TXT2IMG_SIZES = ("sd15", "tiny")     # txt2img runs SD's pipeline (one CLIP): not the SDXL sizes


def unet_pair(size: Size, seed: int = 0):
    """(ours, diffusers) U-Nets with identical weights, fp32 on CPU, eval mode."""
    from diffusers import UNet2DConditionModel

    from ldm.models.convert_unet import diffusers_to_ours, unet_config_from_diffusers
    from ldm.models.unet import UNet, load_state_dict_strict

    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**size.unet)
    cfg = unet_config_from_diffusers(dict(theirs.config))
    ours = UNet(cfg)
    load_state_dict_strict(ours, diffusers_to_ours(theirs.state_dict(), len(cfg.channels)),
                           "diffusers UNet2DConditionModel (random init)")
    return ours.eval(), theirs.eval()


def vae_pair(size: Size, seed: int = 0):
    """(ours, diffusers) autoencoders with identical weights, fp32 on CPU, eval mode."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from ldm.models.autoencoder import AutoencoderKL, load_state_dict_strict
    from ldm.models.convert_ae import diffusers_config_to_ours, diffusers_state_dict_to_ours

    torch.manual_seed(seed)
    theirs = DiffusersAutoencoderKL(**size.vae)
    with warnings.catch_warnings():  # diffusers adds config keys that do not change the weights
        warnings.simplefilter("ignore")
        cfg = diffusers_config_to_ours(dict(theirs.config))
    # fp16 latents decode in fp16, as diffusers' module does (ours would otherwise upcast to fp32).
    cfg.fp16_decode_dtype = "float16"
    ours = AutoencoderKL(cfg)
    load_state_dict_strict(ours, diffusers_state_dict_to_ours(theirs.state_dict()),
                           "diffusers AutoencoderKL (random init)")
    return ours.eval(), theirs.eval()


@torch.no_grad()
def max_error(ours_fn, theirs_fn, *inputs) -> dict:
    """Max abs difference of two fp32 outputs on the same inputs, and relative to the output scale."""
    a, b = ours_fn(*inputs).float(), theirs_fn(*inputs).float()
    if a.shape != b.shape:
        raise ValueError(f"weight-sharing check: output shapes differ, ours {tuple(a.shape)} vs {tuple(b.shape)}")
    err = (a - b).abs().max().item()
    return {"max_abs_err": err, "max_rel_err": err / max(b.abs().max().item(), 1e-12)}


def _transformer_pair(diffusers_class: str, config: dict, config_from, rename, ours_class, seed: int):
    """(ours, diffusers) transformers with identical weights, fp32 on CPU, eval mode: diffusers' `diffusers_class`
    built from `config` (random init after seeding), ours from its config (`config_from`) and renamed weights."""
    import diffusers

    from ldm.models.weights import load_state_dict_strict

    torch.manual_seed(seed)
    theirs = getattr(diffusers, diffusers_class)(**config)
    ours = ours_class(config_from(dict(theirs.config)))
    load_state_dict_strict(ours, rename(theirs.state_dict()), f"diffusers {diffusers_class} (random init)")
    return ours.eval(), theirs.eval()


def mmdit_pair(size: Size, seed: int = 0):
    """(ours, diffusers) SD3 transformers with identical weights, fp32 on CPU, eval mode."""
    from ldm.models.convert_mmdit import diffusers_to_ours, mmdit_config_from_diffusers
    from ldm.models.mmdit import MMDiT
    return _transformer_pair("SD3Transformer2DModel", size.mmdit, mmdit_config_from_diffusers, diffusers_to_ours,
                             MMDiT, seed)


def flux_pair(size: Size, seed: int = 0):
    """(ours, diffusers) FLUX.1 transformers with identical weights, fp32 on CPU, eval mode."""
    from ldm.models.convert_flux import diffusers_to_ours, flux_config_from_diffusers
    from ldm.models.flux import Flux
    return _transformer_pair("FluxTransformer2DModel", size.flux, flux_config_from_diffusers, diffusers_to_ours,
                             Flux, seed)


# ---- denoiser inputs and calls: what the generic denoiser benches of ldm.bench take --------------

def unet_inputs(size: Size, batch: int, generator: torch.Generator, side: int | None = None):
    """x (B, 4, s, s), context (B, L, D_ctx) and SDXL's added inputs (our names), fp32 on CPU; s = size.latent."""
    side = side or size.latent
    x = torch.randn(batch, 4, side, side, generator=generator)
    ctx = torch.randn(batch, size.tokens, size.unet["cross_attention_dim"], generator=generator)
    return x, ctx, size.added(batch, generator)


def mmdit_inputs(size: Size, batch: int, generator: torch.Generator, side: int | None = None):
    """x (B, C, s, s), context (B, L, D_ctx) and the pooled text {"pooled": (B, P)}, fp32 on CPU."""
    side, cfg = side or size.latent, size.mmdit
    x = torch.randn(batch, cfg["in_channels"], side, side, generator=generator)
    ctx = torch.randn(batch, size.tokens, cfg["joint_attention_dim"], generator=generator)
    return x, ctx, {"pooled": torch.randn(batch, cfg["pooled_projection_dim"], generator=generator)}


def flux_inputs(size: Size, batch: int, generator: torch.Generator, side: int | None = None):
    """x (B, 16, s, s) latents, T5 context (B, L, D_ctx), {"pooled": (B, P), "guidance": (B,) scale 3.5}, fp32."""
    side, cfg = side or size.latent, size.flux
    x = torch.randn(batch, cfg["in_channels"] // 4, side, side, generator=generator)
    ctx = torch.randn(batch, size.tokens, cfg["joint_attention_dim"], generator=generator)
    return x, ctx, {"pooled": torch.randn(batch, cfg["pooled_projection_dim"], generator=generator),
                    "guidance": torch.full((batch,), 3.5)}


def unet_call(impl: str, model, added: dict):
    """(x, t, context) -> prediction for either U-Net, with SDXL's `added` inputs (our names) where given."""
    if impl == "ours":
        return lambda x, t, c: model(x, t, c, **added)
    theirs = {"added_cond_kwargs": {"text_embeds": added["pooled"], "time_ids": added["time_ids"]}} if added else {}
    return lambda x, t, c: model(x, t, encoder_hidden_states=c, **theirs).sample


def mmdit_call(impl: str, model, extra: dict):
    """(x, t, context) -> velocity for either SD3 transformer; t = sigma * 1000 on both sides."""
    if impl == "ours":
        return lambda x, t, c: model(x, t, c, pooled=extra["pooled"])
    return lambda x, t, c: model(hidden_states=x, timestep=t, encoder_hidden_states=c,
                                 pooled_projections=extra["pooled"]).sample


def flux_call(impl: str, model, extra: dict):
    """(x, t, context) -> velocity for either FLUX.1 transformer, t = 1000 sigma; diffusers is called as FluxPipeline
    calls it (packed 2 x 2 patches, position ids, timestep sigma), its output unpacked."""
    if impl == "ours":
        return lambda x, t, c: model(x, t, c, pooled=extra["pooled"], guidance=extra["guidance"])
    from ldm.models.flux import pack, position_ids, unpack

    def call(x, t, c):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        ids = position_ids(c.shape[1], h, w, device=x.device).to(x.dtype)
        out = model(hidden_states=pack(x), encoder_hidden_states=c, pooled_projections=extra["pooled"],
                    timestep=t / 1000, img_ids=ids[c.shape[1]:], txt_ids=ids[:c.shape[1]],
                    guidance=extra["guidance"]).sample
        return unpack(out, h, w)
    return call


def check_denoiser_pair(ours, theirs, inputs, call, side: int, seed: int = 0) -> dict:
    """Both denoisers on a batch-1 side x side latent, fp32; inputs(batch, generator, side) and call as
    `unet_inputs` / `unet_call` with the size bound."""
    x, ctx, extra = inputs(1, torch.Generator().manual_seed(seed), side)
    t = torch.tensor([500.0])
    return max_error(call("ours", ours, extra), call("diffusers", theirs, extra), x, t, ctx)


def check_unet_pair(ours, theirs, size: Size, seed: int = 0) -> dict:
    """Both U-Nets on a batch-1 8x8 latent (the smallest every size divides into), fp32."""
    factor = 2 ** (len(size.unet["block_out_channels"]) - 1)
    return check_denoiser_pair(ours, theirs, partial(unet_inputs, size), unet_call, factor, seed)


def check_mmdit_pair(ours, theirs, size: Size, seed: int = 0) -> dict:
    """Both transformers on a batch-1 8x8 latent (16 patches at patch 2) and the size's text tokens, fp32."""
    return check_denoiser_pair(ours, theirs, partial(mmdit_inputs, size), mmdit_call, 4 * size.mmdit["patch_size"],
                               seed)


def check_flux_pair(ours, theirs, size: Size, seed: int = 0) -> dict:
    """Both transformers on a batch-1 8x8 latent (16 packed tokens) and the size's text tokens, fp32."""
    return check_denoiser_pair(ours, theirs, partial(flux_inputs, size), flux_call, 8, seed)


def check_vae_pair(ours, theirs, size: Size, seed: int = 0) -> dict:
    """Both decoders on one 8x8 latent, fp32."""
    z = torch.randn(1, size.vae["latent_channels"], 8, 8, generator=torch.Generator().manual_seed(seed))
    return max_error(ours.decode, lambda z: theirs.decode(z).sample, z)


# ---- text encoder for txt2img ----------------------------------------------------------------

def write_clip_folder(size: Size, directory: str, seed: int = 0) -> str:
    """A random CLIPTextModel plus a CLIP tokenizer in `directory` (no download needed): the tokenizer
    has the same vocabulary and merges as openai/clip-vit-large-patch14 (ldm.models.clip_bpe)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.clip_bpe import write_clip_tokenizer
    write_clip_tokenizer(directory, size.tokens)
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(**size.clip)).save_pretrained(directory)
    return directory


def clip_text_encoder(directory: str):
    """Our ClipTextEncoder around the CLIP folder written by `write_clip_folder`."""
    from ldm.models.text import ClipTextEncoder, TextEncoderConfig
    # mask_padding=False: the U-Net attends to all 77 tokens, as in diffusers' pipeline and SD's training
    return ClipTextEncoder(TextEncoderConfig(kind="clip", path=directory, local_files_only=True, mask_padding=False))


# ---- the two text-to-image pipelines ----------------------------------------------------------

PROMPT = "a red cube on a blue floor"


def ours_txt2img(unet, vae, clip_dir: str, size: Size, device, dtype, steps: int, guidance: float):
    """A callable: our TextToImage (DDIM, scaled-linear schedule, eps) from prompt to image."""
    from ldm.pipeline import ModelIndex, TextToImage

    text = clip_text_encoder(clip_dir).to(device=device, dtype=dtype)
    index = ModelIndex(schedule={"name": "scaled_linear"}, prediction="eps", time_scale=1.0,
                       resolution=size.image, guidance=guidance)
    pipe = TextToImage(vae, text, unet, index)
    amp = device.type == "cuda" and dtype != torch.float32  # the sampler keeps latents in fp32

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return pipe.generate([PROMPT], steps=steps, seed=0)[0]
    return run


def diffusers_txt2img(unet, vae, clip_dir: str, size: Size, device, dtype, steps: int, guidance: float):
    """A callable: diffusers' StableDiffusionPipeline (DDIM, trailing spacing) on the same weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing="trailing", steps_offset=1, clip_sample=False,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(clip_dir).to(device, dtype),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=device)

    def run():
        # diffusers' guidance_scale g is our 1 + w: g * cond - (g - 1) * uncond
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=1 + guidance, height=size.image,
                    width=size.image, generator=gen.manual_seed(0), output_type="pt").images
    return run
