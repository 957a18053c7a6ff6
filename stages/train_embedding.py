"""Textual inversion (Gal et al. 2023, "An Image is Worth One Word"): learn a new word's vectors for a frozen model.

    accelerate launch stages/train_embedding.py --config configs/embedding/shapes64.yaml [--resume latest] [key=value ...]
    python -m ldm.txt2img "a <zig> on the left" --teacher --steps 25 --embedding runs/embedding-shapes64/learned_embeds.safetensors

The story: setup -> the frozen model folder (autoencoder, text encoder, U-Net and its schedule, as txt2img loads
them) -> the word: k new tokens, and k trainable vectors per token table (SDXL: one for each of its two CLIPs) that a
hook on the table puts in place wherever the tokens appear (Gal et al. sec. 3: v* = argmin_v E ||target - net||^2,
everything else frozen) -> data -> prepare -> resume -> loop (latents, captions with the word, the model's own
diffusion loss, update, log, sample grid, checkpoint) -> `<output_dir>/learned_embeds.safetensors`.

Only the new vectors are parameters: the token tables themselves never receive a gradient, so every other
word's embedding stays exactly as it was (diffusers' script trains the whole table and copies the old rows
back after each step). The file is diffusers' layout, {word: (k, D)} (`load_textual_inversion` reads it), or
A1111's {"emb_params": (k, D)} (`save_format: a1111`); SDXL's is {"clip_l": (k, 768), "clip_g": (k, 1280)}.
Its metadata names the word, which `--embedding FILE` then uses.

Pictures: `data.source: shapes` draws scenes of `concept`, a shapes-world caption ("a large red circle"), in
random places; any other source is the loaders' (an imagefolder with or without metadata.jsonl). Captions:
one of `templates` per picture ("a photo of {}", {} = the word), or `templates: []` for the data's own
captions, which must name the word. Students of a model folder were distilled without the word: draw it with
the teacher (`--teacher`).
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ldm.data.loaders import (IMAGE_EXTENSIONS, DataConfig, ImageTextDataset, build_dataset, check_image_multiple,
                              resumable_loader)
from ldm.data.shapes import render, scene_for_prompt
from ldm.data.transforms import to_tensor
from ldm.diffusion import SAMPLERS, DiffusionLoss
from ldm.models.unet import refuse_refiner, sdxl_time_ids
from ldm.models.weights import write_safetensors_atomic
from ldm.pipeline import DEFAULT_MODEL, TextToImage
from ldm.training import (Checkpointer, NonFiniteGuard, ProgressBar, TrainConfig, build_optimizer, build_scheduler,
                          config_to_dict, log_images, one_batch_size, optimizer_step, parse_args, setup)
from ldm.training.gather import is_sharded

logger = logging.getLogger("train_embedding")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedding" / "shapes64.yaml"


@dataclass
class WordConfig:
    word: str = "<zig>"                                    # the new word, as prompts will write it
    init_word: str = "shape"                               # its vectors start as this one-token word's embedding
    vectors: int = 1                                       # k: tokens the word becomes (word, word_1, ...)

    def __post_init__(self):
        if not self.word or re.search(r"\s", self.word) or "{}" in self.word:
            raise ValueError(f"embedding.word {self.word!r}: one word without spaces, e.g. '<zig>'")
        if self.vectors < 1:
            raise ValueError(f"embedding.vectors must be >= 1, got {self.vectors}")


@dataclass
class ValConfig:
    prompts: list[str] = field(default_factory=lambda: ["a {}"])  # grid rows, {} = the word
    images: int = 8                                        # grid columns: seeds 0..images-1
    guidance: float | None = None                          # w of the samples; None: the model folder's
    steps: int = 25                                        # teacher sampler steps
    sampler: str = "ddim"                                  # ldm.diffusion.samplers name

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"val.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if not self.prompts or self.images < 1 or self.steps < 1:
            raise ValueError("val needs at least one prompt, images >= 1 and steps >= 1")


@dataclass
class EmbeddingStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedding: WordConfig = field(default_factory=WordConfig)
    val: ValConfig = field(default_factory=ValConfig)
    model: str = DEFAULT_MODEL                             # the frozen model folder (shapes64, an SD 1.x/2.x or SDXL import)
    concept: str = ""                                      # data.source=shapes: pictures of this shapes-world caption
    templates: list[str] = field(default_factory=lambda: ["a {}"])  # a caption per picture, {} = the word;
                                                           # []: the data's own captions (each must name the word)
    save_format: Literal["diffusers", "a1111"] = "diffusers"

    def __post_init__(self):
        bad = [t for t in self.templates if "{}" not in t] + [p for p in self.val.prompts if "{}" not in p]
        if bad:
            raise ValueError(f"templates and val.prompts need {{}} for the word: {bad[0]!r} has none")
        if self.data.source == "shapes":
            from ldm.data.captions import parse_caption
            if not self.concept:
                raise ValueError("data.source=shapes draws pictures of `concept`: set it, e.g. concept='a large red "
                                 "circle'")
            try:
                parse_caption(self.concept)
            except ValueError as err:
                raise ValueError(f"concept {self.concept!r} is not a shapes-world caption ({err})") from None
            if not self.templates:
                raise ValueError("data.source=shapes: its captions do not name the word; set templates")
        elif self.concept:
            raise ValueError("concept draws shapes-world pictures: it needs data.source=shapes")
        self.data = one_batch_size(self.data, self.train)


# ----------------------------------------------------------------------------- data

class ConceptScenes(Dataset):
    """`length` shapes-world pictures of one caption, each a pure function of (seed, index); text "" (templates)."""

    def __init__(self, concept: str, seed: int, length: int, resolution: int):
        self.concept, self.seed, self.length, self.resolution = concept, seed, length, resolution

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        scene = scene_for_prompt(self.concept, np.random.default_rng([self.seed, 7, int(index)]))
        return {"pixel_values": to_tensor(render(scene, self.resolution)), "text": ""}


def pictures(cfg: EmbeddingStageConfig) -> Dataset:
    """The training pictures: shapes scenes of `concept`, a folder of pictures without captions, or the loaders'."""
    data = cfg.data
    if data.source == "shapes":
        return ConceptScenes(cfg.concept, data.seed, data.length, data.resolution)
    root = Path(data.path)
    if data.source == "imagefolder" and root.is_dir() and not any(root.rglob("metadata.jsonl")):
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"data.path {data.path}: no pictures ({sorted(IMAGE_EXTENSIONS)})")
        if not cfg.templates:
            raise ValueError(f"data.path {data.path} has no metadata.jsonl captions: set templates")
        return ImageTextDataset([(str(p), "") for p in files], list(range(len(files))), data)
    return build_dataset(data)


def captions(batch: dict, cfg: EmbeddingStageConfig) -> list[str]:
    """A template per picture (the seeded global RNG picks it), or the data's own captions, which must name the word."""
    word = cfg.embedding.word
    if cfg.templates:
        picks = torch.randint(len(cfg.templates), (len(batch["text"]),)).tolist()
        return [cfg.templates[i].replace("{}", word) for i in picks]
    missing = [t for t in batch["text"] if word not in t]
    if missing:
        raise ValueError(f"caption {missing[0]!r} does not name {word!r}: with templates: [] every caption must")
    return list(batch["text"])


# ----------------------------------------------------------------------------- the word

def token_tables(encoder) -> list[nn.Embedding]:
    """The token-embedding tables a prompt's ids index: CLIP's, SDXL's two CLIPs', or our scratch encoder's."""
    if hasattr(encoder, "pairs"):                          # SDXL
        return [model.get_input_embeddings() for model, _ in encoder.pairs]
    if hasattr(encoder, "model"):                          # transformers CLIP
        return [encoder.model.get_input_embeddings()]
    return [encoder.token_embedding]


class WordVectors(nn.Module):
    """The word's (k, D) vectors for each token table: the only parameters the stage trains. A forward hook on
    each table splices them in where the word's k token ids appear; the tables' own rows are never read there."""

    def __init__(self, tables: list[nn.Embedding], ids: list[int], inits: list[torch.Tensor]):
        super().__init__()
        self.vectors = nn.ParameterList(nn.Parameter(v.detach().float().clone()) for v in inits)
        self.register_buffer("ids", torch.tensor(ids), persistent=False)
        self._live: tuple[torch.Tensor, ...] | None = None
        for i, table in enumerate(tables):
            table.register_forward_hook(lambda module, inputs, output, i=i: self._splice(i, inputs[0], output))

    def forward(self) -> tuple[torch.Tensor, ...]:
        """The vectors, through the (DDP-)wrapped module so that its gradient hooks see them used this step."""
        return tuple(self.vectors)

    @contextmanager
    def spliced(self, vectors: tuple[torch.Tensor, ...]):
        """Encode with `vectors` (this step's, from forward) instead of the parameters themselves."""
        self._live = vectors
        try:
            yield
        finally:
            self._live = None

    def _splice(self, i: int, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        vectors = (self._live or tuple(self.vectors))[i].to(output.dtype)                # (k, D)
        match = ids[..., None] == self.ids.to(ids.device)                               # (B, L, k)
        return torch.where(match.any(-1, keepdim=True), match.to(output.dtype) @ vectors, output)


def add_word(pipe: TextToImage, cfg: WordConfig) -> WordVectors:
    """The word as k new tokens of the model's text encoder (rows initialised from init_word, unused while the hook
    is on), and the trainable vectors that stand for them."""
    encoder = pipe.text_encoder
    if pipe.text_kind in ("sd3", "flux") or not hasattr(encoder, "add_embedding"):
        raise ValueError(f"textual inversion needs a CLIP text encoder (SD 1.x/2.x, SDXL) or our scratch one; this "
                         f"model's is {type(encoder).__name__}" + (f" ({pipe.text_kind})" if pipe.text_kind else ""))
    init_ids = encoder.token_ids(cfg.init_word)
    if len(init_ids) != 1:
        raise ValueError(f"embedding.init_word {cfg.init_word!r} is {len(init_ids)} tokens: pick a word of one token")
    inits = [table.weight[init_ids[0]].detach().float().expand(cfg.vectors, -1) for table in token_tables(encoder)]
    encoder.add_embedding(cfg.word, *inits)                # CLIP's tables are replaced as they grow: look again
    ids = encoder.token_ids(cfg.word)
    if len(ids) != cfg.vectors:
        raise ValueError(f"embedding.word {cfg.word!r} reads as {len(ids)} tokens, not its {cfg.vectors}: a word "
                         "that contains another one")
    return WordVectors(token_tables(encoder), ids, inits)


def conditioning(pipe: TextToImage, prompts: list[str], z: torch.Tensor, size_ids=None) -> dict:
    """The U-Net's conditioning as `pipe.encode_prompts` makes it, with a graph through the word's vectors."""
    encoder = pipe.text_encoder
    if hasattr(encoder, "encode_pooled"):                  # SDXL; its no_grad-decorated method's own body
        context, _, pooled = type(encoder).encode_pooled.__wrapped__(encoder, prompts)
        factor = pipe.autoencoder.config.downsample_factor
        return {"context": context, "pooled": pooled,
                "time_ids": sdxl_time_ids(size_ids, z.shape, factor).to(z.device)}
    context, mask = encoder(prompts)                       # (B, L, D), (B, L)
    if not getattr(encoder.cfg, "mask_padding", True):     # imported SD U-Nets see every token
        return {"context": context}
    return {"context": context, "context_mask": mask}


def save_embedding(words: WordVectors, cfg: EmbeddingStageConfig, step: int) -> Path:
    """`<output_dir>/learned_embeds.safetensors` (diffusers; SDXL: clip_l + clip_g) or `<word>.safetensors`
    (A1111: the web UI names the word after the file); the metadata names the word for `--embedding FILE`."""
    vectors = [v.detach().float().cpu().contiguous() for v in words.vectors]
    word = cfg.embedding.word
    if len(vectors) == 2:                                  # SDXL: its two encoders' words
        tensors = {"clip_l": vectors[0], "clip_g": vectors[1]}
    else:
        tensors = {word: vectors[0]} if cfg.save_format == "diffusers" else {"emb_params": vectors[0]}
    name = "learned_embeds" if cfg.save_format == "diffusers" else re.sub(r"[^\w.-]", "", word) or "embedding"
    path = Path(cfg.train.output_dir) / f"{name}.safetensors"
    write_safetensors_atomic(tensors, path, {"word": word, "init_word": cfg.embedding.init_word,
                                             "model": str(cfg.model), "step": str(step)})
    return path


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(accelerator, pipe: TextToImage, cfg: EmbeddingStageConfig, val_pictures: torch.Tensor, step: int):
    """A PNG grid: the first row training pictures, then one row per val prompt (the teacher, seeds 0..images-1)."""
    n = cfg.val.images
    rows = [val_pictures[:n]]
    for template in cfg.val.prompts:
        images, _ = pipe.generate([template.replace("{}", cfg.embedding.word)] * n, steps=cfg.val.steps,
                                  guidance=cfg.val.guidance, seed=list(range(n)), teacher=True,
                                  sampler=cfg.val.sampler)
        rows.append(images.cpu())
    log_images(accelerator, torch.cat(rows), step, output_dir=cfg.train.output_dir, nrow=n)


# ----------------------------------------------------------------------------- the stage

def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(EmbeddingStageConfig, "Textual inversion: learn a new word's vectors for a frozen model.",
                     DEFAULT_CONFIG, argv)
    accelerator = setup(cfg.train, cfg, project="embedding")
    device = accelerator.device
    if is_sharded(accelerator):
        raise ValueError("textual inversion trains a few vectors: run it single-process or DDP, not FSDP")
    if cfg.train.ema_decay:
        raise ValueError("train.ema_decay: textual inversion keeps no EMA of its vectors; set it to 0")

    # The frozen model, as txt2img loads it; the word's vectors are the only parameters that train.
    pipe = TextToImage.from_folder(cfg.model, device=device)
    for module in (pipe.autoencoder, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    refuse_refiner(pipe.index, "textual inversion")
    if pipe.index.guidance_embed or not hasattr(pipe.unet.cfg, "downsample_factor"):
        raise ValueError("textual inversion here trains words for U-Net models (ours, SD 1.x/2.x, SDXL)")
    factor = pipe.autoencoder.config.downsample_factor
    check_image_multiple(cfg.data, factor * pipe.unet.cfg.downsample_factor,
                         "the model's autoencoder factor x U-Net downsampling")
    words = add_word(pipe, cfg.embedding)
    if cfg.train.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    logger.info("word %r: %d vector(s) of %s, from %r", cfg.embedding.word, cfg.embedding.vectors,
                " + ".join(str(v.shape[1]) for v in words.vectors), cfg.embedding.init_word)

    dataset = pictures(cfg)
    data = resumable_loader(dataset, cfg.data, accelerator)
    val_pictures = torch.stack([dataset[i % len(dataset)]["pixel_values"] for i in range(cfg.val.images)])

    optimizer = build_optimizer(words, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)      # stepped by us, not prepared
    model, optimizer = accelerator.prepare(words, optimizer)
    words = accelerator.unwrap_model(model)
    model_config = {"model": str(cfg.model), "embedding": config_to_dict(cfg.embedding),
                    "widths": [v.shape[1] for v in words.vectors]}
    ckpt = Checkpointer(accelerator, cfg.train, stage="embedding", config=cfg, model=model, optimizer=optimizer,
                        scheduler=scheduler, data=data, model_config=model_config)
    step = ckpt.resume()  # restores the RNG last

    # The model's own objective: its schedule, parameterisation and time units.
    schedule, index = pipe.schedule, pipe.index
    loss_fn = DiffusionLoss(schedule, index.prediction, time="discrete" if hasattr(schedule, "num_timesteps")
                            else "continuous", time_scale=index.time_scale)
    guard = NonFiniteGuard(cfg.train.max_nonfinite)
    bar = ProgressBar(accelerator, cfg.train.max_steps, initial=step)
    batches = data.forever()
    while step < cfg.train.max_steps:
        batch = next(batches)
        with torch.no_grad():
            z = pipe.autoencoder.encode_latents(batch["pixel_values"].to(device), sample=True)
        prompts = captions(batch, cfg)
        with accelerator.accumulate(model):
            with words.spliced(model()), accelerator.autocast():
                cond = conditioning(pipe, prompts, z, batch.get("size_ids"))
                loss = loss_fn(pipe.unet, z, cond)
            guard.observe(loss)
            accelerator.backward(loss)
            update = None
            if accelerator.sync_gradients:
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=cfg.train.max_grad_norm)
        if update is None:
            continue

        step += 1
        bar.update(update)
        if step % cfg.train.log_every == 0:
            norms = {f"train/vector_norm_{i}": v.detach().norm(dim=-1).mean().item()
                     for i, v in enumerate(words.vectors)}
            accelerator.log({**update.metrics(), **norms, "train/skipped": guard.total_skipped}, step=step)
        if cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0 and accelerator.is_main_process:
            validate(accelerator, pipe, cfg, val_pictures, step)
            save_embedding(words, cfg, step)
        ckpt.maybe_save(step)

    bar.close()
    path = None
    if accelerator.is_main_process:
        path = save_embedding(words, cfg, step)
        logger.info("embedding %r: %s", cfg.embedding.word, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path if path is not None else Path(cfg.train.output_dir)


if __name__ == "__main__":
    main()
