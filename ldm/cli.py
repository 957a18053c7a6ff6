"""What txt2img, img2img and inpaint share: the model and sampling flags, loading the pipeline with LoRA,
embeddings and ControlNet, reading images, and writing PNGs with their settings inside."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.diffusion.composable import check_composition
from ldm.diffusion.guidance import APG, check_interval
from ldm.diffusion.sag import THRESHOLD as SAG_THRESHOLD
from ldm.diffusion.restart import Restart, format_restart, parse_restart
from ldm.diffusion.samplers import CFG_PP_SAMPLERS, ETA_OPTIONS, check_eta
from ldm.diffusion.schedules import SPACINGS
from ldm.instruct_pix2pix import INSTRUCT
from ldm.models.embeddings import parse_embedding_arg
from ldm.models.lora import parse_lora_arg, read_lora
from ldm.models.prompt_compose import has_and, is_composed, parse_composable
from ldm.models.prompt_loras import find_lora, has_tags, hashes_text, split_tags, strip_tags
from ldm.models.prompt_schedule import is_scheduled, prompt_schedule
from ldm.models.prompt_weights import parse_weighted, token_weights, tokenizer_weights
from ldm.models.unet import self_attention_layers
from ldm.models.vae_tiling import parse_tiling
from ldm.pipeline import DECODER_PRECISIONS, DEFAULT_MODEL, INDEX_NAME, TextToImage
from ldm.training.images import make_grid

NET_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLI_SAMPLERS = ["ddim", "stochastic", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m",
                "dpmpp_3m_sde", "unipc", "lms", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "deis",
                "restart", "lcm", "tcd", "ddpm", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
                "dpmpp_2s_ancestral_cfg_pp"]
STUDENT_STEPS = 4      # the default where a 4-step student exists (the shipped model's: 87.4%, 17 ms)
TEACHER_STEPS = 25     # else the teacher's: DDIM + CFG at 4 steps is far from converged


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768): width, height."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}") from None
    return width, height


def parse_control_range(text: str) -> tuple[float, float]:
    """'0.25:0.75' -> (0.25, 0.75): the fractions of the run a ControlNet acts on, 0 <= START < END <= 1."""
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END such as 0:0.6, got {text!r}") from None
    if not 0 <= start < end <= 1:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END <= 1, got {text!r}")
    return start, end


def parse_pag_layers(text: str) -> list[str]:
    """'mid,down.1' -> ['mid', 'down.1']: the U-Net self-attention layers perturbed-attention guidance perturbs
    (the model checks the names: ldm.models.unet.self_attention_layers)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected layer names such as mid or mid,down.1,up.0, got {text!r}")
    return names


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """'0.28:5.42' -> (0.28, 5.42); an empty side is unbounded: ':5.42' -> (0.0, inf), '0.28:' -> (0.28, inf)."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep or not (lo.strip() or hi.strip()):
            raise ValueError
        interval = (float(lo) if lo.strip() else 0.0, float(hi) if hi.strip() else math.inf)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI in EDM sigma such as 0.28:5.42 (an empty side is "
                                         f"unbounded: :5.42), got {text!r}") from None
    try:
        return check_interval(interval)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need 0 <= LO < HI, got {text!r}") from None


def format_interval(interval: tuple[float, float]) -> str:
    """The inverse of `parse_guidance_interval`: (0.0, 5.42) -> ':5.42' (the PNG's settings, replayable)."""
    lo, hi = interval
    return ("" if lo == 0 else repr(lo)) + ":" + ("" if hi == math.inf else repr(hi))


def parse_apg(text: str) -> APG:
    """'2' -> APG(2.0), '2:0:-0.5' -> APG(2.0, 0.0, -0.5): R[:ETA[:BETA]], an empty or missing ETA / BETA takes
    APG's default (eta 0, beta -0.5); R may be inf (no cut)."""
    parts = text.split(":")
    try:
        if len(parts) > 3 or not parts[0].strip():
            raise ValueError
        given = {name: float(part) for name, part in zip(("r", "eta", "beta"), parts) if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R[:ETA[:BETA]] such as 2, 2:0 or 2:0:-0.5 (ETA, BETA default 0 "
                                         f"and -0.5), got {text!r}") from None
    try:
        return APG(**given)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def format_apg(apg: APG) -> str:
    """The inverse of `parse_apg`, every part written: APG(2.0) -> '2.0:0.0:-0.5' (the PNG's settings, replayable)."""
    return f"{apg.r!r}:{apg.eta!r}:{apg.beta!r}"


def parse_window(text: str) -> tuple[int | None, int | None]:
    """'64:16' -> (64, 16); '64' -> (64, None); 'native:16' -> (None, 16): None is resolved by `resolve_window`."""
    side, _, stride = text.lower().partition(":")
    try:
        value = (None if side.strip() == "native" else int(side), int(stride) if stride.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIDE[:STRIDE] in pixels such as 64:16 (SIDE may be 'native'), "
                                         f"got {text!r}") from None
    if any(v is not None and v < 1 for v in value):
        raise argparse.ArgumentTypeError(f"SIDE and STRIDE must be positive, got {text!r}")
    return value


def parse_freeu(text: str) -> tuple[float, float, float, float]:
    """'1.5,1.6,0.9,0.2' -> (b1, b2, s1, s2)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected four numbers B1,B2,S1,S2 such as 1.5,1.6,0.9,0.2, got {text!r}")
    return values


def parse_deepcache(text: str) -> tuple[int, int]:
    """'3' -> (3, 0); '3:1' -> (N, BRANCH): DeepCache's full-call interval and skip branch (ldm.models.deepcache)."""
    interval, _, branch = text.partition(":")
    try:
        value = (int(interval), int(branch) if branch.strip() else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[:BRANCH] such as 3 or 3:1, got {text!r}") from None
    if value[0] < 1 or value[1] < 0:
        raise argparse.ArgumentTypeError(f"N must be >= 1 and BRANCH >= 0, got {text!r}")
    return value


def parse_restart_arg(text: str) -> Restart:
    """'0.1:2:2:10' -> Restart(s_min, s_max, K, N); a usage error otherwise."""
    try:
        return parse_restart(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_vae_tiling(text: str) -> str:
    """'off', 'auto' or a tile side in pixels such as '512'."""
    try:
        return parse_tiling(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --steps, --guidance, --seed, --teacher, --sampler, --spacing, --eta, --shift, --negative,
    --guidance-rescale, --guidance-interval, --true-cfg, --apg, --pag, --pag-layers, --sag, --prompt-weights, --embedding, --controlnet, --control-image,
    --control-scale, --control-mode, --control-range, --t2i-adapter, --adapter-image, --adapter-scale,
    --adapter-factor, --ip-adapter,
    --image-encoder, --ip-image, --ip-scale, --freeu, --deepcache, --clip-skip, --lora, --device, --dtype, --decoder-precision,
    --vae-tiling, --window."""
    model = parser.add_argument_group("model and device")
    sampling = parser.add_argument_group("sampling")
    prompt = parser.add_argument_group("prompt")
    adapters = parser.add_argument_group("adapters (LoRA, ControlNet, T2I-Adapter, IP-Adapter)")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR",
                        help="model folder with model_index.json (default: the shipped shapes64 model)")
    sampling.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps (default: {STUDENT_STEPS} when the model has a {STUDENT_STEPS}-step "
                             f"student, else {TEACHER_STEPS} teacher steps, e.g. an imported Stable Diffusion)")
    sampling.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="guidance weight w, (1 + w) cond - w uncond (default: the model's)")
    sampling.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    sampling.add_argument("--subseed", type=int, default=None, metavar="S",
                          help="variation seed (the A1111 web UI's): the starting noise moves from --seed's towards "
                               "S's by --subseed-strength, along the sphere (slerp); in a txt2img grid, "
                               "image i takes --seed and S+i, variations of one image, as A1111 does")
    sampling.add_argument("--subseed-strength", type=float, default=None, metavar="X",
                          help="variation strength in [0, 1] (A1111's): 0 draws --seed's image, 1 --subseed's, 0.1 a "
                               "near variation of --seed's; needs --subseed")
    sampling.add_argument("--teacher", action="store_true", help="use the teacher + CFG even when a student fits")
    sampling.add_argument("--sampler", default="ddim", choices=CLI_SAMPLERS,
                        help="ddim (deterministic) or stochastic (Meng et al. 2023, sec. 4.3), what students were "
                             "distilled for; for the teacher also euler, euler_a (ancestral), heun (Karras et al. "
                             "2022), dpmpp_2m, dpmpp_2m_sde, dpmpp_3m and dpmpp_3m_sde (DPM-Solver++ of second and "
                             "third order and their SDE forms, Lu et al. 2022), unipc (UniPC, Zhao et al. 2023: "
                             "predictor-corrector, diffusers' default for many pipelines), lms, dpm_2, "
                             "dpm_2_ancestral, dpmpp_2s_ancestral and dpmpp_sde (k-diffusion's, the A1111 web UI's "
                             "LMS, DPM2, DPM2 a, DPM++ 2S a and DPM++ SDE: the single-step ones call the net twice a "
                             "step but the last), deis (DEIS, Zhang & Chen 2023: multistep, ComfyUI's deis), "
                             "restart (Restart sampling, Xu et al. 2023, A1111's Restart: heun's steps, then K times "
                             "noise back up an interval and N heun steps down it; --restart), "
                             "lcm (latent consistency models and LCM-LoRAs, e.g. --steps 4 --guidance 0), tcd "
                             "(trajectory consistency distillation's strategic stochastic sampling, Zheng et al. "
                             "2024: lcm's steps with a share --eta of fresh noise; for LCM- and TCD-LoRAs), ddpm, "
                             "and ComfyUI's CFG++ samplers euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2m_cfg_pp and "
                             "dpmpp_2s_ancestral_cfg_pp (Chung et al. 2024: the guided x0-hat renoised with the "
                             "unconditional noise; the teacher's plain CFG only, two net calls a step even at w = 0; "
                             "the paper's scale lambda = ComfyUI's cfg = 1 + w, its range [0, 1] is w in [-1, 0])")
    sampling.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="the time grid: trailing (Lin et al. 2023; what students were distilled on), karras "
                             "(Karras et al. 2022, eq. 5: 'DPM++ 2M Karras' is --sampler dpmpp_2m --spacing karras), "
                             "exponential (even in log sigma), beta (Lee et al. 2024, ComfyUI's 'beta'), ays (Align "
                             "Your Steps, Sabour et al. 2024: NVIDIA's 10-step SD 1.5 noise levels, SDXL's for an SDXL "
                             "U-Net, log-linearly interpolated for other step counts, the same s = sigma / alpha on "
                             "any schedule; not rectified flow), kl_optimal (even in atan(sigma), the same paper's "
                             "KL-optimal schedule: A1111's and ComfyUI's 'KL Optimal'), leading, "
                             "linspace or lcm (n of the 50 times LCMs learn on: stages/distill_lcm.py); default: karras for "
                             "the teacher's heun (the paper's pairing), lcm for the lcm and tcd samplers, else "
                             "trailing")
    sampling.add_argument("--restart", type=parse_restart_arg, default=None, metavar="S_MIN:S_MAX:K:N",
                          help="--sampler restart's restarts: when the Heun solve reaches the grid's noise level "
                               "sigma/alpha nearest S_MIN, K times: noise up to S_MAX, N Heun steps back down (2KN "
                               "more net calls). Xu et al. 2023 use 0.1:2:2:10 on Stable Diffusion. Default: A1111's "
                               "rule from --steps: none below 20, 0.1:2:1:9, from 36 steps 0.1:2:2:steps/4")
    sampling.add_argument("--eta", type=float, default=None, metavar="E",
                          help="the sampler's noise, in [0, 1], for --sampler ddim, tcd and the ancestral ones (diffusers' "
                               "pipelines call the first two eta): DDIM's eta (Song et al. 2021, eq. 16; 0 deterministic, 1 DDPM's posterior "
                               "noise; default 0) and TCD's gamma (Zheng et al. 2024, Alg. 4: each step denoises to "
                               "(1 - E) times the next time, then noises afresh to it; 0 deterministic, 1 is --sampler "
                               "lcm; default 0.3, the authors' advice, higher with more steps); for dpm_2_ancestral, "
                               "dpmpp_2s_ancestral and dpmpp_sde k-diffusion's eta (the share of the ancestral noise; "
                               "0 their deterministic solver; default 1), also for euler_ancestral_cfg_pp and "
                               "dpmpp_2s_ancestral_cfg_pp. Students take it with ddim. Not --apg's ETA")
    prompt.add_argument("--negative", default="", metavar="TEXT",
                        help="negative prompt: guidance's unconditional branch instead of the empty prompt "
                             "(teacher only: add --teacher where a student fits --steps; FLUX.1-dev: with --true-cfg)")
    sampling.add_argument("--shift", type=float, default=None, metavar="S",
                          help="teacher: move the time grid to log-SNR lower by 2 log S, more steps at high noise "
                               "(SD3's timestep shift, 3.0 for SD3 at 1024 px; any schedule). Default: the model "
                               "folder's (rectified flow's `shift`, else 1)")
    sampling.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="rescale the guided prediction's std to the conditional one's, by PHI in [0, 1] "
                             "(Lin et al. 2024, eqs. 15-16; they use 0.7; diffusers' guidance_rescale): less "
                             "over-exposure at high guidance. Teacher only (default: 0, off)")
    sampling.add_argument("--guidance-interval", type=parse_guidance_interval, default=None, metavar="LO:HI",
                          help="teacher: CFG only at noise levels LO < sigma <= HI, EDM's sigma = sigma_t / alpha_t "
                               "of any schedule, the conditional model alone elsewhere (one net call a step instead "
                               "of two; Kynkaanniemi et al. 2024); an empty side is unbounded, e.g. :5.42. The paper "
                               "used 0.28:5.42 for SD-XL (at SD scale 16) and, for the best FID on ImageNet-512, "
                               "0.28:2.90 (EDM2-S) and 0.19:1.61 (EDM2-XXL). With --true-cfg it limits that "
                               "(default: everywhere)")
    sampling.add_argument("--true-cfg", type=float, default=None, metavar="S",
                          help="FLUX.1-dev: real CFG on top of its distilled guidance (--guidance stays its input), "
                               "two net calls a step, neg + S (pos - neg) against --negative (default: the empty "
                               "prompt; with --ip-adapter also a black image). S is diffusers' true_cfg_scale, not "
                               "our w: --true-cfg 4 is w = 3; 1 is off. Other models have real CFG: --guidance W = "
                               "S - 1 (default: off)")
    sampling.add_argument("--apg", type=parse_apg, default=None, metavar="R[:ETA[:BETA]]",
                          help="teacher: adaptive projected guidance (Sadat, Hilliges & Weber 2024, arXiv "
                               "2410.02416) instead of CFG's plain sum, against over-saturation at high --guidance: on the "
                               "x0-hat predictions, the update cond - uncond gets momentum BETA across steps (theirs "
                               "is negative, 'reverse'), its norm is cut to at most R, and its part parallel to the "
                               "conditional prediction is weighted ETA (the rest 1), then cond + W update. R depends "
                               "on the latent size: they used 15 for SD-XL's 128x128x4 latents and 2.5 for EDM2's "
                               "64x64x4; about 2 matches SD-XL's per element on shapes64's 16x16x4. ETA defaults to "
                               "0 and BETA to -0.5 (their recommendation and SD-XL setting); inf:1:0 is plain CFG. "
                               "With --true-cfg it changes that; not with --guidance-rescale (default: off)")
    sampling.add_argument("--pag", type=float, default=None, metavar="S",
                          help="teacher: perturbed-attention guidance (Ahn et al. 2024, 'Self-Rectifying Diffusion "
                               "Sampling with Perturbed-Attention Guidance', arXiv 2403.17377): the conditional "
                               "prediction is made again with the self-attention maps of --pag-layers replaced by the "
                               "identity (each token attends to itself), and the result is pushed away from it, "
                               "CFG + S (cond - perturbed); diffusers' pag_scale (the paper used 3.0 for SD at "
                               "--guidance 0). 3 net calls a step with CFG, 2 with --guidance 0 (PAG alone). U-Nets "
                               "(SD 1.x/2.x, SDXL, ours), not SD3 / FLUX.1 (default: off)")
    sampling.add_argument("--pag-layers", type=parse_pag_layers, default=["mid"], metavar="LIST",
                          help="with --pag: comma-separated U-Net self-attention layers to perturb: mid, down.L, up.L "
                               "(a level, counted as diffusers' down_blocks / up_blocks: up.0 is the deepest decoder "
                               "level) or one transformer, down.L.I; diffusers' names (mid_block, down_blocks.1, "
                               "up_blocks.0.attentions.1) work too; an unknown name lists the model's (default: mid)")
    sampling.add_argument("--sag", type=float, default=None, metavar="S",
                          help="teacher: self-attention guidance (Hong et al. 2023, 'Improving Sample Quality of "
                               "Diffusion Models Using Self-Attention Guidance', arXiv 2210.00939): where the "
                               "unconditional prediction's middle-block self-attention looks most, its x0-hat is "
                               "blurred (Gaussian, sigma 1 latent pixel), renoised and denoised again, and S times the "
                               "difference pushes the result away from it, beside CFG; diffusers' sag_scale (default "
                               "0.75 there), the A1111 SAG extension's 'SAG Guidance Scale'. 3 net calls a step with "
                               "CFG, 2 with --guidance 0. U-Nets with a middle-block transformer, not SD3 / FLUX.1; "
                               "not with --pag, --apg, --guidance-interval, --guidance-rescale, --deepcache (default: "
                               "off)")
    prompt.add_argument("--prompt-weights", default="a1111", choices=["a1111", "off"],
                        help="a1111 (default): read emphasis as the AUTOMATIC1111 web UI does, '(word:1.3)' weights "
                             "a word 1.3, '(word)' 1.1, '[word]' 1/1.1, '\\(' is a literal bracket; and its prompt "
                             "editing: '[from:to:when]' draws FROM up to step WHEN (0.5: half the steps), then TO, "
                             "'[to:when]' adds, '[from::when]' removes; '[a|b]' alternates a and b every step; and "
                             "composable diffusion: 'a red circle AND a blue square :0.8' guides towards each "
                             "sub-prompt (its weight after ':', default 1, negative: away), one net evaluation each, "
                             "teacher only; off: prompts go to the text encoder as typed")
    prompt.add_argument("--embedding", action="append", default=[], metavar="FILE[:WORD]",
                        help="a textual-inversion embedding (A1111 .pt/.safetensors or diffusers) as a new word for "
                             "prompts and --negative: WORD, else the file's name; repeatable. CLIP models (SD 1.x/2.x)")
    adapters.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                        help="a ControlNet folder (diffusers' ControlNetModel, FluxControlNetModel (FLUX.1) or "
                             "SD3ControlNetModel (SD3, SD 3.5 Large; inpainting ones with ldm.inpaint), hub id, "
                             "Stability's single .safetensors of an SD 3.5 Large one, or one of stages/"
                             "train_controlnet.py; shapes64-edges: the shipped one) steering the teacher with "
                             "--control-image (Zhang et al. 2023); repeatable: the n-th goes with the n-th image")
    adapters.add_argument("--control-image", action="append", default=[], metavar="IMAGE",
                        help="the ControlNet's input (edges, depth, pose, ... as that ControlNet expects), resized "
                             "and centre-cropped to the output size")
    adapters.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                        help="ControlNet conditioning scale (default 1.0); one for all, or one per --controlnet")
    adapters.add_argument("--control-mode", action="append", type=int, default=[], metavar="N",
                        help="a FLUX.1 Union ControlNet's control mode (its model card numbers them: canny, tile, "
                             "depth, ...); one for all, or one per --controlnet")
    adapters.add_argument("--control-range", action="append", type=parse_control_range, default=[],
                          metavar="START:END",
                          help="the part of the sampling steps a ControlNet acts on (default 0:1): step i of n when "
                               "i/n >= START and (i+1)/n <= END, as diffusers' control_guidance_start/_end and the "
                               "A1111 web UI's starting/ending control step; one for all, or one per --controlnet")
    adapters.add_argument("--t2i-adapter", action="append", default=[], metavar="DIR",
                          help="a T2I-Adapter (Mou et al. 2023; diffusers' T2IAdapter folder or hub id, e.g. "
                               "TencentARC/t2iadapter_canny_sd15v2, t2i-adapter-sketch-sdxl-1.0) steering the teacher "
                               "with --adapter-image: its features are added in the U-Net's encoder; repeatable (the "
                               "n-th goes with the n-th image; their scaled features add up, as MultiAdapter)")
    adapters.add_argument("--adapter-image", action="append", default=[], metavar="IMAGE",
                          help="the T2I-Adapter's input (sketch, edges, depth, ... as it expects; gray for 1-channel "
                               "adapters), resized and centre-cropped to the output size")
    adapters.add_argument("--adapter-scale", action="append", type=float, default=[], metavar="S",
                          help="T2I-Adapter scale, diffusers' adapter_conditioning_scale (default 1.0); one for all, "
                               "or one per --t2i-adapter")
    adapters.add_argument("--adapter-factor", action="append", type=float, default=[], metavar="F",
                          help="the fraction of the steps a T2I-Adapter acts on, from the first: steps i < int(n F) of "
                               "n, diffusers' adapter_conditioning_factor (default 1.0); one for all, or one per "
                               "--t2i-adapter")
    adapters.add_argument("--ip-adapter", default=None, metavar="FILE",
                        help="an IP-Adapter (Ye et al. 2023; SD 1.x/2.x base variant, or XLabs' flux-ip-adapter for "
                             "FLUX.1: one net call a step unless --true-cfg) to prompt with --ip-image too; needs "
                             "--image-encoder")
    adapters.add_argument("--image-encoder", default=None, metavar="DIR",
                        help="the IP-Adapter's CLIP image encoder (a transformers CLIPVisionModelWithProjection folder)")
    adapters.add_argument("--ip-image", default=None, metavar="IMAGE", help="the image prompt for --ip-adapter")
    adapters.add_argument("--ip-scale", type=float, default=1.0, metavar="S",
                        help="weight of the image prompt's attention (default 1.0; 0.5 mixes it with the text)")
    sampling.add_argument("--freeu", type=parse_freeu, default=None, metavar="B1,B2,S1,S2",
                        help="FreeU (Si et al. 2024): scale the two deepest decoder levels' backbone features by B1, "
                             "B2 and their skips' low frequencies by S1, S2; diffusers' docs give 1.5,1.6,0.9,0.2 "
                             "for SD 1.x and 1.4,1.6,0.9,0.2 for SD 2.1 (default: off)")
    sampling.add_argument("--deepcache", type=parse_deepcache, default=None, metavar="N[:BRANCH]",
                        help="DeepCache (Ma et al. 2024), U-Nets only: every N-th U-Net call of a run in full, the "
                             "others only the shallow blocks around skip BRANCH (default 0, conv_in's: the most "
                             "saved; deeper: closer to the full model), reusing the deep features cached at the last "
                             "full call; calls, not steps, are counted (heun: two a step); e.g. 3 (default: off)")
    prompt.add_argument("--clip-skip", type=int, default=None, metavar="N",
                        help="CLIP models: condition on the N-th layer from the end (A1111's 'clip skip': 1 the last, "
                             "2 the penultimate, as many anime fine-tunes of SD 1.x expect); default: the model's own")
    adapters.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA into the model before sampling, scaled by SCALE (default 1); repeatable. "
                             "Reads diffusers/peft and kohya (A1111, sd-scripts) files for SD 1.x/2.x, SDXL, SD3 "
                             "and FLUX.1 (also BFL/ComfyUI and XLabs layouts), LyCORIS LoHa / LoKr files for "
                             "SD 1.x/2.x and SDXL, and stage 2's lora.safetensors")
    adapters.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                          help="where a prompt's <lora:NAME:WEIGHT> tags (the A1111 web UI's syntax; also "
                               "<lora:NAME:TE:UNET>, <lyco:...>) find NAME.safetensors / .pt / .ckpt, subfolders "
                               "included; repeatable (default: the model folder's loras/ if it has one). A tag's "
                               "LoRA is merged for its prompt only: the weights are restored after each image")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda when there is one, else cpu)")
    model.add_argument("--dtype", default="float32", choices=sorted(NET_DTYPES),
                       help="the networks' and text encoders' weights: bfloat16 / float16 halve the memory of "
                            "SDXL, SD3 and FLUX.1 (the sampler stays fp32; default float32)")
    model.add_argument("--decoder-precision", default="auto", choices=list(DECODER_PRECISIONS),
                        help="autoencoder decoder: auto = bf16 on CPUs with native bf16 (about 2x faster, "
                             "pixels within 0.02 of fp32), else fp32")
    sampling.add_argument("--window", type=parse_window, default=None, metavar="SIDE[:STRIDE]",
                          help="MultiDiffusion (Bar-Tal et al. 2023) for images larger than the model's: denoise "
                               "SIDE x SIDE windows STRIDE px apart (default SIDE/2; the last one flush with the "
                               "edge) and average their predictions where they overlap, e.g. --size 256x64 --window "
                               "64:16 for a panorama from a 64-px model. SIDE: pixels, or 'native' (the model's "
                               "resolution). Any sampler, teacher or student; not with ControlNets, inpainting "
                               "U-Nets, SDXL, SD3 or FLUX.1. Large images: add --vae-tiling to decode them in "
                               "bounded memory (default: off, the network sees the whole image)")
    model.add_argument("--vae-tiling", default="off", type=parse_vae_tiling, metavar="off|auto|PIXELS",
                       help="run the autoencoder in tiles of PIXELS (e.g. 512) so that large images fit in memory; "
                            "the image equals the untiled one (within float rounding, unlike diffusers' blended "
                            "tiles). auto: 512-px tiles on CUDA for images above 2 Mpx (default: off)")


def short_warnings(message, category, filename, lineno, line=None) -> str:
    """A CLI user needs the warning, not the library line that raised it."""
    return f"warning: {message}\n"


def check_prompt_syntax(parser: argparse.ArgumentParser, args, prompts: list[str],
                        pipe: TextToImage | None = None) -> None:
    """A parser error for an unbalanced bracket or a malformed prompt edit, prompt editing in --negative (and,
    given the pipeline, a weight inside a word where its text encoder tokenizes the whole prompt at once: chunked
    CLIP prompts tokenize each piece alone), in each text a prompt edit gives (at --steps, else at 1000 steps)."""
    if args.prompt_weights == "off":
        return
    whole = pipe is not None and not pipe.chunked_prompts
    prompts = [strip_tags(p) for p in prompts]          # <lora:...> tags are cut out before encoding
    try:
        if is_scheduled(args.negative):
            parser.error("--negative: prompt editing '[from:to:when]' and alternation '[a|b]' are read in prompts, "
                         "not in the negative prompt (write \\[ for a literal bracket)")
        if has_and(args.negative):
            parser.error("--negative: AND composes prompts; the negative prompt is the one unconditional text "
                         "(write 'and' for the word)")
        texts = [text for prompt in prompts for sub, _ in parse_composable(prompt)    # "a AND b :0.8": each part
                 for _, text in prompt_schedule(sub, args.steps or 1000)]
    except ValueError as err:
        parser.error(f"{err} (or --prompt-weights off)")
    for prompt in dict.fromkeys([*texts, args.negative]):
        try:
            pieces = parse_weighted(prompt)
            if whole and any(w != 1.0 for _, w in pieces):
                if pipe.text_kind in ("sd3", "flux"):    # SD3's and FLUX.1's token-wise weights, T5's included
                    encoder = pipe.text_encoder
                    for tokenizer, length in ((getattr(encoder, "tokenizer_l", None), encoder.max_length),
                                              (getattr(encoder, "tokenizer_g", None), encoder.max_length),
                                              (encoder.tokenizer_t5, encoder.t5_max_length)):
                        if tokenizer is not None:
                            tokenizer_weights(tokenizer, pieces, length)
                else:
                    token_weights(pipe.text_encoder, pieces)
        except ValueError as err:
            parser.error(f"{err} (or --prompt-weights off)")


def quiet_transformers() -> None:
    """No "Loading weights" bar per CLIP model (transformers 5 draws one for every from_pretrained): the CLI
    has its own progress; transformers' warnings and errors still show. Without importing transformers
    (seconds of start-up a model without CLIP does not pay): it reads the hub's switch when imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()


def parse_replayed(parser: argparse.ArgumentParser, argv: list[str], replay_defaults) -> argparse.Namespace:
    """argv parsed; with --replay, the PNG's settings (`replay_defaults(parser, path)`) become the defaults and the
    flags given now still win. A replayed --eta is dropped where the --sampler given now takes none (replaying a
    dpmpp_sde PNG with --sampler lms), as there is no flag to clear it. A list flag given now (--lora, --controlnet,
    --control-scale, ...) replaces the PNG's list: argparse's append would add to it."""
    args = parser.parse_args(argv)
    if args.replay:
        given = args
        parser.set_defaults(**replay_defaults(parser, args.replay))
        args = parser.parse_args(argv)
        if given.eta is None and args.eta is not None and args.sampler not in ETA_OPTIONS:
            args.eta = None
        if given.restart is None and args.restart is not None and args.sampler != "restart":
            args.restart = None                         # as --eta: a replayed restart PNG with another --sampler
        for action in parser._actions:
            if isinstance(action, argparse._AppendAction) and getattr(given, action.dest):
                setattr(args, action.dest, getattr(given, action.dest))
    if getattr(args, "restart", None) is not None and args.sampler != "restart":
        parser.error(f"--restart S_MIN:S_MAX:K:N is --sampler restart's; --sampler {args.sampler} takes none")
    return args


def check_variation(parser: argparse.ArgumentParser, args) -> None:
    """--subseed and --subseed-strength come together, the strength in [0, 1] (A1111's slider's range)."""
    strength = args.subseed_strength
    if strength is not None and not 0.0 <= strength <= 1.0:
        parser.error(f"--subseed-strength must be in [0, 1], got {strength}")
    if (strength is None) != (args.subseed is None):
        parser.error("--subseed S and --subseed-strength X go together: the noise moves from --seed's towards S's "
                     "by X" + (" (give --subseed)" if args.subseed is None else " (give --subseed-strength)"))


def check_cfg_pp(args, pipe: TextToImage, prompts) -> None:
    """ValueError for what a CFG++ --sampler cannot run with: its model function must give CFG's unconditional
    prediction beside the guided one, which these options' model functions do not."""
    for flag, given in (("--guidance-interval", args.guidance_interval is not None),
                        ("--guidance-rescale", bool(args.guidance_rescale)), ("--pag", bool(args.pag)),
                        ("--sag", bool(args.sag)),
                        ("--window", args.window is not None),
                        ("prompt editing or alternation ('[a:b:when]', '[a|b]')",   # read with a1111 weights
                         args.prompt_weights == "a1111" and any(map(is_scheduled, prompts))),
                        ("composable prompts (AND)",
                         args.prompt_weights == "a1111" and any(map(is_composed, prompts)))):
        if given:
            raise ValueError(f"--sampler {args.sampler} (CFG++) renoises with CFG's unconditional prediction, "
                             f"which CFG with {flag} does not give alone: give one")
    for model, given in (("this model's guidance is distilled into the net (FLUX.1-dev), which runs no CFG: add "
                          "--true-cfg S (S > 1)", pipe.index.guidance_embed and args.true_cfg in (None, 1)),
                         ("an InstructPix2Pix model guides by eq. 3 of Brooks et al. 2023, not CFG: pick "
                          "another sampler", pipe.index.image_input == INSTRUCT)):
        if given:
            raise ValueError(f"--sampler {args.sampler} (CFG++) renoises with CFG's unconditional prediction; "
                             f"{model}")


def load_pipeline(parser: argparse.ArgumentParser, args, prompts: list[str] = ()) -> TextToImage:
    """The model folder, or a parser error that names the missing path or a bad prompt. Warnings print
    as one line."""
    warnings.formatwarning = short_warnings
    check_args(parser, args, prompts)
    if not os.path.isfile(os.path.join(args.model, INDEX_NAME)):
        parser.error(f"--model {args.model!r} is not a model folder: {os.path.join(args.model, INDEX_NAME)} "
                     f"is missing (train one with stages/, or pass --model DIR)")
    quiet_transformers()
    pipe = TextToImage.from_folder(args.model, device=args.device, decoder_precision=args.decoder_precision,
                                   dtype=NET_DTYPES[args.dtype])
    pipe.prompt_weights = args.prompt_weights == "a1111"
    pipe.vae_tiling = args.vae_tiling
    try:
        pipe.set_freeu(args.freeu)
    except ValueError as err:
        parser.error(f"--freeu: {err}")
    try:
        pipe.set_deepcache(*(args.deepcache or (None,)))
    except ValueError as err:
        parser.error(f"--deepcache: {err}")
    set_clip_skip(parser, args, pipe)
    for arg in args.embedding:
        path, word = parse_embedding_arg(arg)
        if not os.path.isfile(path):
            parser.error(f"--embedding {arg!r}: no file {path!r}")
        try:
            word, k = pipe.add_embedding(path, word)
        except ValueError as err:
            parser.error(f"--embedding {arg!r}: {err}")
        print(f"embedding {path}: {word!r}, {k} token{'s' if k > 1 else ''}")
    for arg in args.lora:
        path, scale = parse_lora_arg(arg)
        if not os.path.isfile(path):
            parser.error(f"--lora {arg!r}: no file {path!r}")
        try:
            layers = pipe.add_lora(path, scale)
        except ValueError as err:
            parser.error(f"--lora {arg!r}: {err}")
        print(f"LoRA {path} x {scale:g}: {layers} layers merged")
    tag_sets = {tuple(prompt_loras(parser, args, p)[1]): p for p in reversed(prompts)}   # a prompt for each set
    if len(tag_sets) > 1:        # --from-file: each set merged and restored once here, so that one that does not
        for prompt in tag_sets.values():                # fit the model stops the run before the first image
            with tagged_loras(parser, args, pipe, prompt):
                pass
    if (args.ip_adapter is None) != (args.ip_image is None) or (args.ip_adapter and not args.image_encoder):
        parser.error("--ip-adapter, --image-encoder and --ip-image go together")
    if args.ip_adapter:
        try:
            if not os.path.isfile(args.ip_image):
                raise FileNotFoundError(f"no image {args.ip_image!r}")
            pipe.add_ip_adapter(args.ip_adapter, args.image_encoder, args.ip_scale)
        except (OSError, ValueError) as err:
            parser.error(f"--ip-adapter {args.ip_adapter}: {err}")
    check_run(parser, args, pipe, prompts)
    return pipe


def check_args(parser: argparse.ArgumentParser, args, prompts: list[str] = ()) -> None:
    """The usage errors of add_model_args' flags that need no model: --steps, --eta, the prompts' syntax, variation."""
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        check_eta(args.sampler, args.eta)
    except ValueError as err:
        parser.error(str(err))
    check_lora_tags(parser, args, prompts)
    check_prompt_syntax(parser, args, prompts)
    check_variation(parser, args)


def lora_dirs(args) -> list[str]:
    """Where <lora:NAME> tags look: --lora-dir, else the model folder's loras/ when it has one."""
    if getattr(args, "lora_dir", None):
        return list(args.lora_dir)
    default = os.path.join(args.model, "loras")
    return [default] if os.path.isdir(default) else []


def prompt_loras(parser: argparse.ArgumentParser, args, prompt: str) -> tuple[str, list]:
    """The prompt without its <lora:...> tags and (tag, its file) for each; a usage error naming a bad tag."""
    try:
        text, tags = split_tags(prompt)
        return text, [(tag, find_lora(tag, lora_dirs(args))) for tag in tags]
    except ValueError as err:
        parser.error(str(err))


def check_lora_tags(parser: argparse.ArgumentParser, args, prompts: list[str]) -> None:
    """Usage errors before any model loads: a tag we do not run or a NAME with no file, or tags in --negative."""
    if has_tags(args.negative):
        parser.error(f"--negative: <lora:...> tags act in the prompt, not the negative prompt (A1111 would encode "
                     f"{args.negative!r} as words)")
    for prompt in dict.fromkeys(prompts):
        prompt_loras(parser, args, prompt)


@contextmanager
def tagged_loras(parser: argparse.ArgumentParser, args, pipe: TextToImage, prompt: str):
    """The prompt without its <lora:...> tags, their LoRAs merged into the pipeline for the `with` block and every
    changed weight restored from a copy after it (the start-up --lora stay merged)."""
    text, found = prompt_loras(parser, args, prompt)
    loras = []
    for tag, path in found:
        try:
            loras.append((read_lora(path), tag.te, tag.unet, path))
        except ValueError as err:
            parser.error(f"{tag.text}: {err}")
    try:
        saved = pipe.merge_job_loras(loras)
    except ValueError as err:
        parser.error(f"{' '.join(tag.text for tag, _ in found)}: {err}")
    try:
        yield text
    finally:
        pipe.restore_weights(saved)


def set_clip_skip(parser: argparse.ArgumentParser, args, pipe: TextToImage) -> None:
    """--clip-skip N set on the pipeline's CLIP text encoder (a usage error for a model without one, or N out of
    range); nothing without it."""
    if args.clip_skip is not None:
        clip = next((getattr(pipe.text_encoder, name) for name in ("model", "model_2", "clip_l")   # SDXL refiner: bigG;
                     if getattr(pipe.text_encoder, name, None) is not None), None)                 # SD3: CLIP-L
        layers = getattr(getattr(clip, "config", None), "num_hidden_layers", None)
        if layers is None:
            parser.error("--clip-skip needs a CLIP text encoder (SD 1.x/2.x, SDXL, SD3); this model's is "
                         f"{type(pipe.text_encoder).__name__}")
        if not 1 <= args.clip_skip <= layers:
            parser.error(f"--clip-skip must be in [1, {layers}] (the CLIP's layers), got {args.clip_skip}")
        try:
            pipe.text_encoder.clip_skip = args.clip_skip
        except ValueError as err:                       # FLUX.1 reads CLIP's pooled output alone
            parser.error(f"--clip-skip: {err}")


def check_run(parser: argparse.ArgumentParser, args, pipe: TextToImage, prompts: list[str] = ()) -> None:
    """The usage errors of add_model_args' per-image flags against the loaded pipeline, before any model runs
    (ldm.serve checks each request so); fills in --steps's default."""
    if args.spacing is not None:
        try:                                            # rectified flow refuses grids with a step at its data end
            pipe.schedule.timesteps(args.steps or TEACHER_STEPS, spacing=args.spacing)
        except ValueError as err:
            parser.error(f"--spacing: {err}")
    check_prompt_syntax(parser, args, prompts, pipe)
    if args.steps is None:
        args.steps = STUDENT_STEPS if STUDENT_STEPS in pipe.student_steps else TEACHER_STEPS
    if args.shift is not None and not args.shift > 0:
        parser.error(f"--shift must be > 0, got {args.shift}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        parser.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if pipe.index.image_input == "control":        # FLUX.1 Depth / Canny: the control is built into the net
        if args.controlnet or args.control_scale or args.control_mode or args.control_range or \
                len(args.control_image) != 1:
            parser.error("this model (FLUX.1 Depth / Canny) takes its control image in the net: give one "
                         "--control-image IMG (a depth or edge map), no --controlnet / --control-scale")
    elif len(args.controlnet) != len(args.control_image) or \
            any(len(values) not in (0, 1, len(args.controlnet))
                for values in (args.control_scale, args.control_mode, args.control_range)):
        parser.error(f"--controlnet and --control-image go together, one each ({len(args.controlnet)} and "
                     f"{len(args.control_image)} given), with one --control-scale / --control-mode / --control-range "
                     f"or one per ControlNet ({len(args.control_scale)}, {len(args.control_mode)} and "
                     f"{len(args.control_range)} given)")
    if len(args.t2i_adapter) != len(args.adapter_image) or \
            any(len(values) not in (0, 1, len(args.t2i_adapter))
                for values in (args.adapter_scale, args.adapter_factor)):
        parser.error(f"--t2i-adapter and --adapter-image go together, one each ({len(args.t2i_adapter)} and "
                     f"{len(args.adapter_image)} given), with one --adapter-scale / --adapter-factor or one per "
                     f"adapter ({len(args.adapter_scale)} and {len(args.adapter_factor)} given)")
    if any(not 0 <= f <= 1 for f in args.adapter_factor):
        parser.error(f"--adapter-factor: the fraction of steps an adapter acts on, in [0, 1]; "
                     f"got {args.adapter_factor}")
    try:  # before any model runs
        pipe.resolve_spacing(args.spacing, args.sampler, args.steps, args.teacher, args.shift)
        pipe.check_guidance(args.negative, args.guidance_rescale, args.true_cfg, args.guidance_interval, args.apg,
                            args.pag or 0.0, args.sag or 0.0)
        pipe.refuse_with_student(args.steps, args.teacher, negative=args.negative, control=args.controlnet,
                                 guidance_rescale=args.guidance_rescale, ip=args.ip_adapter,
                                 shift=args.shift is not None, true_cfg=args.true_cfg is not None,
                                 guidance_interval=args.guidance_interval is not None, apg=args.apg is not None,
                                 pag=bool(args.pag), sag=bool(args.sag), adapter=args.t2i_adapter,
                                 cfg_pp=args.sampler in CFG_PP_SAMPLERS)
        if args.sampler in CFG_PP_SAMPLERS:   # the pipeline's ValueError, but before any model runs
            check_cfg_pp(args, pipe, prompts)
        if args.prompt_weights == "a1111" and any(map(is_composed, prompts)):     # "a AND b": the teacher's CFG
            check_composition(pipe, args.steps, args.teacher, guidance_rescale=args.guidance_rescale,
                              control=args.controlnet, adapter=args.t2i_adapter, ip=args.ip_adapter,
                              inpaint=pipe.inpainting_unet, true_cfg=args.true_cfg is not None, guidance_interval=args.guidance_interval is not None,
                              pag=bool(args.pag), sag=bool(args.sag), apg=args.apg is not None,
                              window=args.window is not None,
                              image_guidance=getattr(args, "image_guidance", None) is not None)
    except ValueError as err:
        parser.error(str(err))
    if args.pag:
        try:                                                # unknown names listed before anything runs
            self_attention_layers(pipe.unet, args.pag_layers)
        except ValueError as err:
            parser.error(f"--pag-layers: {err}")


def refuse_instruct(parser: argparse.ArgumentParser, args, pipe: TextToImage) -> None:
    """A usage error for an InstructPix2Pix model outside ldm.img2img (txt2img, inpaint): it edits a given image."""
    if pipe.index.image_input == INSTRUCT:
        parser.error(f"--model {args.model}: an InstructPix2Pix model edits an image: python -m ldm.img2img --image "
                     "IN.png \"make it blue\"")


def resolve_window(parser: argparse.ArgumentParser, args, pipe: TextToImage,
                   sizes: list[tuple[int, int]], control: dict | None = None) -> None:
    """--window's SIDE ('native': the model's resolution) and STRIDE (default SIDE/2: on shapes64 as close to native
    as SIDE/4 at half the cost, docs/eval/panorama) filled in args.window, and checked against each image size in
    `sizes` (width, height) before any model runs (a usage error)."""
    if args.window is None:
        return
    side, stride = args.window
    side = side or pipe.index.resolution
    args.window = (side, stride or side // 2)
    for size in sizes:
        try:
            pipe.latent_windows(pipe.latent_shape(1, size), args.window,
                                control=(control or {}).get("control") or (control or {}).get("adapter"),
                                reference=(control or {}).get("reference"))
        except ValueError as err:
            parser.error(f"--window {args.window[0]}:{args.window[1]} for {size[0]}x{size[1]}: {err}")


def load_control_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image resized to cover `size` = (width, height) and centre-cropped to it: (1, 3, H, W) in [0, 1]."""
    return load_image(path, size) * 0.5 + 0.5


def control_options(parser: argparse.ArgumentParser, args, pipe: TextToImage, size: tuple[int, int] | None,
                    inpainting: bool = False) -> dict:
    """{"control": [(ControlNet, image, scale[, mode]), ...], "control_range": [(start, end), ...] or None} from
    --controlnet/--control-image/--control-range, or {}; errors as usage
    errors. Several ControlNets add their residuals (diffusers' MultiControlNetModel). FLUX.1 Depth / Canny:
    {"reference": the control image's latents} (ldm.flux_tools). inpainting: ldm.inpaint's, the one CLI that
    takes inpainting ControlNets (they read a mask too). With --t2i-adapter: "adapter" too (`adapter_options`)."""
    adapter = adapter_options(parser, args, pipe, size)
    if pipe.index.image_input == "control":
        try:
            image = load_image(args.control_image[0], size or (pipe.index.resolution,) * 2)
        except (OSError, ValueError) as err:
            parser.error(f"--control-image {args.control_image[0]}: {err}")
        with torch.no_grad():
            return {"reference": pipe.encode_images(image), **adapter}
    if not args.controlnet:
        return adapter
    from ldm.models.controlnet import load_controlnet
    n = len(args.controlnet)
    scales, modes = per_unit(args.control_scale, n, 1.0), per_unit(args.control_mode, n, None)
    control = []
    for folder, path, scale, mode in zip(args.controlnet, args.control_image, scales, modes):
        try:
            net = load_net(load_controlnet, folder, pipe, args)
            image = load_control_image(path, size or (pipe.index.resolution,) * 2)
        except (OSError, ValueError) as err:
            parser.error(f"--controlnet {folder} / --control-image {path}: {err}")
        try:
            net.check_base(pipe.unet)
        except ValueError as err:
            parser.error(f"--controlnet {folder}: {err}")
        if getattr(net, "mask_channels", 0) and not inpainting:
            parser.error(f"--controlnet {folder}: an inpainting ControlNet (extra_conditioning_channels in its "
                         "config.json) reads a mask too: use it with python -m ldm.inpaint --mask")
        if (mode is not None) != (getattr(net, "num_mode", None) is not None):
            parser.error(f"--controlnet {folder}: --control-mode goes with FLUX.1 Union ControlNets (num_mode in their "
                         "config.json), and they need one")
        if mode is not None and not 0 <= mode < net.num_mode:
            parser.error(f"--control-mode {mode}: this Union ControlNet has modes 0..{net.num_mode - 1}")
        control.append((net, image, scale) if mode is None else (net, image, scale, mode))
    return {"control": control, "control_range": [tuple(r) for r in args.control_range] or None,  # replay: lists
            **adapter}


def load_net(load, folder: str, pipe: TextToImage, args):
    """`load(folder)` (a ControlNet or T2I-Adapter) on the pipeline's device, or the one ldm.serve keeps loaded in
    args.net_cache (a dict) so that its requests do not load a net each."""
    cache = getattr(args, "net_cache", None)
    if cache is None:
        return load(folder, device=pipe.device)
    key = (load.__name__, os.path.abspath(folder))
    if key not in cache:
        cache[key] = load(folder, device=pipe.device)
    return cache[key]


def adapter_options(parser: argparse.ArgumentParser, args, pipe: TextToImage, size: tuple[int, int] | None) -> dict:
    """{"adapter": [(T2IAdapter, image, scale, factor), ...]} from --t2i-adapter/--adapter-image/--adapter-scale/
    --adapter-factor (each image gray for a 1-channel adapter, else RGB, in [0, 1]), or {}; errors as usage errors."""
    if not args.t2i_adapter:
        return {}
    from ldm.models.t2i_adapter import load_t2i_adapter
    n = len(args.t2i_adapter)
    scales, factors = per_unit(args.adapter_scale, n, 1.0), per_unit(args.adapter_factor, n, 1.0)
    adapter = []
    for folder, path, scale, factor in zip(args.t2i_adapter, args.adapter_image, scales, factors):
        try:
            net = load_net(load_t2i_adapter, folder, pipe, args)
            image = load_image(path, size or (pipe.index.resolution,) * 2, "L" if net.in_channels == 1 else "RGB")
            net.check_base(pipe.unet, pipe.autoencoder.config.downsample_factor)
        except (OSError, ValueError) as err:
            parser.error(f"--t2i-adapter {folder} / --adapter-image {path}: {err}")
        adapter.append((net, image * 0.5 + 0.5, scale, factor))
    return {"adapter": adapter}


def sampling_options(args) -> dict:
    """The keyword arguments of `TextToImage.sample` that add_model_args' flags set."""
    from ldm.data.transforms import open_image
    ip_image = open_image(args.ip_image) if args.ip_image else None  # upright, RGB
    return dict(steps=args.steps, guidance=args.guidance, seed=args.seed, teacher=args.teacher,
                sampler=args.sampler, negative=args.negative, spacing=args.spacing,
                guidance_rescale=args.guidance_rescale, ip_image=ip_image, shift=args.shift,
                true_cfg=args.true_cfg, guidance_interval=args.guidance_interval, apg=args.apg, window=args.window,
                pag_scale=args.pag or 0.0, pag_layers=args.pag_layers, sag_scale=args.sag or 0.0, eta=args.eta,
                restart=args.restart,
                subseed=args.subseed,
                subseed_strength=args.subseed_strength or 0.0, progress=show_progress())


def show_progress() -> bool:
    """A step bar on a terminal (a 25-step teacher at 512 px takes minutes on a CPU), none in logs."""
    return sys.stderr.isatty()


# The samplers as the A1111 web UI names them, where it has them
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                 "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m": "DPM++ 3M", "dpmpp_3m_sde": "DPM++ 3M SDE",
                 "unipc": "UniPC", "lms": "LMS", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
                 "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "lcm": "LCM", "tcd": "TCD", "ddpm": "DDPM",
                 "restart": "Restart", "stochastic": "Meng stochastic"}
# The spacings as the A1111 web UI's schedule types name them: "DPM++ 2M Karras" (it reads a name ending in a label)
SPACING_NAMES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", "ays": "Align Your Steps",
                 "kl_optimal": "KL Optimal"}


def settings(args, prompt: str, info: dict, **extra) -> dict:
    """Everything that decides the image: the CLI's settings as run (JSON-ready), `extra` for img2img/inpaint."""
    run = {"prompt": prompt, "negative": args.negative, "steps": args.steps, "guidance": info["guidance"],
           "seed": args.seed, "n": getattr(args, "n", 1), "sampler": args.sampler, "spacing": info["spacing"],
           "teacher": args.teacher, "guidance_rescale": args.guidance_rescale,
           "prompt_weights": args.prompt_weights, "model": args.model, "drawn_by": info["model"],
           "lora": list(args.lora), "embedding": list(args.embedding), **extra}
    if getattr(args, "lora_dir", None):                         # where the prompt's <lora:...> tags were found
        run["lora_dir"] = list(args.lora_dir)
    if has_tags(prompt):                                        # A1111's "Lora hashes"
        run["lora_hashes"] = hashes_text([(tag, find_lora(tag, lora_dirs(args))) for tag in split_tags(prompt)[1]])
    if args.ip_adapter:
        run.update(ip_adapter=args.ip_adapter, image_encoder=args.image_encoder, ip_image=args.ip_image,
                   ip_scale=args.ip_scale)
    for key in ("clip_skip", "freeu", "shift", "true_cfg", "eta",   # true_cfg: diffusers' true_cfg_scale s
                "subseed", "subseed_strength"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    if getattr(args, "restart", None) is not None:             # as S_MIN:S_MAX:K:N, what --restart reads
        run["restart"] = format_restart(args.restart)
    if args.guidance_interval is not None:                      # as typed, '0.28:5.42': JSON has no inf
        run["guidance_interval"] = format_interval(args.guidance_interval)
    if args.apg is not None:                                    # every part, as R:ETA:BETA
        run["apg"] = format_apg(args.apg)
    if args.deepcache is not None:                              # both parts, as N:BRANCH
        run["deepcache"] = "{}:{}".format(*args.deepcache)
    if args.pag:                                                # diffusers' pag_scale and pag_applied_layers
        run.update(pag=args.pag, pag_layers=",".join(args.pag_layers))
    if args.sag:                                                # diffusers' sag_scale
        run["sag"] = args.sag
    if args.dtype != "float32":
        run["dtype"] = args.dtype
    if args.controlnet or args.control_image:
        run.update(controlnet=list(args.controlnet), control_image=list(args.control_image),
                   control_scale=list(args.control_scale))
        if args.control_mode:
            run["control_mode"] = list(args.control_mode)
        if args.control_range:
            run["control_range"] = [list(r) for r in args.control_range]      # [[start, end], ...]
    if args.t2i_adapter:
        run.update(t2i_adapter=list(args.t2i_adapter), adapter_image=list(args.adapter_image),
                   adapter_scale=list(args.adapter_scale), adapter_factor=list(args.adapter_factor))
    for key in ("size", "hires"):
        if getattr(args, key, None):
            run[key] = list(getattr(args, key))
    if args.window is not None:                                 # as typed, resolved: '64:16'
        run["window"] = "{}:{}".format(*args.window)
    return run


def png_info(run: dict, size: tuple[int, int]) -> PngInfo:
    """Two text chunks: `parameters` in the A1111 web UI's layout, which image sites and other UIs read
    (CFG scale is SD's 1 + w; `infotext`), and `ldm`, the JSON of `settings`, to draw the image again."""
    meta = PngInfo()
    meta.add_text("parameters", infotext(run, size))
    meta.add_text("ldm", json.dumps(run))
    return meta


def infotext(run: dict, size: tuple[int, int]) -> str:
    """The A1111 web UI's `parameters` text of an image drawn with `run` (see `settings`) at size (width, height):
    the prompt, "Negative prompt: ...", then "Steps: N, Sampler: ..., CFG scale: 1 + w, Seed: ...", one line each."""
    sampler = SAMPLER_NAMES.get(run["sampler"], run["sampler"]) + \
        (f" {SPACING_NAMES[run['spacing']]}" if run["spacing"] in SPACING_NAMES else "")
    lines = [run["prompt"]] + ([f"Negative prompt: {run['negative']}"] if run["negative"] else [])
    lines.append(f"Steps: {run['steps']}, Sampler: {sampler}, CFG scale: {1 + run['guidance']:g}, "
                 + (f"True CFG scale: {run['true_cfg']:g}, " if run.get("true_cfg") is not None else "")
                 + (f"Image CFG scale: {run['image_guidance']:g}, " if run.get("image_guidance") is not None else "") +
                 f"Seed: {run['seed']}, Size: {size[0]}x{size[1]}, Model: {os.path.basename(run['model'].rstrip('/'))}")
    if run.get("strength") is not None:                         # img2img's and inpaint's, as A1111 writes them
        lines[-1] += f", Denoising strength: {run['strength']:g}"
    elif run.get("hires"):                                      # [scale, strength]: A1111's hires fix keys
        lines[-1] += f", Denoising strength: {run['hires'][1]:g}, Hires upscale: {run['hires'][0]:g}, " \
                     "Hires upscaler: Latent"
    if run.get("subseed_strength"):                             # A1111 writes its variation seed only when it acts
        lines[-1] += f", Variation seed: {run['subseed']}, Variation seed strength: {run['subseed_strength']:g}"
    if run.get("eta") is not None:                              # A1111's key for DDIM's eta; its generic one else
        lines[-1] += f", {'Eta DDIM' if run['sampler'] == 'ddim' else 'Eta'}: {run['eta']:g}"
    if run.get("window"):
        side, stride = run["window"].split(":")
        lines[-1] += f", MultiDiffusion window: {side}, MultiDiffusion stride: {stride}"
    if run.get("apg"):                                          # no A1111 name: ours, as Key: value pairs
        r, eta, beta = run["apg"].split(":")
        lines[-1] += f", APG r: {float(r):g}, APG eta: {float(eta):g}, APG momentum: {float(beta):g}"
    if run.get("deepcache"):                                    # ours too
        interval, branch = run["deepcache"].split(":")
        lines[-1] += f", DeepCache interval: {interval}, DeepCache branch: {branch}"
    if run.get("pag"):                                          # ours too: the layer list quoted, it has commas
        lines[-1] += f", PAG scale: {run['pag']:g}, PAG layers: \"{run['pag_layers']}\""
    if run.get("sag"):                                          # the A1111 SAG extension's keys (its threshold: 1)
        lines[-1] += f", SAG Guidance Scale: {run['sag']:g}, SAG Mask Threshold: {SAG_THRESHOLD:g}"
    for i, unit in enumerate(control_units(run)):             # the A1111 ControlNet extension's units
        lines[-1] += f", ControlNet {i}: \"{unit}\""
    if run.get("lora_hashes"):                                  # quoted as A1111 quotes a value with ':' or ','
        lines[-1] += f", Lora hashes: {json.dumps(run['lora_hashes'], ensure_ascii=False)}"
    return "\n".join(lines)


def per_unit(values: list, n: int, default) -> list:
    """A per-ControlNet / per-adapter option for n units: given once (for all), once each, or not (the default)."""
    return list(values) * n if len(values) == 1 else list(values) or [default] * n


def control_units(run: dict) -> list[str]:
    """One "Model: NAME, Weight: S, Guidance Start: A, Guidance End: B" per ControlNet, then per T2I-Adapter, as the
    A1111 web UI's ControlNet extension writes its units (it runs T2I-Adapters as units too). An adapter acts on the
    first `adapter_factor` of the steps (diffusers' adapter_conditioning_factor), so that is its Guidance End."""
    def unit(model: str, weight: float, start: float, end: float) -> str:
        return (f"Model: {os.path.basename(model.rstrip('/'))}, Weight: {weight:g}, "
                f"Guidance Start: {start:g}, Guidance End: {end:g}")

    nets, adapters = run.get("controlnet", []), run.get("t2i_adapter", [])
    ranges = per_unit(run.get("control_range") or [], len(nets), (0.0, 1.0))
    units = [unit(net, scale, *span) for net, scale, span in
             zip(nets, per_unit(run.get("control_scale", []), len(nets), 1.0), ranges)]
    return units + [unit(a, scale, 0.0, factor) for a, scale, factor in
                    zip(adapters, per_unit(run.get("adapter_scale", []), len(adapters), 1.0),
                        per_unit(run.get("adapter_factor", []), len(adapters), 1.0))]


def save_images(images: torch.Tensor, path: str, run: dict | None = None) -> None:
    """(K, 3, H, W) in [-1, 1] -> one PNG: the image itself for K = 1, else a near-square grid;
    with `run` (see `settings`) its settings go into the file as text chunks."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = None if run is None else png_info(run, (images.shape[-1], images.shape[-2]))
    grid_image(images).save(path, pnginfo=meta)


def grid_image(images: torch.Tensor) -> Image.Image:
    """(K, 3, H, W) in [-1, 1] -> one RGB image: the image itself for K = 1, else a near-square grid."""
    grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=0 if len(images) == 1 else 2)
    return Image.fromarray(np.ascontiguousarray(grid))


def finish(images: torch.Tensor, info: dict, start: float, path: str, run: dict | None = None) -> None:
    """Save the images (with `run`'s settings in the PNG) and print the model, steps, NFE and wall time
    since `start` (GPU work included)."""
    if images.is_cuda:
        torch.cuda.synchronize()
    save_images(images, path, run)
    sampler = info["sampler"] + ("" if info.get("spacing", "trailing") == "trailing" else f" ({info['spacing']})")
    seeds = f", seeds {run['seed']}-{run['seed'] + run['n'] - 1}" if run and run.get("n", 1) > 1 else ""
    if seeds and run.get("subseed_strength"):                   # A1111's grid of variations: one seed, subseeds S+i
        seeds = f", seed {run['seed']}, variation seeds {run['subseed']}-{run['subseed'] + run['n'] - 1}"
    print(f"{path}: {info['model']}, {info['steps']} steps, {sampler}, w={info['guidance']:g}, "
          f"NFE {info['nfe']}, {time.perf_counter() - start:.2f} s{seeds}")


def add_input_size(parser: argparse.ArgumentParser) -> None:
    """--size for img2img and inpaint: the size the input image (and mask) is resized and cropped to."""
    parser.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                        help="resize the input to cover WxH and crop its centre (default: the model's square "
                             "resolution); the output has that size")


def input_size(parser: argparse.ArgumentParser, args, pipe: TextToImage) -> tuple[int, int]:
    """--size, or the model's square resolution, checked against what the networks take (a usage error)."""
    size = args.size or (pipe.index.resolution,) * 2
    try:
        pipe.latent_shape(1, size)
    except ValueError as err:
        parser.error(f"--size: {err}")
    return size


def load_image(path: str, size: int | tuple[int, int], mode: str = "RGB") -> torch.Tensor:
    """A PNG/JPEG resized to cover `size` (a side, or (width, height)) and centre-cropped to it: (1, C, H, W)
    in [-1, 1]."""
    from ldm.data.transforms import open_image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    return image_tensor(open_image(path, mode=mode), size, mode)   # upright as viewers show it (EXIF turns applied)


def image_tensor(image, size: int | tuple[int, int], mode: str = "RGB") -> torch.Tensor:
    """A PIL image in `mode` resized to cover `size` (a side, or (width, height)) and centre-cropped to it:
    (1, C, H, W) in [-1, 1]."""
    from ldm.data.transforms import cover_and_crop, to_tensor
    image = cover_and_crop(image, (size, size) if isinstance(size, int) else tuple(size))
    if mode == "L":
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)[None, None]
    return to_tensor(image)[None]
