"""Stage 2: train a text-conditioned latent U-Net (or SD3's MMDiT, `net: mmdit`, or FLUX.1's transformer, `net: flux`)
with classifier-free guidance.

    accelerate launch stages/train_latent.py --config configs/latent/shapes64.yaml [--resume latest] [key=value ...]
    python stages/train_latent.py --config configs/latent/tiny.yaml train.max_steps=3

The story: setup -> data -> frozen stage-1 autoencoder -> text encoder (scratch: trained with
the U-Net in one optimizer; clip/openclip/sdxl/sd3/flux: frozen) -> U-Net, MMDiT or Flux -> prepare -> EMA -> resume ->
loop (latents, caption dropout, text encoding, diffusion loss, update, log, validate,
checkpoint) -> a model folder at `<output_dir>/model/` (ldm/pipeline.py) that
`TextToImage.from_folder` samples from. Design notes: docs/stage2-latent.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ldm.data.loaders import DataConfig, check_image_multiple, make_dataloader
from ldm.diffusion import SAMPLERS, DiffusionLoss, schedule_from_config
from ldm.diffusion.guidance import drop_captions
from ldm.diffusion.losses import (MULTIRES_DISCOUNT, check_logit_normal, check_multires_noise, check_noise_options,
                                  check_robust_loss, check_time_shift)
from ldm.diffusion.schedules import resolution_shift
from ldm.instruct_pix2pix import INSTRUCT, check_unet, drop_conditions, training_image_latents, widen_input
from ldm.diffusion.param import check_prediction
from ldm.models.autoencoder import CONFIG_NAME, WEIGHTS_NAME, AutoencoderKL
from ldm.models.flux import Flux, FluxConfig
from ldm.models.lora import (FLUX_TARGETS, FLUX_TRAIN_TARGETS, MMDIT_TARGETS, MMDIT_TRAIN_TARGETS, TRAIN_TARGETS,
                             add_lora, flux_targets, lora_file_state, merged_state_dict, mmdit_targets)
from ldm.models.mmdit import MMDiT, MMDiTConfig
from ldm.models.nets import build_net
from ldm.models.text import TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNet, UNetConfig, count_params, sdxl_time_ids
from ldm.models.weights import load_state_dict_strict, load_weights, read_weights, write_safetensors_atomic
from ldm.pipeline import ModelIndex, TextToImage, save_index
from ldm.training import (EMA, Checkpointer, NonFiniteGuard, ProgressBar, TrainConfig, build_optimizer,
                          build_scheduler, config_to_dict, log_images, one_batch_size, optimizer_step,
                          parse_args, setup)
from ldm.training.gather import ema_copy
from ldm.training.latent_cache import scaled_latents, stage_loader
from ldm.training.power_ema import power_ema_from_config

logger = logging.getLogger("train_latent")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "latent" / "shapes64.yaml"


# ----------------------------------------------------------------------------- config

DYNAMIC_SHIFT_KEYS = ("base_seq_len", "max_seq_len", "base_shift", "max_shift")   # schedules.resolution_shift's


def check_dynamic_shift(dynamic: dict, schedule_options: dict) -> None:
    """ValueError naming the keys unless diffusion.dynamic_shift is {} or all of resolution_shift's numbers (two
    token counts apart), on a schedule without a fixed shift of its own (the dynamic one replaces it)."""
    if not dynamic:
        return
    if set(dynamic) != set(DYNAMIC_SHIFT_KEYS) or dynamic["base_seq_len"] == dynamic["max_seq_len"]:
        raise ValueError(f"dynamic_shift {dynamic}: needs exactly {list(DYNAMIC_SHIFT_KEYS)} (schedules."
                         "resolution_shift's), base_seq_len != max_seq_len")
    if schedule_options.get("shift", 1.0) != 1.0:
        raise ValueError(f"schedule_options.shift={schedule_options['shift']} and dynamic_shift: the dynamic shift "
                         "replaces the fixed one at sampling (as diffusers' use_dynamic_shifting); keep shift 1")


@dataclass
class DiffusionConfig:
    schedule: str = "cosine_logsnr"                        # ldm.diffusion.schedules name
    schedule_options: dict[str, Any] = field(default_factory=dict)  # e.g. {T: 1000} or {logsnr_min: -15}
    prediction: Literal["eps", "v", "x0", "flow"] = "v"    # what the U-Net regresses onto (flow: eps - x0)
    weighting: Literal["uniform", "truncated_snr", "min_snr", "debiased"] = "uniform"  # per-t loss weight (losses.py;
                                                           # debiased: eps weight 1/sqrt(SNR), Yu et al. 2024)
    gamma: float = 5.0                                     # min_snr's clip
    time: Literal["continuous", "discrete", "logit_normal"] = "continuous"  # t ~ U[0, 1], steps 0..T-1, or
    logit_mean: float = 0.0                                # t = sigmoid(N(logit_mean, logit_std^2)) (SD3's
    logit_std: float = 1.0                                 # rectified-flow training, Esser et al. 2024)
    time_scale: float = 1000.0                             # the U-Net sees t * time_scale
    time_shift: float | Literal["dynamic"] = 1.0          # > 1: training log-SNR moved by -2 log(shift) (losses.py);
                                                           # dynamic: by dynamic_shift's shift at each batch's size
    time_shift_share: float = 1.0                          # share of samples shifted; the rest keep u ~ U[0, 1]
    dynamic_shift: dict[str, float] = field(default_factory=dict)  # FLUX.1: the sampling grid's shift from the
                                                           # image's token count (schedules.resolution_shift's keys:
                                                           # base_seq_len, max_seq_len, base_shift, max_shift), written
                                                           # to the model folder; {} = the schedule's fixed shift
    noise_offset: float = 0.0                              # per-channel constant in eps (offset noise; SD uses ~0.05-0.1)
    input_perturbation: float = 0.0                        # x_t from eps + gamma*xi, target eps (Ning et al. 2023; 0.1)
    multires_noise_iterations: int = 0                     # > 0: eps gets that many coarser levels (1/2, 1/4, ...;
                                                           # losses.multires_noise, Whitaker 2023; kohya users: 6)
    multires_noise_discount: float = MULTIRES_DISCOUNT     # level i scaled by discount^i before the per-sample std
    loss_type: Literal["l2", "huber", "smooth_l1", "l1"] = "l2"  # the error's loss (losses.robust_loss): huber and
                                                           # smooth_l1 cap an outlier's pull (corrupt captions/images)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"  # their c over time (losses.huber_c_at): from 1
                                                           # at clean data to huber_c at pure noise, or huber_c always
    huber_c: float = 0.1                                   # Khrapov et al. 2024 / diffusers' default

    def __post_init__(self):
        schedule = schedule_from_config(self.schedule_config())  # unknown names/options fail here, named
        if self.time == "discrete" and not hasattr(schedule, "num_timesteps"):
            raise ValueError(f"time 'discrete' needs a discrete schedule, {self.schedule!r} is continuous")
        check_prediction(self.prediction, schedule)   # zero_snr with eps: refused by name
        check_noise_options(self.noise_offset, self.input_perturbation, "diffusion.")
        check_multires_noise(self.multires_noise_iterations, self.multires_noise_discount, "diffusion.")
        check_logit_normal(self.logit_mean, self.logit_std, "diffusion.")
        check_robust_loss(self.loss_type, self.huber_schedule, self.huber_c, "diffusion.")
        check_dynamic_shift(self.dynamic_shift, self.schedule_options)
        dynamic = self.time_shift == "dynamic"
        if dynamic and (not self.dynamic_shift or self.time == "discrete"):
            raise ValueError("time_shift 'dynamic' moves each batch's training times by dynamic_shift's shift at its "
                             "size: it needs diffusion.dynamic_shift (the model folder's; FLUX.1's: {base_seq_len: "
                             "256, max_seq_len: 4096, base_shift: 0.5, max_shift: 1.15}) and time 'continuous' or "
                             "'logit_normal'")
        check_time_shift(1.0 if dynamic else self.time_shift, self.time, "diffusion.time_shift",
                         self.time_shift_share, "diffusion.time_shift_share")

    def schedule_config(self) -> dict:
        return {"name": self.schedule, **self.schedule_options}


@dataclass
class ValConfig:
    prompts: list[str] = field(default_factory=lambda: [
        "a red circle", "a blue square at the bottom", "a green triangle to the left of a yellow circle",
        "a large purple square in the center on a black background"])
    guidance: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 3.0, 5.0, 8.0])  # grid rows
    steps: int = 25                                        # sampler steps per image
    sampler: str = "ddim"                                  # ldm.diffusion.samplers name
    seed: int = 0                                          # the same noise for every row
    score: int = 0                                         # shapes data: held-out prompts drawn at w = guidance and
                                                           # scored by the oracle (val/accuracy, val/fd); 0 = off

    def __post_init__(self):
        if self.score < 0:
            raise ValueError(f"val.score must be >= 0, got {self.score}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if not self.prompts or not self.guidance or self.steps < 1:
            raise ValueError("needs at least one prompt, one guidance weight and steps >= 1")


@dataclass
class LoRAConfig:
    """Fine-tune low-rank updates of a trained net's attention projections only (Hu et al. 2021)."""
    rank: int = 0                                          # 0 = off (train every weight); SD LoRAs: 4-128
    alpha: float = 0.0                                     # the update is scaled by alpha / rank; 0 = rank (scale 1)
    targets: list[str] = field(default_factory=list)       # [] = the net's attention: U-Net to_q/k/v/out (ours;
                                                           # diffusers: to_out.0), MMDiT both streams', Flux both
                                                           # streams' and its single blocks' q/k/v (diffusers' names)

    def __post_init__(self):
        if self.rank < 0 or self.alpha < 0:
            raise ValueError(f"lora.rank and lora.alpha must be >= 0, got {self.rank}, {self.alpha}")

    def settle_targets(self, net: str) -> None:
        """Fill in `net`'s default targets, and refuse names that are not its layers'."""
        if net == "mmdit":
            self.targets = self.targets or list(MMDIT_TRAIN_TARGETS)
            unknown, known = sorted(set(self.targets) - set(MMDIT_TARGETS)), f"{list(MMDIT_TARGETS)} (SD3's names)"
        elif net == "flux":
            self.targets = self.targets or list(FLUX_TRAIN_TARGETS)
            unknown, known = sorted(set(self.targets) - set(FLUX_TARGETS)), f"{list(FLUX_TARGETS)} (FLUX.1's names)"
        else:
            self.targets = self.targets or list(TRAIN_TARGETS)
            unknown = sorted(set(self.targets) - set(TRAIN_TARGETS) - {"proj_in", "proj_out", "proj", "out"})
            known = f"{list(TRAIN_TARGETS)} (attention), proj_in/proj_out (linear projections), proj/out (feed-forward)"
        if unknown:
            raise ValueError(f"lora.targets: {unknown} are not layers of a net={net}; pick from {known}")


@dataclass
class PriorConfig:
    """DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2): fine-tune on a few pictures of one subject while
    a second loss, on pictures of its class that the model drew before training, keeps the class as it was."""
    class_prompt: str = ""                                 # e.g. "a photo of a dog"; "" = off. Needs init_from
    class_images: int = 100                                # drawn once by init_from's teacher into <output_dir>/class-images
    weight: float = 1.0                                    # lambda: loss = instance loss + lambda x class loss
    steps: int = 25                                        # DDIM steps of those drawings (at the model's default w)

    def __post_init__(self):
        if self.class_images < 1 or self.steps < 1 or self.weight < 0:
            raise ValueError(f"prior.class_images and prior.steps must be >= 1 and prior.weight >= 0, got "
                             f"{self.class_images}, {self.steps}, {self.weight}")


@dataclass
class LatentStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    net: Literal["unet", "mmdit", "flux"] = "unet"         # the denoiser: the `unet`, `mmdit` or `flux` section's
    unet: UNetConfig = field(default_factory=UNetConfig)
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)  # net=mmdit: SD3's transformer (defaults: SD3 medium)
    flux: FluxConfig = field(default_factory=FluxConfig)   # net=flux: FLUX.1's transformer (defaults: its shape,
                                                           # schnell's guidance_embeds false; -dev: true)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    val: ValConfig = field(default_factory=ValConfig)
    autoencoder: str = "runs/ae-shapes64/autoencoder"      # stage-1 folder (config.json + model.safetensors)
    p_uncond: float = 0.1                                  # caption -> "" with this probability (CFG)
    latents: Literal["sample", "mode"] = "sample"          # z ~ q(z|x), or its mean
    cache_latents: bool = False                            # encode the (finite) data set once
    cache_dir: str = ""                                    # "" = <output_dir>/latent-cache
    guidance: float = 2.0                                  # default w written to model_index.json
    flux_guidance: float = 3.5                             # net=flux with flux.guidance_embeds (FLUX.1-dev, guidance-
                                                           # distilled): the guidance scale the net is fed in training
                                                           # (diffusers' train_dreambooth_lora_flux.py: 3.5)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # model-folder weights (checkpoints stay fp32)
    init_from: str = ""                                    # a model folder whose unet/ (+ text_encoder/) start the run
    image_input: Literal["", "instruct-pix2pix"] = ""      # instruct-pix2pix: learn to edit data.source=shapes-edits'
                                                           # before-images (Brooks et al. 2023): unet.in_channels =
                                                           # 2 x latent, init_from's input conv widened by zeros, the
                                                           # text, the image and both dropped with p_uncond each
    # scratch text encoder: trained jointly (LDM), or frozen at its seeded random init. Frozen keeps
    # words distinct that joint training merged: the shapes64 teacher's "left"/"right" (docs/stage2-latent.md).
    train_text_encoder: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank > 0: only LoRA updates train (needs init_from)
    prior: PriorConfig = field(default_factory=PriorConfig)  # class_prompt != "": DreamBooth's class prior loss
    moved_keys: ClassVar[dict[str, str]] = {               # a preset or a saved config.yaml that still has them fails
        "ti": "textual inversion moved to stages/train_embedding.py (configs/embedding/*.yaml; there ti.word/init_word/"
              "vectors are embedding.word/init_word/vectors, ti.template is templates, init_from is model)"}
    retired_when_off: ClassVar[dict[str, str]] = {"ti": "word"}   # older runs' config.yaml: ti.word "" (off) still loads

    def __post_init__(self):
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if not 0.0 <= self.flux_guidance < float("inf"):
            raise ValueError(f"flux_guidance must be a finite guidance scale >= 0, got {self.flux_guidance}")
        if self.lora.rank and not self.init_from:
            raise ValueError("lora.rank > 0 fine-tunes a trained U-Net: set init_from=MODEL_FOLDER (e.g. one "
                             "written by `python -m ldm.models.from_diffusers`)")
        self.lora.settle_targets(self.net)
        if self.val.score and self.data.source != "shapes":
            raise ValueError("val.score needs data.source=shapes: the oracle knows only the shapes world")
        if (self.image_input == INSTRUCT) != (self.data.source == "shapes-edits"):
            raise ValueError(f"image_input={self.image_input!r} with data.source={self.data.source!r}: an "
                             "InstructPix2Pix model learns from (before, instruction, after) triples, and those triples "
                             "train nothing else: set both image_input=instruct-pix2pix and data.source=shapes-edits")
        if self.image_input and (self.net != "unet" or self.cache_latents or self.prior.class_prompt):
            raise ValueError("image_input=instruct-pix2pix trains a U-Net (net=unet) on images encoded as it goes "
                             "(cache_latents=false: the cache holds one image per item), without prior.class_prompt")
        if self.lora.rank and self.train.posthoc_ema.sigma_rels:
            raise ValueError("train.posthoc_ema with lora.rank > 0: the snapshots would hold the LoRA updates alone, "
                             "which ldm.training.posthoc_ema cannot merge into a model folder; leave sigma_rels []")
        if self.prior.class_prompt and not self.init_from:
            raise ValueError("prior.class_prompt keeps a trained model's class while it learns a subject: it needs "
                             "init_from=MODEL_FOLDER (the class pictures are its drawings)")
        self.data = one_batch_size(self.data, self.train)

    @property
    def network(self) -> UNetConfig | MMDiTConfig | FluxConfig:
        """The chosen net's section: `unet`, `mmdit` or `flux`."""
        return {"mmdit": self.mmdit, "flux": self.flux}.get(self.net, self.unet)

    @property
    def guidance_input(self) -> float | None:
        """The guidance scale a guidance-distilled net (FLUX.1-dev) is fed in training; None for other nets."""
        return self.flux_guidance if self.net == "flux" and self.flux.guidance_embeds else None


# ----------------------------------------------------------------------------- pieces

class LatentModel(nn.Module):
    """What the optimizer trains: the net (U-Net, MMDiT or Flux, `unet`) and, when trained jointly (scratch), the text
    encoder. guidance: the constant guidance scale a guidance-distilled net (FLUX.1-dev) is fed; None for others."""

    def __init__(self, unet: UNet | MMDiT | Flux, text_encoder: nn.Module, train_text: bool,
                 guidance: float | None = None):
        super().__init__()
        self.unet, self.guidance = unet, guidance
        if train_text:
            self.text_encoder = text_encoder
        else:
            self._frozen = [text_encoder]  # a list hides it from parameters(), checkpoints and EMA

    @property
    def encoder(self) -> nn.Module:
        return self.text_encoder if hasattr(self, "text_encoder") else self._frozen[0]

    def forward(self, x, t, prompts: list[str], time_ids=None, image_latents=None):
        if image_latents is not None:                      # InstructPix2Pix: [z_t | E(c_I)] (Brooks et al. sec. 3.2.1)
            x = torch.cat([x, image_latents.to(x.dtype)], dim=1)
        if hasattr(self.encoder, "encode_pooled"):          # SDXL, SD3, FLUX.1: pooled text beside the tokens
            context, mask, pooled = self.encoder.encode_pooled(prompts)
            if isinstance(self.unet, MMDiT):                # SD3 attends to every token and takes no size numbers
                return self.unet(x, t, context, pooled=pooled)
            if isinstance(self.unet, Flux):                 # so does FLUX.1; -dev takes its guidance scale too
                guidance = {} if self.guidance is None else {"guidance": self.guidance}
                return self.unet(x, t, context, pooled=pooled, **guidance)
            return self.unet(x, t, context, context_mask=mask, pooled=pooled, time_ids=time_ids)
        context, mask = self.encoder(prompts)              # (B, L, D), (B, L)
        return self.unet(x, t, context, context_mask=mask)


def load_autoencoder(path: str, device) -> AutoencoderKL:
    """The stage-1 autoencoder, frozen: eval mode, no gradients."""
    ae = AutoencoderKL.from_pretrained(path, device=device).eval().requires_grad_(False)
    if ae.config.scaling_factor == 1.0:
        logger.warning("autoencoder %s has scaling_factor 1.0: was it measured on data? "
                       "Latents far from unit variance distort the noise schedule", path)
    return ae


def check_conditioning(cfg: LatentStageConfig, text_encoder: nn.Module) -> None:
    """The net takes what the text encoder gives: an MMDiT or a Flux tokens of its context_dim and pooled text of its
    pooled_dim (an MMDiT's 0: none); SDXL's U-Net the pooled text and six size numbers in its added embedding."""
    pooled = text_encoder.pooled_dim if hasattr(text_encoder, "encode_pooled") else 0
    if cfg.net in ("mmdit", "flux"):
        net = cfg.network
        if (net.pooled_dim, net.context_dim) != (pooled, text_encoder.dim):
            raise ValueError(f"{cfg.net}.pooled_dim={net.pooled_dim} and {cfg.net}.context_dim={net.context_dim} "
                             f"must be the pooled width ({pooled}; 0 = no pooled text) and the token width "
                             f"({text_encoder.dim}) of text.kind={cfg.text.kind}")
        return
    if cfg.text.kind in ("sd3", "flux"):
        net = {"sd3": "SD3's transformer: set net=mmdit (and its `mmdit` section)",
               "flux": "FLUX.1's transformer: set net=flux (and its `flux` section)"}[cfg.text.kind]
        raise ValueError(f"text.kind={cfg.text.kind} conditions {net}")
    if (cfg.unet.added_cond is not None) != hasattr(text_encoder, "encode_pooled"):
        raise ValueError(f"unet.added_cond={cfg.unet.added_cond!r} needs text.kind=sdxl and text.kind=sdxl needs "
                         f"unet.added_cond='text_time' (SDXL), got text.kind={cfg.text.kind!r}")
    if cfg.unet.added_cond and pooled + 6 * cfg.unet.added_id_dim != cfg.unet.added_in_dim:
        raise ValueError(f"unet.added_in_dim={cfg.unet.added_in_dim} is not the pooled text ({pooled}) "
                         f"and 6 size numbers x {cfg.unet.added_id_dim}: stage 2 trains SDXL base-style U-Nets "
                         "(not the refiner's aesthetic-score numbers)")


def init_weights(model: LatentModel, folder: str, image_input: str = "") -> None:
    """Fine-tuning: start from a model folder's weights (a resumed checkpoint still takes precedence).

    The architecture comes from this run's config; a folder that does not fit it fails, naming the keys.
    Two exceptions, both starting the run as exactly the folder's model: unet.pos_embed=true on a folder trained
    without it gets zero position projections; image_input=instruct-pix2pix on a text-to-image folder gets its
    input conv widened by zero image channels.
    """
    unet_path = str(Path(folder) / "unet" / WEIGHTS_NAME)
    unet_state = read_weights(unet_path)
    own = model.unet.state_dict()
    if image_input == INSTRUCT and unet_state["conv_in.weight"].shape[1] < own["conv_in.weight"].shape[1]:
        unet_state["conv_in.weight"] = widen_input(unet_state["conv_in.weight"], own["conv_in.weight"].shape[1])
        logger.info("input conv widened to %d channels, the image's zero-initialised", own["conv_in.weight"].shape[1])
    new = [k for k in own if ".pos_proj." in k and k not in unet_state]
    if new:
        unet_state.update({k: torch.zeros_like(own[k]) for k in new})
        logger.info("position embeddings: %d new tensors, zero-initialised", len(new))
    load_state_dict_strict(model.unet, unet_state, unet_path)
    if hasattr(model, "text_encoder"):
        load_weights(model.text_encoder, str(Path(folder) / "text_encoder" / WEIGHTS_NAME))
    logger.info("initialised from %s", folder)


def add_lora_updates(model: LatentModel, cfg: LatentStageConfig) -> None:
    """lora.rank > 0: freeze everything (text encoder included), then wrap the net's targets in LoRALinear."""
    if cfg.lora.rank:
        model.requires_grad_(False)
        targets = mmdit_targets(cfg.lora.targets) if cfg.net == "mmdit" else \
            flux_targets(cfg.lora.targets, cfg.flux) if cfg.net == "flux" else cfg.lora.targets
        add_lora(model.unet, cfg.lora.rank, cfg.lora.alpha or None, targets)


def model_index(cfg: LatentStageConfig) -> ModelIndex:
    """model_index.json of the folder the run writes (FLUX.1: its dynamic shift, -dev's guidance input too)."""
    d = cfg.diffusion
    return ModelIndex(schedule=d.schedule_config(), prediction=d.prediction, time_scale=d.time_scale,
                      resolution=cfg.data.resolution, guidance=cfg.guidance, data=cfg.data.source,
                      dynamic_shift=dict(d.dynamic_shift) or None, guidance_embed=cfg.guidance_input is not None,
                      image_input=cfg.image_input)


def plain_model(cfg: LatentStageConfig, net: LatentModel) -> LatentModel:
    """An unsharded LatentModel of the same architecture (FSDP2 runs validate and export from one)."""
    train_text = cfg.text.kind == "scratch"
    text_encoder = build_text_encoder(cfg.text) if train_text else net.encoder  # a frozen one is not sharded
    plain = LatentModel(build_net(cfg.network), text_encoder, train_text, cfg.guidance_input)
    add_lora_updates(plain, cfg)
    return plain


@torch.no_grad()
def validate(accelerator, net: LatentModel, ae, cfg: LatentStageConfig, step: int) -> None:
    """A PNG grid, rows = guidance weights, columns = the same prompts and noise; DDIM (main process only)."""
    pipe = TextToImage(ae, net.encoder, net.unet, model_index(cfg))  # own seeded generator inside
    if cfg.image_input == INSTRUCT:                        # rows: before, target, edits; held-out triples
        rows = edit_rows(pipe, cfg)
    else:
        rows = [pipe.generate(cfg.val.prompts, steps=cfg.val.steps, guidance=w, seed=cfg.val.seed,
                              sampler=cfg.val.sampler)[0] for w in cfg.val.guidance]
    if cfg.val.score:
        with torch.random.fork_rng():  # building the oracle's net draws its init from the global RNG
            score_heldout(accelerator, pipe, cfg, step)
    net.train()
    log_images(accelerator, torch.cat(rows), step, output_dir=cfg.train.output_dir, nrow=len(cfg.val.prompts))


def edit_rows(pipe: TextToImage, cfg: LatentStageConfig) -> list[torch.Tensor]:
    """InstructPix2Pix validation: as many held-out triples as val.prompts; rows = the before-images, the after-images,
    then the model's edits at each val.guidance w (s_I at its default)."""
    from ldm.data.edits import generate_edit
    from ldm.data.shapes import render
    from ldm.data.transforms import to_tensor
    triples = [generate_edit(cfg.data.seed, i, "heldout", cfg.data.resolution) for i in range(len(cfg.val.prompts))]
    before, after = (torch.stack([to_tensor(render(getattr(s, part))) for s in triples]) for part in ("before", "after"))
    edits = [pipe.edit(before, [s.instruction for s in triples], steps=cfg.val.steps, guidance=w, seed=cfg.val.seed,
                       sampler=cfg.val.sampler)[0] for w in cfg.val.guidance]
    return [before.to(edits[0].device), after.to(edits[0].device), *edits]


_REFERENCE: dict = {}                                      # the oracle and its features of the real scenes, once


def score_heldout(accelerator, pipe: TextToImage, cfg: LatentStageConfig, step: int) -> dict:
    """val.score held-out prompts at w = cfg.guidance, judged by the oracle as `python -m ldm.eval` does;
    logged and written to samples/step-<step>-score.json."""
    from ldm.eval.metrics import heldout_prompts
    from ldm.eval.oracle import Oracle
    from ldm.eval.score import evaluate_images, real_images
    n = cfg.val.score
    if _REFERENCE.get("n") != n:
        oracle = Oracle.load()
        _REFERENCE.update(n=n, oracle=oracle, reals=oracle.features(real_images(n, 0)))
    prompts = heldout_prompts(n, 0)
    images = torch.cat([pipe.generate(prompts[i:i + 100], steps=cfg.val.steps, guidance=cfg.guidance, seed=i,
                                      sampler=cfg.val.sampler)[0].cpu() for i in range(0, n, 100)])
    result = evaluate_images(_REFERENCE["oracle"], images, prompts, _REFERENCE["reals"])
    scores = {"step": step, "prompts": n, "guidance": cfg.guidance, "steps": cfg.val.steps,
              "accuracy": result["accuracy"], "one_object": result["one_object"],
              "two_object": result["two_object"], "fd": result["fd"]}
    accelerator.log({"val/accuracy": scores["accuracy"], "val/fd": scores["fd"]}, step=step)
    logger.info("step %d: %d held-out prompts %.1f%% right, FD %.3f", step, n, 100 * scores["accuracy"], scores["fd"])
    out = Path(cfg.train.output_dir) / "samples" / f"step-{step:06d}-score.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(scores, indent=2))
    return scores


def at_size(loss_fn: DiffusionLoss, z: torch.Tensor, cfg: LatentStageConfig) -> DiffusionLoss:
    """`loss_fn`, with diffusion.time_shift=dynamic its training times moved by the grid shift the model folder samples
    latents of z's size with (FLUX.1: resolution_shift of the token count), as SD3's fixed time_shift is its folder's
    fixed grid shift."""
    if cfg.diffusion.time_shift == "dynamic":
        factor = cfg.network.downsample_factor
        loss_fn.time_shift = resolution_shift((z.shape[-2] // factor) * (z.shape[-1] // factor),
                                              **cfg.diffusion.dynamic_shift)
    return loss_fn


def save_lora_file(unet: UNet | MMDiT | Flux, path: Path) -> None:
    """The LoRA updates alone, in diffusers' layout (`--lora FILE` here, `load_lora_weights` there); atomic."""
    tensors, metadata = lora_file_state(unet)
    write_safetensors_atomic(tensors, path, metadata)


@torch.no_grad()
def save_model_folder(net: LatentModel, cfg: LatentStageConfig, folder: Path) -> None:
    """autoencoder/ (copied), text_encoder/, unet/ (the weights of `net`) and model_index.json; atomic."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "autoencoder").mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(Path(cfg.autoencoder) / name, tmp / "autoencoder" / name)
    dtype = getattr(torch, cfg.save_dtype)
    unet = net.unet
    if cfg.lora.rank:  # the folder holds plain weights, the updates merged in; the LoRA file goes beside it
        unet = build_net(cfg.network)
        unet.load_state_dict(merged_state_dict(net.unet))
        save_lora_file(net.unet, folder.parent / "lora.safetensors")
    unet.save_pretrained(str(tmp / "unet"), dtype=dtype)
    if cfg.text.kind == "scratch":
        net.text_encoder.save_pretrained(str(tmp / "text_encoder"), dtype=dtype)
    else:  # a frozen encoder is named, not copied
        (tmp / "text_encoder").mkdir()
        (tmp / "text_encoder" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg.text), indent=2))
    save_index(str(tmp), model_index(cfg))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def draw_class_images(accelerator, cfg: LatentStageConfig) -> Path:
    """<output_dir>/class-images: prior.class_images pictures of prior.class_prompt drawn by init_from's teacher
    (image i from seed i, so a stopped run resumes where it stopped); metadata.jsonl, written last, marks it done."""
    folder = Path(cfg.train.output_dir) / "class-images"
    meta, n, prompt = folder / "metadata.jsonl", cfg.prior.class_images, cfg.prior.class_prompt
    rows = [json.dumps({"file_name": f"{i:05d}.png", "text": prompt}) + "\n" for i in range(n)]
    if accelerator.is_main_process and not (meta.is_file() and meta.read_text() == "".join(rows)):
        from PIL import Image

        from ldm.training.images import make_grid
        folder.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        with torch.random.fork_rng():          # building the pipeline draws module inits from the global RNG
            pipe = TextToImage.from_folder(cfg.init_from, device=accelerator.device)
            todo = [i for i in range(n) if not (folder / f"{i:05d}.png").is_file()]
            logger.info("drawing %d class images of %r (%d steps)", len(todo), prompt, cfg.prior.steps)
            for k in range(0, len(todo), 16):
                seeds = todo[k:k + 16]
                images, _ = pipe.generate([prompt] * len(seeds), steps=cfg.prior.steps, seed=seeds, teacher=True)
                for i, image in zip(seeds, images):
                    Image.fromarray(make_grid(image[None], nrow=1, padding=0)).save(folder / f"{i:05d}.png")
        meta.write_text("".join(rows))
    accelerator.wait_for_everyone()
    return folder


def class_loader(cfg: LatentStageConfig, folder: Path, accelerator):
    """The class pictures as a second seeded, resumable loader: square centre crops at data.resolution."""
    data = dataclasses.replace(cfg.data, source="imagefolder", path=str(folder), crop="center", flip=False,
                               buckets=False, control_column="", seed=cfg.data.seed + 1)
    return make_dataloader(data, accelerator)


# ----------------------------------------------------------------------------- the stage

def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(LatentStageConfig, "Stage 2: text-conditioned latent U-Net with classifier-free guidance.",
                     DEFAULT_CONFIG, argv)
    accelerator = setup(cfg.train, cfg, project="latent")
    device, output_dir = accelerator.device, Path(cfg.train.output_dir)

    # Frozen stage-1 autoencoder: images <-> latents at unit scale.
    ae = load_autoencoder(cfg.autoencoder, device)
    check_image_multiple(cfg.data, ae.config.downsample_factor * cfg.network.downsample_factor,
                         "the autoencoder's factor x " + {"mmdit": "the MMDiT's patch size",
                                                          "flux": "the Flux transformer's 2 x 2 packing"}.get(
                             cfg.net, "the U-Net's downsampling"))

    # Data: cached posterior moments of a finite set, or images encoded on the fly.
    data = stage_loader(accelerator, cfg.data, ae, cfg.autoencoder,
                        (cfg.cache_dir or output_dir / "latent-cache") if cfg.cache_latents else None)

    # Text encoder + net (U-Net, MMDiT or Flux), wrapped as one module: one optimizer, one EMA, one checkpoint file.
    text_encoder = build_text_encoder(cfg.text).to(device)
    check_conditioning(cfg, text_encoder)
    if cfg.image_input == INSTRUCT:                        # noisy latents + the image's latents
        check_unet(cfg.unet.in_channels, ae.config.z_channels, "unet.in_channels")
    unet = build_net(cfg.network)
    if cfg.net == "mmdit" and not cfg.init_from:
        unet.init_for_training()                           # adaLN-Zero (Peebles & Xie 2023)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = LatentModel(unet, text_encoder, train_text=cfg.text.kind == "scratch", guidance=cfg.guidance_input)
    if cfg.init_from:
        init_weights(model, cfg.init_from, cfg.image_input)
    add_lora_updates(model, cfg)                           # lora.rank > 0: only the low-rank updates train
    if cfg.text.kind == "scratch" and not cfg.train_text_encoder:
        # Still part of the model (checkpointed, exported), just not optimised.
        model.text_encoder.requires_grad_(False)
    text_params = count_params(model) - count_params(unet)
    logger.info("%s %.2fM params, %s text encoder %.2fM params", type(unet).__name__, count_params(unet) / 1e6,
                "trained" if cfg.train_text_encoder and not cfg.lora.rank else "frozen", text_params / 1e6)
    if cfg.lora.rank:
        logger.info("LoRA rank %d on %s: %.3fM trainable params", cfg.lora.rank, "/".join(cfg.lora.targets),
                    sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)

    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)    # stepped by us, not prepared
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    ema = EMA(net, cfg.train.ema_decay, cfg.train.ema_power) if cfg.train.ema_decay > 0 else None
    # EDM2's power EMAs beside it (train.posthoc_ema): snapshots for rebuilding any EMA length after the run.
    phema = power_ema_from_config(net, cfg.train.posthoc_ema, output_dir)
    model_config = {cfg.net: config_to_dict(cfg.network), "text": config_to_dict(cfg.text),
                    "autoencoder": config_to_dict(ae.config)}
    if cfg.lora.rank:  # the checkpoints hold the updates only: the frozen base must be the same on resume
        model_config |= {"lora": config_to_dict(cfg.lora), "init_from": cfg.init_from}
    prior = class_loader(cfg, draw_class_images(accelerator, cfg), accelerator) if cfg.prior.class_prompt else None
    ckpt = Checkpointer(accelerator, cfg.train, stage="latent", config=cfg, model=model, optimizer=optimizer,
                        scheduler=scheduler, ema=ema, data=data, model_config=model_config,
                        extras={k: v for k, v in {"class_data": prior, "power_ema": phema}.items() if v is not None},
                        trainable_only=cfg.lora.rank > 0)
    step = ckpt.resume()  # restores the RNG last
    if phema is not None:   # a fresh run refuses old snapshots; a resumed one redoes those after its checkpoint
        phema.settle_folder(step, drop_later=accelerator.is_main_process)

    loss_fn = DiffusionLoss(schedule_from_config(cfg.diffusion.schedule_config()), cfg.diffusion.prediction,
                            cfg.diffusion.weighting, cfg.diffusion.gamma, cfg.diffusion.time,
                            cfg.diffusion.time_scale, 1.0 if cfg.diffusion.time_shift == "dynamic" else
                            cfg.diffusion.time_shift,
                            cfg.diffusion.time_shift_share, cfg.diffusion.noise_offset,
                            cfg.diffusion.input_perturbation, cfg.diffusion.logit_mean, cfg.diffusion.logit_std,
                            cfg.diffusion.loss_type, cfg.diffusion.huber_schedule, cfg.diffusion.huber_c,
                            multires_noise_iterations=cfg.diffusion.multires_noise_iterations,
                            multires_noise_discount=cfg.diffusion.multires_noise_discount)
    guard = NonFiniteGuard(cfg.train.max_nonfinite)
    bar = ProgressBar(accelerator, cfg.train.max_steps, initial=step)
    batches = data.forever()
    class_batches = prior.forever() if prior is not None else None

    sdxl_net = cfg.net == "unet" and cfg.unet.added_cond is not None   # takes each picture's size numbers
    model.train()
    while step < cfg.train.max_steps:
        batch = next(batches)
        with torch.no_grad():  # latents at unit scale; a fresh posterior sample each time (latents=sample)
            if cfg.cache_latents:
                z = scaled_latents(batch["mean"].to(device), batch["std"].to(device), ae.config,
                                   sample=cfg.latents == "sample")
            else:
                z = ae.encode_latents(batch["pixel_values"].to(device), sample=cfg.latents == "sample")
        edit = {}
        if cfg.image_input == INSTRUCT:                    # the before-image's latents as inference feeds them
            with torch.no_grad():
                source = training_image_latents(ae, batch["source_pixels"].to(device))
            prompts, source = drop_conditions(batch["text"], source, cfg.p_uncond)   # text, image, both: p each
            edit = {"image_latents": source}
        else:
            prompts = drop_captions(batch["text"], cfg.p_uncond)  # (B,) per-sample, from the seeded global RNG
        factor = ae.config.downsample_factor      # SDXL: each picture's own size and crop numbers
        sdxl = {"time_ids": sdxl_time_ids(batch.get("size_ids"), z.shape, factor).to(device)} if sdxl_net else {}
        if class_batches is not None:                      # DreamBooth: the class as the model drew it
            pictures = next(class_batches)
            with torch.no_grad():
                z_class = ae.encode_latents(pictures["pixel_values"].to(device), sample=cfg.latents == "sample")
            class_prompts = drop_captions(pictures["text"], cfg.p_uncond)
            class_sdxl = {"time_ids": sdxl_time_ids(pictures.get("size_ids"), z_class.shape, factor).to(device)} \
                if sdxl else {}
        with accelerator.accumulate(model):
            loss = at_size(loss_fn, z, cfg)(model, z, {"prompts": prompts, **sdxl, **edit})
            if class_batches is not None:                  # Ruiz et al. eq. 2: + lambda x the class's own loss
                loss = loss + cfg.prior.weight * at_size(loss_fn, z_class, cfg)(
                    model, z_class, {"prompts": class_prompts, **class_sdxl})
            guard.observe(loss)
            accelerator.backward(loss)
            update = None
            if accelerator.sync_gradients:
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=cfg.train.max_grad_norm, ema=ema, power_ema=phema)
        if update is None:  # mid-accumulation, or a skipped non-finite update
            continue

        step += 1
        bar.update(update)
        if step % cfg.train.log_every == 0:
            accelerator.log({**update.metrics(), "train/latent_std": z.std().item(),
                             "train/skipped": guard.total_skipped}, step=step)
        if cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0:
            # EMA weights on the main process; under FSDP2 every process gathers them into a plain copy.
            with ema_copy(accelerator, model, ema, lambda: plain_model(cfg, net)) as ema_net:
                if ema_net is not None:
                    validate(accelerator, ema_net, ae, cfg, step)
                    save_model_folder(ema_net, cfg, output_dir / "model")
        if phema is not None and accelerator.is_main_process:
            phema.maybe_snapshot(step, cfg.train.max_steps)
        ckpt.maybe_save(step)

    bar.close()
    with ema_copy(accelerator, model, ema, lambda: plain_model(cfg, net)) as ema_net:
        if ema_net is not None:
            save_model_folder(ema_net, cfg, output_dir / "model")
            logger.info("model folder: %s", output_dir / "model")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir / "model"


if __name__ == "__main__":
    main(sys.argv[1:])
