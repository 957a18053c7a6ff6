"""A text-to-image model folder on disk, and sampling from it with the teacher or a student.

Layout (every part is config.json + model.safetensors):

    <model>/model_index.json    what is where, and the diffusion settings (`ModelIndex`)
    <model>/autoencoder/        stage 1: KL autoencoder (latent scaling factor in its config)
    <model>/text_encoder/       stage 2: text encoder (scratch weights, or a config naming CLIP)
    <model>/unet/               stage 2: the CFG teacher
    <model>/student-8/ ...      stage 3: guided students distilled to 8, 4, 2, 1 steps

The teacher samples with DDIM (or any core sampler) and classifier-free guidance, two
network evaluations per step; a student takes w as an input, one evaluation per step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ldm.diffusion.composable import check_composition, composed_model
from ldm.diffusion.guidance import APG, cfg, check_interval, edm_sigma, in_interval, pag
from ldm.diffusion.multidiffusion import window_boxes, windowed
from ldm.diffusion.sag import sag
from ldm.diffusion.param import Denoiser
from ldm.diffusion.restart import Restart
from ldm.diffusion.samplers import CFG_PP_SAMPLERS, ETA_OPTIONS, SAMPLERS, check_eta, initial_noise
from ldm.diffusion.schedules import SHIFTED_SPACINGS, resolution_shift, schedule_from_config, shifted
from ldm.diffusion.variation import slerp
from ldm.distill.targets import coefficients
from ldm.flux_tools import IMAGE_INPUTS, ReferenceTokens, fill_inputs
from ldm.instruct_pix2pix import INSTRUCT, image_latents, instruct_model, refuse_options
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.controlnet import ControlSteps, attach_controlnets, check_control_ranges
from ldm.models.deepcache import DeepCache, fresh_caches
from ldm.models.lora import merge_lora, read_lora
from ldm.models.prompt_chunks import chunk_count, encode_chunked
from ldm.models.prompt_compose import flatten, has_and
from ldm.models.prompt_schedule import is_scheduled, scheduled, step_texts
from ldm.models.prompt_weights import encode_weighted, parse_weighted, plain_text
from ldm.models.text import ScratchTextEncoder, TextEncoderConfig, build_text_encoder
from ldm.models.nets import load_net
from ldm.models.unet import (PAG_LAYERS, UNet, perturbed_self_attention, recorded_attention, sag_attention,
                             sdxl_time_ids, self_attention_layers)
from ldm.models.vae_tiling import tile_for

INDEX_NAME = "model_index.json"
CPU_DECODE_CHUNK = 8   # latents decoded at once on a CPU (see TextToImage.decode)
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "shapes64")
DECODER_PRECISIONS = ("auto", "fp32", "bf16")
STUDENT_SAMPLERS = ("ddim", "stochastic")   # what the students were distilled for (Meng et al. 2023, sec. 4.3)
# Options a student cannot take (it learnt plain CFG with the empty prompt as the unconditional branch),
# named as the CLI names them; `refuse_with_student` checks them, the CLI before the model runs.
TEACHER_ONLY = {"negative": "--negative", "guidance_rescale": "--guidance-rescale", "control": "--controlnet",
                "ip": "--ip-adapter", "inpaint": "an inpainting U-Net's mask", "shift": "--shift",
                "true_cfg": "--true-cfg", "guidance_interval": "--guidance-interval",
                "apg": "--apg", "pag": "--pag", "sag": "--sag", "adapter": "--t2i-adapter",
                "cfg_pp": "a CFG++ --sampler (*_cfg_pp: it renoises with CFG's unconditional prediction)"}


def native_bf16_cpu() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX); elsewhere it
    emulates them, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_decoder_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a CPU with native bf16 (the decoder, at full resolution, is most of a
    few-step student's CPU latency, and bf16 halves it), else fp32."""
    if precision not in DECODER_PRECISIONS:
        raise ValueError(f"decoder precision must be one of {DECODER_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16_cpu() else "fp32"
    return precision


@dataclass
class ModelIndex:
    autoencoder: str = "autoencoder"        # sub-folders of the parts
    text_encoder: str = "text_encoder"
    unet: str = "unet"
    schedule: dict = field(default_factory=lambda: {"name": "cosine_logsnr"})
    prediction: str = "v"                   # what the teacher's U-Net predicts: eps | x0 | v | flow
    time_scale: float = 1000.0              # the U-Net sees t * time_scale (continuous t in [0, 1])
    resolution: int = 64                    # image side in pixels
    guidance: float = 2.0                   # default w (Imagen convention: (1 + w) cond - w uncond)
    students: dict = field(default_factory=dict)   # "4" -> "student-4": distilled to that many steps
    student_prediction: str = "v"           # what the students' U-Nets predict
    data: str = ""                          # stage 2's data.source ("" = not recorded): with "shapes",
                                            # prompts outside the shapes world's caption forms warn
    aesthetic: list | None = None           # SDXL refiner: [score, negative score] among its size numbers
    dynamic_shift: dict | None = None       # FLUX.1: the grid shift from the image's token count
                                            # (schedules.resolution_shift's keyword arguments)
    guidance_embed: bool = False            # FLUX.1-dev: the net takes the guidance scale 1 + w as an input
                                            # (guidance distillation) instead of running CFG
    image_input: str = ""                   # FLUX.1's image-conditioned nets (ldm.flux_tools): "fill" (a masked
                                            # image and its mask), "control" (Depth / Canny: a control image),
                                            # "kontext" (a reference image to edit); "instruct-pix2pix": SD's
                                            # U-Net taking an image to edit (ldm.instruct_pix2pix); "" none

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIndex":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{INDEX_NAME}: unknown keys {unknown}")
        if d.get("image_input", "") not in IMAGE_INPUTS:
            raise ValueError(f"{INDEX_NAME}: image_input {d['image_input']!r} is none of {IMAGE_INPUTS}")
        return cls(**d)


def load_index(folder: str) -> ModelIndex:
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a model folder: {path} is missing")
    with open(path) as f:
        return ModelIndex.from_dict(json.load(f))


def save_index(folder: str, index: ModelIndex) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(dataclasses.asdict(index), f, indent=2)


def load_text_encoder(folder: str):
    """A scratch encoder with its weights, or a frozen CLIP/OpenCLIP one named by its config. A relative
    path that exists inside `folder` is read from there (an imported CLIP travels with the model folder)."""
    with open(os.path.join(folder, "config.json")) as f:
        tcfg = TextEncoderConfig.from_dict(json.load(f))
    if tcfg.path and not os.path.isabs(tcfg.path) and os.path.exists(os.path.join(folder, tcfg.path)):
        tcfg = dataclasses.replace(tcfg, path=os.path.join(folder, tcfg.path))
    return ScratchTextEncoder.from_pretrained(folder) if tcfg.kind == "scratch" else build_text_encoder(tcfg)


SHAPE_PARTS = ("large red circle", "red circle", "circle", "red", "large")   # what an added word may stand for


def is_shapes_caption(text: str) -> bool:
    """Whether a model sees `text` as a shapes-world caption (the CLIP BPE tokenizer lower-cases and collapses
    whitespace, so it sees that form)."""
    from ldm.data.captions import parse_caption
    try:
        parse_caption(" ".join(text.lower().split()))
    except ValueError:
        return False
    return True


def embedding_words(encoder) -> list[str]:
    """The textual-inversion words added to a text encoder (ours, CLIP's, SDXL's: `added_words`; others take none)."""
    return getattr(encoder, "added_words", [])


class TextToImage:
    """The parts of a model folder, with `generate` for the teacher and the students."""

    def __init__(self, autoencoder: AutoencoderKL, text_encoder, unet: UNet, index: ModelIndex,
                 folder: str | None = None, decoder_precision: str = "auto"):
        self.autoencoder, self.text_encoder, self.unet = autoencoder.eval(), text_encoder.eval(), unet.eval()
        self.decoder_precision = resolve_decoder_precision(decoder_precision, self.device)
        if self.device.type == "cpu":
            # oneDNN's convolutions run ~1.5x faster on channels_last than on NCHW tensors; the
            # decoder (full-resolution convs) costs more than a U-Net step, so it sets few-step latency.
            self.autoencoder.to(memory_format=torch.channels_last)
        self.index, self.folder = index, folder
        self.schedule = schedule_from_config(index.schedule)
        if getattr(unet.cfg, "added_cond", None) == "text_time":   # SDXL (and its refiner): AYS's SDXL list
            self.schedule.ays_model = "sdxl"
        self._students: dict[int, torch.nn.Module] = {}
        self._loras: list[tuple[dict, float, str]] = []   # merged into every U-Net, students as they load
        self._job: tuple[list, dict] | None = None        # merge_job_loras' LoRAs and the copies it keeps
        self._warned_prompts: set[str] = set()
        self.prompt_weights = False   # read "(word:1.3)" emphasis in prompts (ldm.models.prompt_weights)
        self._ip = None               # (ImageTokens, shared state, ImageEncoder) once add_ip_adapter ran
        self.net_dtype: torch.dtype | None = None   # from_folder's dtype: students load in it too
        self.vae_tiling = "off"    # autoencoder in exact tiles: "off", "auto" or pixels (ldm.models.vae_tiling)

    @classmethod
    def from_folder(cls, folder: str = DEFAULT_MODEL, device="cpu", decoder_precision: str = "auto",
                    dtype: torch.dtype | None = None) -> "TextToImage":
        """dtype: the networks' and text encoders' weights in this precision (bf16 / fp16 halve the memory that
        SDXL, SD3 and FLUX.1 take in fp32); the sampler's state stays fp32, the decoder follows decoder_precision."""
        index = load_index(folder)
        part = lambda name: os.path.join(folder, name)  # noqa: E731
        pipe = cls(AutoencoderKL.from_pretrained(part(index.autoencoder), device=device),
                   load_text_encoder(part(index.text_encoder)).to(device, dtype),
                   load_net(part(index.unet)).to(device, dtype), index, folder, decoder_precision)   # cast on the way
        pipe.net_dtype = dtype
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def unet_only(self, what: str) -> None:
        """ValueError unless the network is a U-Net: `what` (an adapter, FreeU) is built for U-Net blocks."""
        if not isinstance(self.unet, UNet):
            raise ValueError(f"{what} works on U-Nets (SD 1.x/2.x, SDXL, ours); this model's network is "
                             f"{type(self.unet).__name__} (SD3's or FLUX.1's transformer)")

    @property
    def text_kind(self) -> str | None:
        """The text encoder's kind ("sd3", "flux", ...; None for a scratch encoder saved before kinds)."""
        return getattr(getattr(self.text_encoder, "cfg", None), "kind", None)

    @property
    def student_steps(self) -> list[int]:
        return sorted(int(n) for n in self.index.students)

    def student(self, steps: int):
        """The GuidedStudent distilled to `steps` steps (loaded once)."""
        from ldm.distill.student import GuidedStudent
        if str(steps) not in self.index.students:
            raise ValueError(f"no student for {steps} steps in {self.folder}; have {self.student_steps}")
        if steps not in self._students:
            path = os.path.join(self.folder, self.index.students[str(steps)])
            student = GuidedStudent.from_pretrained(path, device=self.device).to(self.net_dtype).eval()
            for lora, scale, source in self._loras:
                merge_lora(lora, [student.unet], {}, scale, source)
            if self._job is not None:                  # loaded inside a job: its LoRAs too, restored with it
                for lora, _, unet_scale, source in self._job[0]:
                    merge_lora({"unet": lora["unet"]}, [student.unet], {}, unet_scale, source, self._job[1])
            if isinstance(student.unet, UNet):         # FreeU acts on U-Net decoder levels (set_freeu)
                student.unet.freeu = self.unet.freeu
                student.unet.deepcache = own_cache(self.unet.deepcache)   # set_deepcache; a cache of its own
            self._students[steps] = student
        return self._students[steps]

    def add_ip_adapter(self, path: str, image_encoder: str, scale: float = 1.0) -> None:
        """An IP-Adapter file on the teacher's U-Net (ldm.models.ip_adapter) or FLUX.1 transformer (XLabs' layout:
        ldm.models.ip_adapter_flux), with its CLIP image encoder folder; `sample(ip_image=...)` then prompts with an
        image too. LoRAs merge before it, not after."""
        from ldm.models.flux import Flux
        from ldm.models.ip_adapter import ImageEncoder, attach_ip_adapter
        from ldm.models.ip_adapter_flux import attach_flux_ip_adapter
        if not isinstance(self.unet, (UNet, Flux)):
            raise ValueError(f"an IP-Adapter works on U-Nets (SD 1.x/2.x, SDXL) and FLUX.1's transformer (XLabs' "
                             f"adapters); this model's network is {type(self.unet).__name__} (SD3's)")
        if self._ip is not None:
            raise ValueError("an IP-Adapter is attached already: one at a time")
        encoder = ImageEncoder(image_encoder, device=self.device)
        tokens, state = (attach_flux_ip_adapter if isinstance(self.unet, Flux) else attach_ip_adapter)(
            self.unet, path, scale)
        if encoder.model.config.projection_dim != tokens.proj.in_features:
            raise ValueError(f"{image_encoder}: image embeddings {encoder.model.config.projection_dim} wide, the "
                             f"IP-Adapter takes {tokens.proj.in_features}")
        self._ip = (tokens, state, encoder)

    def image_prompt(self, images, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """IP-Adapter tokens for PIL `images` (one, or one per prompt) and for the unconditional half (as diffusers'
        pipelines: an all-zero embedding; FLUX.1: a black image's): (batch, n, D) and (1, n, D)."""
        from ldm.models.flux import Flux
        from ldm.models.ip_adapter_flux import negative_image
        if self._ip is None:
            raise ValueError("an image prompt needs an IP-Adapter: add_ip_adapter(path, image_encoder) first")
        tokens, _, encoder = self._ip
        images = images if isinstance(images, list) else [images]
        embeds = encoder(images).to(tokens.proj.weight)
        if embeds.shape[0] not in (1, batch):
            raise ValueError(f"{embeds.shape[0]} prompt images for {batch} prompts: give one, or one per prompt")
        blank = (encoder([negative_image(images[0])]).to(embeds) if isinstance(self.unet, Flux) else
                 torch.zeros_like(embeds[:1]))
        with torch.no_grad():
            cond, uncond = tokens(embeds), tokens(blank)
        return cond.expand(batch, -1, -1), uncond

    def set_freeu(self, factors: tuple[float, float, float, float] | None) -> None:
        """FreeU's (b1, b2, s1, s2) on the teacher and every student (ldm.models.unet.freeu); None: off."""
        if factors is not None:
            self.unet_only("FreeU")
        self.unet.freeu = None if factors is None else tuple(float(f) for f in factors)
        for student in self._students.values():
            student.unet.freeu = self.unet.freeu

    def set_deepcache(self, interval: int | None, branch: int = 0) -> None:
        """DeepCache (ldm.models.deepcache; Ma et al. 2024) on the teacher and every student, each its own cache:
        a full U-Net call every `interval` calls of a run, the others reusing the deep features at skip `branch`
        (0: conv_in's, the shallowest). None: off; 1: every call full (the same images)."""
        cache = None
        if interval is not None:
            self.unet_only("DeepCache")
            cache = DeepCache(interval, branch)
            cache.check(len(self.unet.skip_channels))
        self.unet.deepcache = cache
        for student in self._students.values():
            student.unet.deepcache = own_cache(cache)

    def add_lora(self, path: str, scale: float = 1.0, lora: dict | None = None) -> int:
        """Merge a LoRA file (diffusers/peft, kohya, FLUX.1's BFL / XLabs layouts: ldm.models.lora) into the
        teacher's U-Net or SD3 / FLUX.1 transformer, its CLIP text encoder(s) and every student, scaled by `scale`;
        returns how many layers it changed. lora: the file as `read_lora` read it already (else it is read here)."""
        lora = read_lora(path) if lora is None else lora
        n = merge_lora(lora, [self.unet, *(s.unet for s in self._students.values())], self.clip_models(), scale, path)
        self._loras.append(({"unet": lora["unet"]}, scale, path))
        return n

    def merge_job_loras(self, loras: list[tuple[dict, float, float, str]]) -> dict:
        """Merge LoRAs for one job (a prompt's <lora:...> tags): (read_lora's dict, text-encoder scale, U-Net /
        transformer scale, source) each, into the teacher, the CLIP text encoders and every student, also those
        loaded during the job. Returns the copies `restore_weights` puts back; on an error, restored and raised."""
        if self._job is not None:
            raise RuntimeError("a job's LoRAs are merged already: restore_weights first")
        saved: dict = {}
        self._job = (loras, saved)
        try:
            for lora, te_scale, unet_scale, source in loras:
                if unet_scale:
                    merge_lora({"unet": lora["unet"]}, [self.unet, *(s.unet for s in self._students.values())],
                               {}, unet_scale, source, saved)
                if te_scale:
                    merge_lora({**lora, "unet": {}}, [], self.clip_models(), te_scale, source, saved)
        except BaseException:
            self.restore_weights(saved)
            raise
        return saved

    @torch.no_grad()
    def restore_weights(self, saved: dict) -> None:
        """Put back the weights `merge_job_loras` changed, from its copies: bit for bit (subtracting the update
        again would drift in fp16 / bf16)."""
        for weight, copy in saved.values():
            weight.copy_(copy)
        saved.clear()
        self._job = None

    def clip_models(self) -> dict:
        """The transformers CLIP models of the text encoder by a LoRA file's part names: {"text_encoder": ...}
        (SDXL, SD3: and "text_encoder_2"; FLUX.1: CLIP-L only, its T5 is text_encoder_2); {} for our scratch
        encoder."""
        from ldm.models.text import ClipTextEncoder
        if self.text_kind == "sd3":                                                        # T5 takes no LoRA here
            return {"text_encoder": self.text_encoder.clip_l, "text_encoder_2": self.text_encoder.clip_g}
        if self.text_kind == "flux":
            return {"text_encoder": self.text_encoder.clip_l}
        if isinstance(self.text_encoder, ClipTextEncoder):
            return {"text_encoder": self.text_encoder.model}
        if hasattr(self.text_encoder, "model_2"):
            models = {"text_encoder": self.text_encoder.model, "text_encoder_2": self.text_encoder.model_2}
            return {part: model for part, model in models.items() if model is not None}
        return {}

    def add_embedding(self, path: str, word: str | None = None) -> tuple[str, int]:
        """A textual-inversion file (ldm.models.embeddings) as a new word of the CLIP (or scratch) text encoder,
        named `word`, else as the file says, else after the file; returns (the word, its number of vectors)."""
        from ldm.models.embeddings import embedding_word, read_embedding, read_embedding_pair
        if self.text_kind in ("sd3", "flux"):
            raise ValueError("textual-inversion embeddings are not read for SD3's and FLUX.1's text encoders (CLIPs "
                             "and T5)")
        if hasattr(self.text_encoder, "model_2"):          # SDXL: a word for each encoder
            vectors_l, vectors_g = read_embedding_pair(path)
            word = embedding_word(path, word)
            self.text_encoder.add_embedding(word, vectors_l, vectors_g)
            return word, len(vectors_l)
        if not hasattr(self.text_encoder, "add_embedding"):   # CLIP, and our scratch encoder (shapes models)
            raise ValueError(f"textual-inversion embeddings need a CLIP text encoder (transformers), as SD 1.x/2.x "
                             f"have, or our scratch one; this model's is {type(self.text_encoder).__name__}")
        _, vectors = read_embedding(path)
        word = embedding_word(path, word)
        self.text_encoder.add_embedding(word, vectors)
        return word, len(vectors)

    def latent_shape(self, n: int, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """(n, C, h, w) of the latents for images of `size` = (width, height) px, default the model's square.
        ValueError unless each side is a multiple of the autoencoder's factor times the U-Net's."""
        ae = self.autoencoder.config
        width, height = size or (self.index.resolution,) * 2
        multiple = ae.downsample_factor * self.unet.cfg.downsample_factor
        if width % multiple or height % multiple or min(width, height) < multiple:
            raise ValueError(f"image size {width}x{height}: each side must be a positive multiple of {multiple} "
                             f"(the autoencoder's factor {ae.downsample_factor} times the U-Net's "
                             f"{multiple // ae.downsample_factor})")
        return (n, ae.z_channels, height // ae.downsample_factor, width // ae.downsample_factor)

    def latent_windows(self, shape: tuple[int, ...], window: tuple[int, int], control=None,
                       reference=None) -> tuple[tuple[int, int], tuple[int, int]]:
        """MultiDiffusion's (side, stride) in pixels -> the (h, w) window and stride on the grid of latents `shape`;
        ValueError for what does not fit: a side the networks do not take (`latent_shape`), a window larger than the
        image, a stride off the latent grid or past the window (gaps), and what windows do not cut: spatial inputs
        bound to the net (ControlNet images, an inpainting U-Net's mask and image, reference latents), SDXL's size
        numbers, SD3's and FLUX.1's transformers."""
        side, stride = (int(v) for v in window)
        self.unet_only("MultiDiffusion windows")
        if getattr(self.unet.cfg, "added_cond", None) == "text_time":
            raise ValueError("MultiDiffusion windows: SDXL conditions on the image's size and crop (time_ids), which "
                             "windows would need per window; not supported")
        if control or reference is not None or self.inpainting_unet:
            raise ValueError("MultiDiffusion windows: spatial inputs bound to the net (ControlNet and T2I-Adapter "
                             "images, an inpainting U-Net's mask and image, reference latents) are not cut into "
                             "windows")
        self.latent_shape(1, (side, side))                   # the U-Net takes the window
        factor = self.autoencoder.config.downsample_factor
        height, width = shape[-2] * factor, shape[-1] * factor
        if side > min(height, width):
            raise ValueError(f"window {side} px is larger than the image, {width}x{height}")
        if stride % factor or not 0 < stride <= side:
            raise ValueError(f"window stride {stride} px: need a multiple of {factor} px (the autoencoder's factor: "
                             f"windows sit on the latent grid) in (0, {side}] (no gaps between windows)")
        return (side // factor,) * 2, (stride // factor,) * 2

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], chunks: int | None = None) -> dict:
        """U-Net conditioning: the tokens, and the padding mask unless the U-Net was trained on every
        token (imported SD models: then no mask at all, the cheaper attention and diffusers' own call).
        With `prompt_weights` on, "(word:1.3)" emphasis is read (ldm.models.prompt_weights).
        chunks: with a CLIP text encoder, at least this many 77-token chunks side by side, and as many
        as the longest prompt needs (ldm.models.prompt_chunks); None: one, longer prompts truncated."""
        if self.text_kind in ("sd3", "flux"):
            return self._encode_sd3(prompts)
        if hasattr(self.text_encoder, "encode_pooled"):      # SDXL
            return self._encode_sdxl(prompts, chunks)
        if chunks is not None and self.chunked_prompts:
            context, mask = encode_chunked(self.text_encoder, prompts, chunks=chunks, weighted=self.prompt_weights)
        elif self.prompt_weights:
            context, mask = encode_weighted(self.text_encoder, prompts)
        else:
            context, mask = self.text_encoder(prompts)
        if not getattr(getattr(self.text_encoder, "cfg", None), "mask_padding", True):
            return {"context": context}
        return {"context": context, "context_mask": mask}

    def _encode_sdxl(self, prompts: list[str], chunks: int | None) -> dict:
        """SDXL's conditioning: tokens (chunked and weighted as for SD), the pooled vector of the first 75
        tokens without emphasis (the first chunk's, as the A1111 web UI takes it), and the size numbers at
        the model's resolution (`sample` puts the drawn size's in place)."""
        encoder = self.text_encoder
        plain = [plain_text(parse_weighted(p)) for p in prompts] if self.prompt_weights else prompts
        chunked = chunks is not None and (chunks > 1 or self.prompt_weights)
        context, _, pooled = encoder.encode_pooled(plain, warn=not chunked)   # chunked: nothing is cut
        if chunked:
            context = encoder.zero_empty_rows(prompts, encode_chunked(encoder, prompts, chunks=chunks,
                                                                      weighted=self.prompt_weights)[0])
        return {"context": context, "pooled": pooled, "time_ids": self.size_ids(self.latent_shape(len(prompts)))}

    def _encode_sd3(self, prompts: list[str]) -> dict:
        """SD3's conditioning (ldm.models.text_sd3): CLIP-L and bigG tokens, then T5's, and the two pooled vectors;
        FLUX.1's (ldm.models.text_flux): T5's tokens and CLIP-L's pooled output. With `prompt_weights` on,
        "(word:1.3)" emphasis weights every token sequence as ComfyUI does (prompt_weights.weigh_from_empty)."""
        context, _, pooled = self.text_encoder.encode_pooled(prompts, weighted=self.prompt_weights)
        return {"context": context, "pooled": pooled}

    def step_prompts(self, prompts: list[str], negative: str, steps: int, first_pass: int = 0) -> list[list[str]]:
        """The prompts' texts at each of `steps` steps, with `prompt_weights` on (the A1111 web UI's syntax) read
        for prompt editing "[from:to:when]" and alternation "[a|b]" (ldm.models.prompt_schedule); one list when
        they do not change (first_pass: `sample`'s). ValueError for such syntax in the negative prompt (CFG's
        unconditional branch is encoded once, in `model_function`)."""
        if not self.prompt_weights:
            return [prompts]
        if is_scheduled(negative):
            raise ValueError(f"negative prompt {negative!r}: prompt editing '[from:to:when]' and alternation "
                             "'[a|b]' are read in prompts, not in the negative prompt")
        texts = [list(step) for step in zip(*(step_texts(p, steps, first_pass) for p in prompts))]
        return texts[:1] if all(step == texts[0] for step in texts) else texts

    def compose_prompts(self, prompts: list[str], negative: str) -> tuple[list[str], tuple | None]:
        """(the sub-prompts, (owner, weights) or None): with `prompt_weights` on, composable prompts "a AND b :0.8"
        (ldm.models.prompt_compose) split into one text a sub-prompt; None where each prompt is one sub-prompt of
        weight 1 (plain CFG). ValueError for a malformed composition, or AND in the negative prompt (the
        unconditional row, one text)."""
        if not self.prompt_weights:
            return prompts, None
        if has_and(negative):
            raise ValueError(f"negative prompt {negative!r}: AND composes prompts, the negative prompt is the one "
                             "unconditional text (write 'and' for the word)")
        texts, owner, weights = flatten(prompts)
        plain = len(texts) == len(prompts) and all(weight == 1.0 for weight in weights)
        return texts, None if plain else (owner, weights)

    def step_conditioning(self, texts: list[list[str]], chunks: int | None, model, grid) -> tuple[dict, object]:
        """(conditioning of the first step's texts, model): where the texts change over the steps (`step_prompts`),
        each distinct text is encoded once and the model `scheduled` to take step i's rows, found from the time it
        is called at on `grid`, the run's step times."""
        if len(texts) == 1:
            return self.encode_prompts(texts[0], chunks), model
        unique = {text: i for i, text in enumerate(dict.fromkeys(text for step in texts for text in step))}
        encoded = self.encode_prompts(list(unique), chunks)
        encoded.pop("time_ids", None)              # SDXL's size numbers are the drawn size's, not a text's
        rows = torch.tensor([[unique[text] for text in step] for step in texts], device=self.device)
        return ({key: value.index_select(0, rows[0]) for key, value in encoded.items()},
                scheduled(model, encoded, rows, grid))

    def unconditional(self, negative: str, chunks: int | None, shape: tuple[int, ...] | None) -> dict:
        """CFG's unconditional conditioning: `negative` encoded, without SDXL's size numbers (every row takes the
        drawn size's), except the refiner's, whose unconditional rows carry their own aesthetic score."""
        uncond = self.encode_prompts([negative], chunks)
        uncond.pop("time_ids", None)
        if self.index.aesthetic is not None:
            uncond["time_ids"] = self.size_ids(shape or self.latent_shape(1), negative=True)[:1]
        return uncond

    def check_prompts(self, prompts: list[str]) -> None:
        """Warn (once a prompt) when a model that saw only shapes-world captions is asked for something else:
        it will still draw shapes, and a user asking for "a corgi" should know why. An added textual-inversion
        word may stand for any part of a shape ("a <zig> on the left" reads as "a red circle on the left")."""
        if self.index.data != "shapes":
            return
        words = sorted(embedding_words(self.text_encoder), key=len, reverse=True)    # longest first, as matched
        for prompt in dict.fromkeys(prompts):
            if prompt in self._warned_prompts:
                continue
            text = plain_text(parse_weighted(prompt)) if self.prompt_weights else prompt
            readings = [text]
            if any(word in text for word in words):
                pattern = "|".join(re.escape(word) for word in words)
                readings = [re.sub(pattern, part, text) for part in SHAPE_PARTS]
            if not any(map(is_shapes_caption, readings)):
                self._warned_prompts.add(prompt)
                warnings.warn(f"{prompt!r} is not a shapes-world caption, and this model was trained only on those "
                              "(one or two circles, squares or triangles: 'a large red circle on the left', 'a blue "
                              "square above a green triangle on a black background'): expect shapes, not what it "
                              "names (docs/model-card.md)", stacklevel=3)

    @property
    def chunked_prompts(self) -> bool:
        """Whether long prompts go in as several chunks (CLIP text encoders) rather than truncated."""
        return hasattr(self.text_encoder, "encode_ids")

    def prompt_chunks(self, prompts: list[str]) -> int | None:
        """The chunks that `prompts` and their CFG negative need together; None without chunking."""
        return chunk_count(self.text_encoder, prompts, self.prompt_weights) if self.chunked_prompts else None

    def denoiser(self, net, prediction: str) -> Denoiser:
        return Denoiser(net, self.schedule, prediction, time_scale=self.index.time_scale)

    def refuse_with_student(self, steps: int, teacher: bool, **options) -> None:
        """ValueError naming the first of `options` (keys of TEACHER_ONLY) that is set when `steps` runs a student."""
        if self.uses_student(steps, teacher):
            for key, value in options.items():
                if value:
                    raise ValueError(f"{TEACHER_ONLY[key]} needs the teacher (--teacher; teacher=True in Python): "
                                     f"student-{steps} was distilled from plain CFG with the empty prompt as its "
                                     "unconditional branch (or pick --steps without a student)")

    def model_function(self, steps: int, guidance: float, teacher: bool = False, negative: str = "",
                       guidance_rescale: float = 0.0, chunks: int | None = None, control: list | None = None,
                       inpaint: torch.Tensor | None = None, ip_uncond: torch.Tensor | None = None,
                       shape: tuple[int, ...] | None = None, reference: torch.Tensor | None = None,
                       control_range: list | None = None, grid: torch.Tensor | None = None,
                       true_cfg: float | None = None, guidance_interval: tuple[float, float] | None = None,
                       pag_scale: float = 0.0, pag_layers=PAG_LAYERS, apg: APG | None = None,
                       image_guidance: float | None = None, adapter: list | None = None, compose=None,
                       sag_scale: float = 0.0):
        """(x0-model, extra_args maker, info): the student for `steps` when there is one, else teacher + CFG
        with `negative` as the unconditional prompt (students were distilled with the empty one) and
        guidance rescaled by phi = `guidance_rescale` in the net's prediction space (Lin et al. 2024), and
        `control`'s ControlNets attached to the net (ldm.models.controlnet.attach_controlnets; with
        `control_range`, each acting on its part of the steps at `grid`'s times: ControlSteps), `inpaint`'s
        extra inputs given to an inpainting U-Net (`ConcatInputs`) and `reference` to a FLUX.1 Depth / Canny or
        Kontext net (`image_input_net`). true_cfg: FLUX.1-dev's "true CFG" at diffusers' scale s (`true_cfg_scale`):
        CFG with w = s - 1 around the guidance-bound net, `negative` (and `ip_uncond`) its unconditional half.
        guidance_interval: (lo, hi), CFG (true CFG too) only where lo < sigma_t / alpha_t <= hi (`cfg`'s interval;
        Kynkaanniemi et al. 2024); info's nfe_per_step is then a function of t. pag_scale: perturbed-attention
        guidance's s on the self-attentions of `pag_layers` (`pag_model`); 0 is off. apg: the teacher's CFG
        (true CFG too) combined by adaptive projected guidance on x0-hat (`cfg`'s apg; Sadat et al. 2024).
        image_guidance: an InstructPix2Pix model's s_I (`reference`: its image's latents; ldm.instruct_pix2pix).
        adapter: T2I-Adapters attached to the teacher's U-Net (`teacher_net`, ldm.models.t2i_adapter).
        compose: (owner, weights) of composable prompts' sub-prompts (ldm.diffusion.composable), teacher only.
        sag_scale: self-attention guidance's s (`sag_model`; Hong et al. 2023); 0 is off."""
        if image_guidance is not None and self.index.image_input != INSTRUCT:
            raise ValueError(f"--image-guidance (image_guidance) is for InstructPix2Pix models; this one's image_input "
                             f"is {self.index.image_input!r}")
        self.check_guidance(negative, guidance_rescale, true_cfg, guidance_interval, apg, pag_scale, sag_scale)
        if compose is not None:                    # "a AND b": Liu et al. 2022's conjunction on the teacher
            check_composition(self, steps, teacher, guidance_rescale=guidance_rescale, control=control,
                              adapter=adapter, inpaint=inpaint is not None, ip=ip_uncond is not None,
                              reference=reference is not None, true_cfg=true_cfg is not None,
                              guidance_interval=guidance_interval is not None, pag=pag_scale != 0,
                              sag=sag_scale != 0, apg=apg is not None, image_guidance=image_guidance is not None)
            return composed_model(self, steps, teacher, guidance, negative, chunks, shape, *compose)
        self.refuse_with_student(steps, teacher, negative=negative, guidance_rescale=guidance_rescale,
                                 control=control, inpaint=inpaint is not None, ip=ip_uncond is not None,
                                 true_cfg=true_cfg is not None, guidance_interval=guidance_interval is not None,
                                 pag=pag_scale != 0, sag=sag_scale != 0, apg=apg is not None, adapter=adapter)
        if guidance_interval is not None:
            guidance_interval = check_interval(guidance_interval)
            self._warn_empty_interval(guidance_interval, grid)
        limit = dict(interval=guidance_interval, noise_level=edm_sigma(self.schedule))   # for a Denoiser's t
        if self.uses_student(steps, teacher):
            net = self.student(steps)
            if net.w_range is not None and not net.w_range[0] <= guidance <= net.w_range[1]:
                warnings.warn(f"guidance w = {guidance:g} is outside [{net.w_range[0]:g}, {net.w_range[1]:g}], the "
                              f"range student-{steps} was distilled on: it extrapolates there and does not follow "
                              "the teacher's guidance (docs/stage3-distill.md)", stacklevel=3)
            model = self.denoiser(net, self.index.student_prediction)
            return model, lambda cond: {**cond, "w": guidance}, {"model": f"student-{steps}", "nfe_per_step": 1}
        if self.index.guidance_embed:              # FLUX.1-dev: one call a step, the scale is an input of the net
            net = self.teacher_net(inpaint, reference, control, control_range, grid, ip_uncond is not None,
                                   cfg_on=true_cfg not in (None, 1), adapter=adapter)
            self._refuse_interval_with_cond_half(net, guidance_interval)
            model = self.denoiser(GuidanceInput(net, 1.0 + guidance), self.index.prediction)
            if true_cfg is None or true_cfg == 1:
                return model, lambda cond: cond, {"model": "teacher", "nfe_per_step": 1}
            # true CFG (diffusers' true_cfg_scale s): both halves at the distilled scale, neg + s (pos - neg)
            uncond = self.encode_prompts([negative], chunks)
            if ip_uncond is not None:              # the negative half sees a black image, as diffusers' default
                uncond["ip_tokens"] = ip_uncond
            return (cfg(model, true_cfg - 1, uncond, apg=apg, **limit), lambda cond: cond,
                    {"model": "teacher", "nfe_per_step": self._cfg_calls(guidance_interval)})
        uncond = self.unconditional(negative, chunks, shape)
        if self.index.image_input == INSTRUCT:     # eq. 3 of Brooks et al. 2023: three net calls a step
            refuse_options(control=control, inpaint=inpaint is not None, ip=ip_uncond is not None,
                           guidance_rescale=guidance_rescale, guidance_interval=guidance_interval is not None,
                           apg=apg is not None, pag=pag_scale != 0, sag=sag_scale != 0, adapter=adapter)
            return instruct_model(self, reference, guidance, image_guidance, uncond, shape)
        unet = self.teacher_net(inpaint, reference, control, control_range, grid, ip_uncond is not None,
                                cfg_on=guidance != 0, adapter=adapter)
        self._refuse_interval_with_cond_half(unet, guidance_interval)
        if ip_uncond is not None:                  # ip_tokens reach the net as one more conditioning input
            uncond = {**uncond, "ip_tokens": ip_uncond}
        if pag_scale != 0:
            return self.pag_model(unet, guidance, pag_scale, pag_layers, uncond, guidance_rescale)
        if sag_scale != 0:
            return self.sag_model(unet, guidance, sag_scale, uncond)
        if guidance_rescale:   # rescale the net's eps / v, then convert: the rescale is not linear
            net_limit = {**limit, "noise_level": edm_sigma(self.schedule, self.index.time_scale)}   # the net's t
            model = self.denoiser(cfg(unet, guidance, uncond, guidance_rescale, **net_limit), self.index.prediction)
        else:
            model = cfg(self.denoiser(unet, self.index.prediction), guidance, uncond, apg=apg, **limit)
        return model, lambda cond: cond, {"model": "teacher",
                                          "nfe_per_step": 1 if guidance == 0 else self._cfg_calls(guidance_interval)}

    def pag_model(self, net, guidance: float, scale: float, layers, uncond: dict, rescale: float):
        """(x0-model, extra_args maker, info) of the teacher's `net` with perturbed-attention guidance (Ahn et al.
        2024; guidance.pag): the self-attentions of the U-Net's transformers named in `layers` (unet.layer_names:
        "mid", "down.1", "up.0", ...) take the identity map in a third part of the batch, 3 net calls a step with
        CFG, 2 at w = 0. `check_guidance` refused what it does not combine with."""
        if isinstance(layers, str):
            layers = [layers]
        chosen = self_attention_layers(self.unet, layers)

        def perturb(samples):
            return perturbed_self_attention(chosen, samples)
        if rescale:            # the net's eps / v, as diffusers rescales; the combination itself is linear
            model = self.denoiser(pag(net, guidance, scale, uncond, perturb, rescale), self.index.prediction)
        else:
            model = pag(self.denoiser(net, self.index.prediction), guidance, scale, uncond, perturb)
        return model, lambda cond: cond, {"model": "teacher", "nfe_per_step": 2 if guidance == 0 else 3}

    def sag_model(self, net, guidance: float, scale: float, uncond: dict):
        """(x0-model, extra_args maker, info) of the teacher's `net` with self-attention guidance beside CFG (Hong et
        al. 2023; ldm.diffusion.sag): the unconditional pass's middle-block self-attention map (`sag_attention`)
        picks where its x0-hat is blurred, the blurred x0-hat renoised with its eps goes through the net again with
        the unconditional prompt; 3 net calls a step with CFG, 2 at w = 0. `check_guidance` refused what it does
        not combine with."""
        def attention():
            return recorded_attention(self.unet)
        model = sag(self.denoiser(net, self.index.prediction), guidance, scale, uncond, attention, self.schedule)
        return model, lambda cond: cond, {"model": "teacher", "nfe_per_step": 3 if guidance != 0 else 2}

    def check_guidance(self, negative: str = "", guidance_rescale: float = 0.0, true_cfg: float | None = None,
                       guidance_interval: tuple[float, float] | None = None, apg: APG | None = None,
                       pag_scale: float = 0.0, sag_scale: float = 0.0) -> None:
        """ValueError, naming the CLI's flags, for guidance options this model cannot take or that do not combine:
        `model_function` calls it, and the CLI before any model runs. A guidance-distilled net (FLUX.1-dev) runs no
        CFG unless true CFG adds it; other models run real CFG."""
        distilled = self.index.guidance_embed
        if true_cfg is not None and not distilled:
            raise ValueError(f"--true-cfg (true_cfg) is for guidance-distilled models (FLUX.1-dev); this model runs "
                             f"real CFG: give --guidance W = S - 1 (--guidance {true_cfg - 1:g} for --true-cfg "
                             f"{true_cfg:g})")
        if true_cfg is not None and not true_cfg >= 1:
            raise ValueError(f"--true-cfg must be >= 1 (diffusers' true_cfg_scale; 1 is off), got {true_cfg}")
        if distilled and negative and true_cfg is None:
            raise ValueError("--negative: this model's guidance is distilled into the net (FLUX.1-dev): it draws with "
                             "the guidance scale as an input, not CFG, so it takes no negative prompt: add --true-cfg "
                             "S (true_cfg=S: CFG on top, diffusers' true_cfg_scale, e.g. 4)")
        if distilled and guidance_rescale:
            raise ValueError("--guidance-rescale: this model's guidance is distilled into the net (FLUX.1-dev), and "
                             "its true CFG (--true-cfg) takes no rescale (nor does diffusers' FluxPipeline)")
        for flag, value in (("--guidance-interval limits", guidance_interval), ("--apg changes", apg)):
            if distilled and value is not None and true_cfg in (None, 1):
                raise ValueError(f"{flag} CFG; this model's guidance is distilled into the net (FLUX.1-dev), which "
                                 "runs none: add --true-cfg S (true_cfg=S)")
        if apg is not None and guidance_rescale:
            raise ValueError("--apg and --guidance-rescale both counter over-saturation at high guidance (APG by "
                             "cutting its update's norm to R): give one")
        if apg is not None and pag_scale:
            raise ValueError("--apg is not combined with --pag (perturbed-attention guidance adds its own term to "
                             "CFG's): give one")
        if pag_scale:      # SD3's and FLUX.1's transformers have no U-Net levels (and FLUX.1-dev's branch runs no CFG)
            self.unet_only("--pag (perturbed-attention guidance, pag_scale)")
            if guidance_interval is not None:
                raise ValueError("--pag is not combined with --guidance-interval (pag_scale with guidance_interval)")
        if sag_scale < 0:  # diffusers runs SAG only for sag_scale > 0; a negative one would pull towards the blur
            raise ValueError(f"--sag (sag_scale) must be >= 0 (0 is off), got {sag_scale:g}")
        if sag_scale:      # it reads a U-Net's middle-block self-attention, at every call
            sag_attention(self.unet)
            for flag, given in (("--guidance-interval", guidance_interval is not None), ("--apg", apg is not None),
                                ("--pag", bool(pag_scale)), ("--guidance-rescale", bool(guidance_rescale)),
                                ("--deepcache", getattr(self.unet, "deepcache", None) is not None)):
                if given:
                    raise ValueError(f"--sag (self-attention guidance, sag_scale) is not combined with {flag}: "
                                     "it adds its own term to plain CFG's, from the middle block's attention map at "
                                     "every call (as diffusers' StableDiffusionSAGPipeline): give one")

    def _inside_interval(self, t, interval: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(EDM sigma at times t as a Denoiser sees them, where the guidance interval holds there)."""
        sigma = edm_sigma(self.schedule)(torch.as_tensor(t))
        return sigma, in_interval(sigma, interval)

    def _cfg_calls(self, interval: tuple[float, float] | None):
        """Network evaluations of one CFG call: 2, or with a guidance interval t -> 2 inside it, 1 outside."""
        if interval is None:
            return 2
        return lambda t: 1 + bool(self._inside_interval(t, interval)[1].any())

    def _warn_empty_interval(self, interval: tuple[float, float], grid: torch.Tensor | None) -> None:
        """Warn when no step of the run's `grid` lies inside the guidance interval: it would draw unguided."""
        if grid is None or len(grid) == 0:
            return
        sigma, inside = self._inside_interval(grid, interval)
        if not bool(inside.any()):
            warnings.warn(f"the guidance interval ({interval[0]:g}, {interval[1]:g}] holds none of this run's "
                          f"{len(grid)} steps (sigma / alpha from {float(sigma.max()):.4g} to "
                          f"{float(sigma.min()):.4g}): every step runs the conditional model alone", stacklevel=4)

    @staticmethod
    def _refuse_interval_with_cond_half(net, interval) -> None:
        """FLUX.1 ControlNets under CFG run on the first half of the batch (`cond_half`); outside a guidance
        interval the batch is the conditional one alone, which they would halve."""
        if interval is not None and getattr(net, "cond_half", False):
            raise ValueError("a guidance interval is not supported with FLUX.1 ControlNets under CFG")

    def teacher_net(self, inpaint, reference, control: list | None, control_range: list | None, grid, ip: bool,
                    cfg_on: bool, adapter: list | None = None):
        """The teacher's net with what a run binds to it: its image inputs (`image_input_net`), `adapter`'s
        T2I-Adapters (ldm.models.t2i_adapter.attach_adapters, over `grid`), `control`'s ControlNets acting over
        `control_range` of `grid`, and with `ip` the IP-Adapter's image tokens. cfg_on: the
        run combines two halves (CFG, FLUX.1-dev's true CFG): FLUX.1 ControlNets then run on the conditional half
        and lend both halves its residuals, as diffusers' FluxControlNetPipeline does."""
        net = self.image_input_net(inpaint, reference)
        if adapter:                                # inside the ControlNets: they pass it `control`, it adds features
            from ldm.models.t2i_adapter import attach_adapters
            net = attach_adapters(net, self.unet, adapter, self.autoencoder.config.downsample_factor,
                                  None if grid is None else grid * self.index.time_scale)
        if control:
            net = attach_controlnets(net, self.unet, control, self.autoencoder,
                                     self._control_steps(control, control_range, grid))
            if hasattr(net, "cond_half"):
                net.cond_half = cfg_on
        if ip:
            from ldm.models.ip_adapter import IPAdapterUNet
            net = IPAdapterUNet(net, self._ip[1])
        return net

    def _control_steps(self, control: list, control_range: list | None, grid: torch.Tensor | None):
        """A ControlSteps for `control_range` over the run's step times `grid` (as the net sees them), or None
        when every ControlNet acts throughout."""
        if control_range is None:
            return None
        ranges = check_control_ranges(control_range, len(control))
        if all(r == (0.0, 1.0) for r in ranges):
            return None
        if grid is None:
            raise ValueError("control_range needs the run's time grid (`grid`)")
        return ControlSteps(ranges, grid * self.index.time_scale)

    def image_input_net(self, inpaint: torch.Tensor | None, reference: torch.Tensor | None):
        """The teacher's net with its image inputs bound: `inpaint` (SD-inpainting's or FLUX.1 Fill's extra
        channels) and `reference` latents, appended to x for FLUX.1 Depth / Canny, tokens for Kontext."""
        if reference is not None and self.index.image_input not in ("control", "kontext"):
            raise ValueError("reference latents are for FLUX.1 Depth / Canny (a control image) and Kontext (an "
                             f"image to edit); this model's image_input is {self.index.image_input!r}")
        if self.index.image_input == "control":      # [x | control latents], as Fill's [x | masked image | mask]
            if reference is None:
                raise ValueError("this model (FLUX.1 Depth / Canny) draws from a control image: give its latents as "
                                 "`reference` (encode_images; the CLI's --control-image)")
            return ConcatInputs(self.unet, reference)
        net = self.unet if reference is None else ReferenceTokens(self.unet, reference)
        return net if inpaint is None else ConcatInputs(net, inpaint)

    @torch.no_grad()
    def sample(self, prompts: list[str], *, steps: int, guidance: float | None = None, seed: int | list[int] = 0,
               teacher: bool = False, sampler: str = "ddim", init: torch.Tensor | None = None,
               strength: float = 1.0, mask: torch.Tensor | None = None, negative: str = "",
               spacing: str | None = None, guidance_rescale: float = 0.0, size: tuple[int, int] | None = None,
               control: list | None = None, inpaint: torch.Tensor | None = None, ip_image=None,
               shift: float | None = None, reference: torch.Tensor | None = None,
               control_range: list[tuple[float, float]] | None = None, true_cfg: float | None = None,
               guidance_interval: tuple[float, float] | None = None, pag_scale: float = 0.0,
               pag_layers=PAG_LAYERS, window: tuple[int, int] | None = None,
               apg: APG | None = None, eta: float | None = None, image_guidance: float | None = None,
               adapter: list | None = None, first_pass: int = 0, subseed: int | list[int] | None = None,
               subseed_strength: float = 0.0, sag_scale: float = 0.0, restart: Restart | None = None,
               progress: bool = False, callback=None) -> tuple[torch.Tensor, dict]:
        """Latents (B, C, h, w) and info {model, steps, nfe, guidance, sampler, spacing}; nfe counts the
        network evaluations the sampler made (Heun: two a step but the last; CFG: two a call).
        spacing: the time grid (ldm.diffusion.schedules.SPACINGS); None: "karras" (Karras et al. 2022,
        eq. 5) for the teacher's heun, the pairing of their paper, "lcm" for the lcm and tcd samplers, else
        "trailing". Heun on a trailing grid that starts at the shapes64 teacher's s = sigma / alpha of 22026
        multiplies the change of the denoiser over its first step by ~2000 (1% of prompts right, docs/sampling.md).
        seed: one seed for the batch's noise, or one per prompt (a list): then image i is what seed[i]
        draws alone, as far as the starting noise decides it (all of it for ddim, euler, heun and
        dpmpp_2m; the stochastic samplers' later noise comes from seed[0] + 1 for the whole batch).

        init: latents to start from (SDEdit, Meng et al. 2022): noised to the grid time that leaves
        round(strength * steps) steps, and only those are run. mask (B, 1, h, w), 1 = repaint:
        the rest is held to `init` at every step (see `keep_known`). size: (width, height) in pixels,
        default the model's resolution; the U-Net and the autoencoder are convolutional and our position
        features resolution-free, so any multiple of `latent_shape`'s factor runs (what a model does at a
        size it was not trained at is its own affair: SD 1.x was trained at 512 px).
        control: [(ControlNet, image (1 or B, 3, H, W) in [0, 1] at the output size, scale[, mode]), ...] for
        the teacher (ldm.models.controlnet; FLUX.1's and SD3's: controlnet_flux, controlnet_sd3, whose images are
        encoded to latents; mode: a FLUX.1 Union ControlNet's control mode). control_range: [(start, end)], one
        for all ControlNets or one each, default (0, 1): a ControlNet acts on step i of the n run (img2img: the
        steps left) when i / n >= start and (i + 1) / n <= end (diffusers' control_guidance_start / _end, the
        A1111 web UI's starting / ending control step; ldm.models.controlnet.ControlSteps). inpaint: an inpainting
        U-Net's extra inputs (`inpainting_inputs`); without them such a U-Net draws freely, from an all-ones mask
        over an all-gray image (the A1111 web UI's txt2img with an inpainting model). ip_image: a PIL image (or one
        per prompt) prompting through the attached IP-Adapter (`add_ip_adapter`). shift: the teacher's time grid
        at log-SNR lower by 2 log `shift` (SD3's shift, eq. 23, for any schedule: more steps at high noise),
        in place of the model folder's (rectified flow's `shift`, else 1); students keep the grid they learnt.
        reference: latents (1 or B, C, h', w') of an image the net takes besides x (`image_input_net`): FLUX.1
        Depth / Canny's control image (at the drawn size), Kontext's image to edit (any size).
        true_cfg: FLUX.1-dev only, diffusers' true_cfg_scale s (1: off; None: off): two net calls a step, both at
        the distilled guidance 1 + w, combined as neg + s (pos - neg), i.e. our CFG at w' = s - 1 with `negative`
        ("" by default: diffusers turns it on only when given a negative_prompt, "" included) and, with an
        IP-Adapter, a black image prompt in the negative half; FLUX.1 ControlNets run on the positive half and
        both halves take their residuals (as FluxControlNetPipeline; -schnell's CFG too). Fill's, Depth / Canny's and
        Kontext's image inputs go to both halves. Other models have real CFG: guidance w = s - 1.
        guidance_interval: (lo, hi) for the teacher: CFG (or true CFG) only at steps whose EDM noise level
        sigma_t / alpha_t lies in (lo, hi] (Kynkaanniemi et al. 2024), the conditional model alone elsewhere, one
        net call instead of two; 0 and inf leave a side open. nfe counts the calls made.
        apg: the teacher's CFG (or true CFG) as adaptive projected guidance (ldm.diffusion.guidance.APG: r, eta,
        beta; Sadat et al. 2024) on x0-hat: the update cond - uncond, with momentum over this run's calls, cut to
        norm r, its part parallel to the conditional x0-hat weighted eta. Not with guidance_rescale.
        window: (side, stride) in pixels: MultiDiffusion (Bar-Tal et al. 2023), the latent of `size` (or init's)
        denoised as overlapping side x side windows `stride` apart whose x0-hat are averaged (`latent_windows`,
        ldm.diffusion.multidiffusion), so a model draws a panorama as it draws its native size; nfe counts the
        windows' evaluations and info gains "windows", how many cover the latent.
        pag_scale: the teacher's perturbed-attention guidance (Ahn et al. 2024; diffusers' pag_scale s, 0: off):
        the conditional prediction made again with the self-attention maps of `pag_layers` (default "mid"; "down.1",
        "up.0", ...: unet.layer_names) replaced by the identity, and the guided one moved away from it by s times
        the difference, beside CFG; 3 net calls a step with CFG, 2 at w = 0. U-Nets only (not SD3, FLUX.1).
        sag_scale: the teacher's self-attention guidance (Hong et al. 2023; diffusers' sag_scale s, 0: off): where
        the unconditional pass's middle-block self-attention looks most, its x0-hat is blurred, renoised and
        denoised again, and s times the change added, beside CFG (ldm.diffusion.sag); 3 net calls a step with CFG,
        2 at w = 0. U-Nets with a middle-block transformer only; not with guidance_interval, apg, pag_scale,
        guidance_rescale, DeepCache, composable prompts or the CFG++ samplers.
        eta: the sampler's noise in [0, 1], for the samplers that have such a knob (ETA_OPTIONS): DDIM's eta (Song
        et al. 2021, eq. 16; 1 is DDPM's posterior noise), TCD's gamma (Zheng et al. 2024; 1 is the lcm sampler);
        None: the sampler's own default (ddim 0, tcd 0.3). Students take it with ddim.
        restart: the restart sampler's interval, K and N (ldm.diffusion.restart.Restart; Xu et al. 2023); None: its
        default from the step count (A1111's). Its restarts come on top of `steps` main Heun steps: nfe counts them.
        image_guidance: an InstructPix2Pix model's image guidance scale s_I (None: 1.5), `reference` its image's
        unscaled latents at the drawn size (`edit` makes them); --guidance's w gives s_T = 1 + w (Brooks et al. 2023,
        eq. 3; ldm.instruct_pix2pix). 3 net calls a step; info gains "image_guidance".
        adapter: [(T2IAdapter, image (1 or B, C, H, W) in [0, 1] at the output size, scale[, factor]), ...] for the
        teacher's U-Net (Mou et al. 2023; ldm.models.t2i_adapter): scale x its features added in the encoder
        (diffusers' adapter_conditioning_scale; several: summed, as MultiAdapter), on the first int(n x factor) of
        the n steps run (diffusers' adapter_conditioning_factor, default 1).
        first_pass: the steps of a first pass this run continues (`hires`' second pass), for prompt editing's
        timeline (ldm.models.prompt_schedule.edit_step, as the A1111 web UI's hires fix); 0: none.
        subseed, subseed_strength: variation seeds (the A1111 web UI's variation seed and strength X in [0, 1]): the
        starting noise slerped from the seed's noise towards the subseed's (one subseed, or one per prompt as
        `seed`) by X (ldm.diffusion.variation.slerp; the sampler's own noise still comes from the seed).
        callback: the sampler's, called once a step with dict(i, t, x, denoised) (ldm.serve's progress and interrupt).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
        check_eta(sampler, eta)
        if restart is not None and sampler != "restart":
            raise ValueError(f"restart is the restart sampler's interval; sampler {sampler!r} takes none")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if init is not None and size is not None:
            raise ValueError("give init latents or a size, not both: the latents set the size")
        shape = self.latent_shape(len(prompts), size)
        if init is not None:                                # the latents set the size
            if init.ndim != 4 or init.shape[:2] != shape[:2]:
                raise ValueError(f"init latents {tuple(init.shape)} do not fit {len(prompts)} prompt(s): "
                                 f"expected {shape[:2]} and two spatial dims")
            shape = init.shape
        if mask is not None and init is None:
            raise ValueError("a mask needs init latents (the image to inpaint)")
        run = steps if init is None else round(strength * steps)
        subprompts, compose = self.compose_prompts(prompts, negative)          # "a AND b :0.8": a row a sub-prompt
        if compose is not None:
            check_composition(self, steps, teacher, window=window is not None)
        texts = self.step_prompts(subprompts, negative, max(run, 1), first_pass)   # prompt editing: each step's texts
        unique = list(dict.fromkeys(text for step in texts for text in step))
        self.check_prompts(unique)
        w = self.index.guidance if guidance is None else float(guidance)
        chunks = self.prompt_chunks([*unique, negative])       # cond and uncond alike (prompt_chunks.py)
        if self.inpainting_unet and inpaint is None:
            inpaint = self._paint_everything(shape)
        ip_cond, ip_uncond = self.image_prompt(ip_image, len(prompts)) if ip_image is not None else (None, None)
        self.refuse_with_student(steps, teacher, shift=shift is not None, true_cfg=true_cfg is not None,
                                 apg=apg is not None, cfg_pp=sampler in CFG_PP_SAMPLERS)
        teaching = not self.uses_student(steps, teacher)
        spacing = self.resolve_spacing(spacing, sampler, steps, teacher, shift)
        if shift is None:
            shift = self.grid_shift(shape) if teaching else self.student_grid_shift(steps, shape)
        ts = (self.schedule if shift is None else shifted(self.schedule, shift)).timesteps(steps, spacing=spacing)
        model, extra_args, info = self.model_function(steps, w, teacher, negative, guidance_rescale, chunks, control,
                                                      inpaint, ip_uncond, shape, reference, control_range,
                                                      ts[steps - run:-1], true_cfg, guidance_interval,
                                                      pag_scale=pag_scale, pag_layers=pag_layers, apg=apg,
                                                      image_guidance=image_guidance, adapter=adapter,
                                                      compose=compose, sag_scale=sag_scale)
        if info["model"] != "teacher" and sampler not in STUDENT_SAMPLERS:
            warnings.warn(f"{info['model']} was distilled to match DDIM steps; {sampler!r} runs it off them "
                          f"(its samplers: {', '.join(STUDENT_SAMPLERS)})", stacklevel=3)
        if info["model"] != "teacher" and spacing != "trailing":
            warnings.warn(f"{info['model']} was distilled on the trailing time grid; {spacing!r} runs it off it",
                          stacklevel=3)
        per_call, image_guidance = info["nfe_per_step"], info.get("image_guidance")
        info = {"model": info["model"], "steps": run, "nfe": 0, "guidance": w, "sampler": sampler, "spacing": spacing}
        if image_guidance is not None:                      # InstructPix2Pix's s_I
            info["image_guidance"] = image_guidance
        if window is not None:     # outside CFG: a guidance interval or rescale acts window by window
            boxes, stride = self.latent_windows(shape, window, control=(control or []) + (adapter or []),
                                                reference=reference)
            model = windowed(model, boxes, stride)
            n = info["windows"] = len(window_boxes(shape[-2:], boxes, stride))
            per_call = (lambda t, f=per_call: n * f(t)) if callable(per_call) else n * per_call
        if run == 0:                                        # strength 0: nothing to do
            return init, info
        ts = ts[steps - run:]                               # the remaining part of the grid
        x = self._starting_noise(ts, shape, seed, subseed, subseed_strength)
        seed = seed if isinstance(seed, int) else seed[0]
        if init is not None:
            alpha, sigma = (float(c) for c in self.schedule.alpha_sigma(ts[0]))
            x = alpha * init + sigma * x                    # q(z_t | z_0): SDEdit's starting point
        step_gen = torch.Generator(device=self.device).manual_seed(seed + 1)   # sampler noise, on device
        if mask is not None:
            model = keep_known(model, init, mask, self.schedule, step_gen)
        cond, model = self.step_conditioning(texts, chunks, model, ts[:-1])
        if ip_cond is not None:
            cond["ip_tokens"] = ip_cond
        if getattr(self.unet.cfg, "added_cond", None) == "text_time":
            cond["time_ids"] = self.size_ids(shape if compose is None else (len(subprompts), *shape[1:]))
        if sampler in CFG_PP_SAMPLERS and not hasattr(model, "guided_and_uncond"):
            raise ValueError(f"--sampler {sampler} (CFG++) renoises with CFG's unconditional prediction, which this "
                             "run's model function does not give: not with --guidance-interval, --guidance-rescale, "
                             "--pag, --sag, --window, a mask, prompt editing or composable prompts, an InstructPix2Pix model, "
                             "nor FLUX.1-dev without --true-cfg")
        noise = {} if eta is None else {ETA_OPTIONS[sampler]: float(eta)}
        if restart is not None:
            noise["restart"] = restart
        with fresh_caches([self.unet, *(s.unet for s in self._students.values())]):   # DeepCache: per run
            z = SAMPLERS[sampler](counted(model, info, per_call), x, ts, self.schedule, extra_args=extra_args(cond),
                                  disable=not progress, generator=step_gen, callback=callback, **noise)
        if mask is not None:
            z = mask * z + (1 - mask) * init
        return z, info

    def grid_shift(self, shape: tuple[int, ...]) -> float | None:
        """The folder's resolution-dependent shift for latents of `shape` (FLUX.1: from its token count), or
        None: the schedule's own."""
        if self.index.dynamic_shift is None:
            return None
        factor = self.unet.cfg.downsample_factor
        return resolution_shift((shape[-2] // factor) * (shape[-1] // factor), **self.index.dynamic_shift)

    def student_grid_shift(self, steps: int, shape: tuple[int, ...]) -> float | None:
        """The grid shift student-`steps` learnt, whatever size `shape` draws: its config's grid_shift, else (saved
        before students recorded it) the folder's at the model's resolution, the size stage 3 trains at. A student
        knows only its own grid's times; warns where the drawn size moves the teacher's grid off it."""
        learnt = self.student(steps).grid_shift
        learnt = self.grid_shift(self.latent_shape(1)) if learnt is None else learnt
        here = self.grid_shift(shape)
        if learnt is not None and here is not None and abs(here - learnt) > 1e-6 * learnt:
            factor = self.autoencoder.config.downsample_factor
            warnings.warn(f"student-{steps} draws {shape[-1] * factor}x{shape[-2] * factor} px on the grid it was "
                          f"distilled on (shift {learnt:.4g}), not the teacher's for that size ({here:.4g}): it "
                          f"learnt one size, the model's {self.index.resolution} px", stacklevel=4)
        return learnt

    def size_ids(self, shape: tuple[int, ...], negative: bool = False) -> torch.Tensor:
        """SDXL's size and crop numbers (Podell et al. 2023, sec. 2.2) for drawing at `shape`'s size: the
        "original" size and the target size are the output's (height, width) in pixels, the crop's top-left
        corner (0, 0): a whole, uncropped picture, as diffusers' default call. (B, 6), one row a sample.
        The refiner's: original size, crop corner and an aesthetic score, its negative one for the
        unconditional half (`negative`) (B, 5), as diffusers' refiner pipeline (6.0 and 2.5 by default)."""
        ids = sdxl_time_ids(None, shape, self.autoencoder.config.downsample_factor)
        if self.index.aesthetic is not None:
            score = torch.tensor([[float(self.index.aesthetic[int(negative)])]]).expand(shape[0], 1)
            ids = torch.cat([ids[:, :4], score], dim=1)
        return ids.to(self.device)

    def _starting_noise(self, ts: torch.Tensor, shape: tuple[int, ...], seed: int | list[int],
                        subseed: int | list[int] | None = None, strength: float = 0.0) -> torch.Tensor:
        """x at ts[0] on the device, with variation seeds slerped in (`sample`'s subseed, subseed_strength)."""
        if strength and subseed is None:
            raise ValueError(f"a variation strength ({strength}) needs a subseed to vary towards")
        x = self._seed_noise(ts, shape, seed)
        return x if subseed is None else slerp(strength, x, self._seed_noise(ts, shape, subseed))

    def _seed_noise(self, ts: torch.Tensor, shape: tuple[int, ...], seed: int | list[int]) -> torch.Tensor:
        """x at ts[0] on the device: from one seed for the batch, or from one seed per sample (CPU generators)."""
        if isinstance(seed, int):
            return initial_noise(self.schedule, ts, shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        if len(seed) != shape[0]:
            raise ValueError(f"{len(seed)} seeds for {shape[0]} prompts: give one seed, or one per prompt")
        return torch.cat([initial_noise(self.schedule, ts, (1, *shape[1:]), generator=torch.Generator().manual_seed(s))
                          for s in seed]).to(self.device)

    def _paint_everything(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An inpainting U-Net's extra inputs for drawing freely: an all-ones mask over an all-gray image."""
        factor = self.autoencoder.config.downsample_factor
        blank = torch.zeros(shape[0], 3, shape[-2] * factor, shape[-1] * factor, device=self.device)
        return self.inpainting_inputs(blank, torch.ones_like(blank[:, :1]))

    @torch.no_grad()
    def generate(self, prompts: list[str], *, steps: int, guidance: float | None = None, seed: int | list[int] = 0,
                 **kwargs) -> tuple[torch.Tensor, dict]:
        """Images (B, 3, H, W) in [-1, 1] and info {model, steps, nfe}; a student when one has `steps`.
        kwargs: `sample`'s teacher, sampler, negative, spacing, guidance_rescale, progress."""
        z, info = self.sample(prompts, steps=steps, guidance=guidance, seed=seed, **kwargs)
        return self.decode(z), info

    @torch.no_grad()
    def hires(self, prompts: list[str], *, steps: int, scale: float, strength: float = 0.7,
              size: tuple[int, int] | None = None, seed: int | list[int] = 0, **kwargs) -> tuple[torch.Tensor, dict]:
        """Two passes, as the A1111 web UI's "hires fix" with its latent upscaler: sample at `size`, enlarge
        the latents `scale` times (bilinear), then SDEdit them at `strength` (round(strength * steps) steps
        from the same seed). A model trained at one size keeps that size's layout and adds the larger
        size's detail. Images at scale x size; info's steps and nfe count both passes. Prompt edits run on the web
        UI's two timelines: "[a:b:0.5]" switches half-way through the first pass, "[a:b:1.5]" through the second."""
        width, height = size or (self.index.resolution,) * 2
        big = (round(width * scale), round(height * scale))
        factor = self.autoencoder.config.downsample_factor
        self.latent_shape(1, big)                          # the enlarged size must fit the networks
        z, first = self.sample(prompts, steps=steps, seed=seed, size=(width, height), **kwargs)
        z = F.interpolate(z, size=(big[1] // factor, big[0] // factor), mode="bilinear", align_corners=False)
        for key in ("control", "adapter"):                 # control and adapter images follow to the larger size
            if kwargs.get(key):
                kwargs[key] = [(net, F.interpolate(hint, size=big[::-1], mode="bilinear", align_corners=False), *rest)
                               for net, hint, *rest in kwargs[key]]
        z, info = self.sample(prompts, steps=steps, seed=seed, init=z, strength=strength, first_pass=steps, **kwargs)
        return self.decode(z), {**info, "steps": first["steps"] + info["steps"], "nfe": first["nfe"] + info["nfe"]}

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, prompts: list[str], *, strength: float, steps: int,
                **kwargs) -> tuple[torch.Tensor, dict]:
        """SDEdit: images (B, 3, H, W) in [-1, 1] -> edited images, running round(strength * steps) steps."""
        z0 = self.encode_images(images)
        z, info = self.sample(prompts, steps=steps, init=z0, strength=strength, **kwargs)
        return self.decode(z), info

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, prompts: list[str], *, steps: int,
                strength: float = 1.0, **kwargs) -> tuple[torch.Tensor, dict]:
        """Repaint where masks (B, 1, H, W) are 1; elsewhere the result is the input image. A plain U-Net
        repaints by holding the known latents (`keep_known`); an inpainting U-Net (SD-inpainting) is
        given the mask and the masked image and draws from pure noise (`inpainting_inputs`); so does a model
        with an inpainting ControlNet in `control` (SD3's, mask_channels 1), its RGB control image (usually
        `images` in [0, 1]) given the mask (`inpaint_control`), as StableDiffusion3ControlNetInpaintingPipeline.
        strength < 1 starts every way from the image's latents noised to the grid time that leaves round(strength *
        steps) steps (SDEdit inside the mask: the A1111 web UI's denoising strength with "original" content)."""
        images, masks = images.to(self.device), masks.to(self.device)
        size = (images.shape[-1], images.shape[-2])              # the image's size, not the model's default
        start = {"size": size} if strength == 1 else {"init": self.encode_images(images), "strength": strength}
        if inpainting_control(kwargs.get("control")):
            from ldm.models.controlnet_sd3 import inpaint_control
            kwargs["control"] = [(net, inpaint_control(hint, masks) if getattr(net, "mask_channels", 0) and
                                  hint.shape[1] == 3 else hint, *rest) for net, hint, *rest in kwargs["control"]]
            z, info = self.sample(prompts, steps=steps, **start, **kwargs)
        elif self.inpainting_unet:
            z, info = self.sample(prompts, steps=steps, inpaint=self.inpainting_inputs(images, masks), **start,
                                  **kwargs)
        else:
            z0 = start["init"] if "init" in start else self.encode_images(images)
            z, info = self.sample(prompts, steps=steps, init=z0, strength=strength,
                                  mask=latent_grid_mask(masks, z0.shape[-2:]), **kwargs)
        return masks * self.decode(z) + (1 - masks) * images, info

    @torch.no_grad()
    def edit(self, images: torch.Tensor, prompts: list[str], *, steps: int, size: tuple[int, int] | None = None,
             **kwargs) -> tuple[torch.Tensor, dict]:
        """FLUX.1 Kontext: images (1 or B, 3, H, W) in [-1, 1] (ldm.flux_tools.kontext_size says the size Kontext
        prefers) edited as `prompts` say, drawn from pure noise with the images' latents as reference tokens;
        size: (width, height) of the output, default the images'. InstructPix2Pix (ldm.instruct_pix2pix): the same,
        the images' unscaled latents as the U-Net's extra channels, at the images' size; kwargs' image_guidance is
        its s_I."""
        if self.index.image_input == INSTRUCT:
            if size is not None and tuple(size) != (images.shape[-1], images.shape[-2]):
                raise ValueError(f"InstructPix2Pix draws at the image's size, {images.shape[-1]}x{images.shape[-2]}; "
                                 f"resize the image to {size[0]}x{size[1]} instead")
            z, info = self.sample(prompts, steps=steps, size=(images.shape[-1], images.shape[-2]),
                                  reference=image_latents(self, images), **kwargs)
            return self.decode(z), info
        if self.index.image_input != "kontext":
            raise ValueError(f"edit needs a FLUX.1 Kontext model or an InstructPix2Pix one; this one's image_input "
                             f"is {self.index.image_input!r}")
        reference = self.encode_images(images)
        size = size or (images.shape[-1], images.shape[-2])
        z, info = self.sample(prompts, steps=steps, size=size, reference=reference, **kwargs)
        return self.decode(z), info

    @property
    def inpainting_unet(self) -> bool:
        """A net that takes the mask and the masked image's latents besides x: SD-inpainting (4 + 1 + 4 channels),
        FLUX.1 Fill (16 + 16 + 64)."""
        return (self.index.image_input == "fill" or
                self.unet.cfg.in_channels == 2 * self.autoencoder.config.z_channels + 1)

    def inpainting_inputs(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1 + C, h, w): the mask at the latent grid (nearest) and the latents of the image with the masked
        part set to 0 (mid-gray), as SD-inpainting was trained (diffusers' inpainting pipeline); FLUX.1 Fill's
        (B, C + f^2, h, w) (ldm.flux_tools.fill_inputs)."""
        if self.index.image_input == "fill":
            return fill_inputs(self.encode_images, images, masks, self.autoencoder.config.downsample_factor)
        masks = (masks >= 0.5).to(images.dtype)
        latents = self.encode_images(images * (1 - masks))
        return torch.cat([F.interpolate(masks, size=latents.shape[-2:]), latents], dim=1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], sides as `latent_shape` takes them -> scaled latents (posterior mode)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        self.latent_shape(len(images), (images.shape[-1], images.shape[-2]))
        tile = tile_for(self.vae_tiling, self.device, *images.shape[-2:])
        return self.autoencoder.encode_latents(images.to(self.device), sample=False, tile=tile)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> fp32 images in [-1, 1], in bf16 autocast if decoder_precision says so
        (shapes64: at most 0.02 from fp32, 1.5e-3 on average). On a CPU in chunks: a chunk's
        full-resolution activations stay in cache (50 shapes64 latents at once are ~2x slower per image)."""
        bf16 = self.decoder_precision == "bf16"
        factor = self.autoencoder.config.downsample_factor
        tile = tile_for(self.vae_tiling, z.device, z.shape[-2] * factor, z.shape[-1] * factor)
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            if z.device.type != "cpu":
                return self.autoencoder.decode_latents(z, tile).float().clamp(-1, 1)
            # channels_last input as well as weights: an NCHW input sends the first convs to the
            # slow non-oneDNN path.
            parts = [self.autoencoder.decode_latents(c.contiguous(memory_format=torch.channels_last), tile)
                     for c in z.split(CPU_DECODE_CHUNK)]
        return torch.cat(parts).float().clamp(-1, 1).contiguous()

    def holds_known(self, control: list | None = None) -> bool:
        """Whether `inpaint` repaints by holding the known latents at every step (`keep_known`: a plain U-Net and
        no inpainting ControlNet in `control`), rather than with a net that is given the mask."""
        return not inpainting_control(control) and not self.inpainting_unet

    def resolve_spacing(self, spacing: str | None, sampler: str, steps: int, teacher: bool = False,
                        shift: float | None = None) -> str:
        """The time grid a run takes: `spacing`, or by default "karras" for the teacher's heun (Karras et al.'s
        pairing) and restart (Heun too, on A1111's grid), "lcm" for lcm and tcd (the grid LCMs learn on,
        ldm/distill/lcm.py), else "trailing". A given `shift` is refused on a grid that lays its own noise levels
        out, where it would do nothing."""
        if spacing is None:
            spacing = "karras" if sampler in ("heun", "restart") and not self.uses_student(steps, teacher) else \
                "lcm" if sampler in ("lcm", "tcd") else "trailing"
        if shift is not None and spacing not in SHIFTED_SPACINGS:
            raise ValueError(f"--shift moves the {', '.join(SHIFTED_SPACINGS)} grids; the {spacing} grid "
                             "lays out its own noise levels and would ignore it")
        return spacing

    def uses_student(self, steps: int, teacher: bool = False) -> bool:
        """Whether sampling with `steps` runs a student (one is distilled to it, and the teacher is not forced)."""
        return not teacher and steps in self._available_students()

    def _available_students(self) -> list[int]:
        return self.student_steps if self.folder else []


class ConcatInputs(torch.nn.Module):
    """An inpainting U-Net (SD-inpainting: 4 + 1 + 4 input channels) seen as a plain one: its extra
    inputs, the latent mask and the masked image's latents, are appended to x at every call. Likewise
    FLUX.1 Fill's masked image and folded mask, and Depth / Canny's control latents (ldm.flux_tools)."""

    def __init__(self, unet, extra: torch.Tensor):
        super().__init__()
        self.unet, self.cfg, self.extra = unet, unet.cfg, extra

    def forward(self, x, t, context, context_mask=None, cond_emb=None, control=None, **added):
        extra = self.extra.to(device=x.device, dtype=x.dtype)
        extra = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)          # CFG's halves share it
        return self.unet(torch.cat([x, extra], dim=1), t, context, context_mask, cond_emb, control=control, **added)


class GuidanceInput(torch.nn.Module):
    """A guidance-distilled net (FLUX.1-dev) with its guidance scale bound: the net is called once a step."""

    def __init__(self, net, scale: float):
        super().__init__()
        self.net, self.cfg, self.scale = net, net.cfg, float(scale)

    def forward(self, x, t, context, **kwargs):
        return self.net(x, t, context, guidance=torch.full((x.shape[0],), self.scale, device=x.device), **kwargs)


def latent_grid_mask(masks: torch.Tensor, size) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) in {0, 1} -> (B, 1, h, w) (`size`: a side or (h, w)) by max-pooling: a latent
    cell is repainted when any of its pixels is, so the repainted region covers the mask (the decoder mixes
    neighbours)."""
    return torch.nn.functional.adaptive_max_pool2d(masks.float(), tuple(size) if not isinstance(size, int) else size)


def inpainting_control(control: list | None) -> bool:
    """Whether `control` ((net, image, ...) entries) holds an inpainting ControlNet, one that reads a mask (SD3's)."""
    return any(getattr(c[0], "mask_channels", 0) for c in control or ())


def own_cache(cache: DeepCache | None) -> DeepCache | None:
    """A DeepCache with `cache`'s options and an empty cache of its own (a student's beside the teacher's)."""
    return None if cache is None else DeepCache(cache.interval, cache.branch)


def counted(model, info: dict, per_call):
    """`model`, adding `per_call` network evaluations (an int, or a function of t) to info["nfe"] at each call."""
    def call(x, t, **extra_args):
        info["nfe"] += per_call(t) if callable(per_call) else per_call
        return model(x, t, **extra_args)

    both = getattr(model, "guided_and_uncond", None)
    if both is not None:                   # cfg's CFG++ path (ldm.diffusion.cfgpp): two evaluations a call, w = 0 too
        def guided_and_uncond(x, t, **extra_args):
            info["nfe"] += 2
            return both(x, t, **extra_args)
        call.guided_and_uncond = guided_and_uncond
    return call


def keep_known(model, z0: torch.Tensor, mask: torch.Tensor, schedule, generator):
    """x0-model for inpainting (RePaint, Lugmayr et al. 2022, in latent space).

    At every step the known region (mask 0) of the input is replaced by z0 freshly noised to t,
    q(z_t | z0), and the prediction there is z0 itself; only the masked region is generated.
    """
    def wrapped(x, t, **extra_args):
        alpha, sigma = coefficients(schedule, t, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mask * x + (1 - mask) * (alpha * z0 + sigma * noise)
        return mask * model(x, t, **extra_args) + (1 - mask) * z0
    return wrapped


def save_random_model(folder: str, *, resolution: int = 32, seed: int = 0, text_max_length: int = 16) -> ModelIndex:
    """A tiny, randomly initialised model folder (AE f=4, 1-layer text encoder, tiny U-Net) for smoke tests."""
    from ldm.models.autoencoder import AutoencoderConfig
    from ldm.models.unet import tiny_config
    torch.manual_seed(seed)
    AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, resolution=resolution,
                                    num_groups=4, mid_attn=False)).save_pretrained(os.path.join(folder, "autoencoder"))
    ScratchTextEncoder(TextEncoderConfig(width=32, depth=1, heads=2, max_length=text_max_length)).save_pretrained(
        os.path.join(folder, "text_encoder"))
    UNet(tiny_config(context_dim=32)).save_pretrained(os.path.join(folder, "unet"))
    index = ModelIndex(resolution=resolution)
    save_index(folder, index)
    return index
