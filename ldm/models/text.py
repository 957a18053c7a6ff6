"""Text encoders: prompts -> token features (B, L, D) and a padding mask (B, L) for cross-attention.

Six kinds behind one interface, picked by `TextEncoderConfig.kind`:
  "scratch"  - a transformer trained jointly with the U-Net (LDM txt2img, Rombach et al. 2022, Sec. 4.3),
               on open_clip's CLIP BPE tokenizer;
  "clip"     - a frozen transformers CLIPTextModel (SD 1.x uses openai/clip-vit-large-patch14);
  "openclip" - a frozen OpenCLIP text tower from a local checkpoint (SD 2.x uses ViT-H-14, penultimate layer);
  "sdxl"     - SDXL's two frozen CLIP encoders side by side, plus a pooled vector (ldm.models.text_sdxl);
  "sd3"      - SD3's two frozen CLIPs, then T5's tokens (optional), plus a pooled vector (ldm.models.text_sd3);
  "flux"     - FLUX.1's frozen T5 tokens, plus CLIP-L's pooled vector (ldm.models.text_flux).
Every encoder: `encoder(prompts) -> (context, mask)`, `.dim`, `.max_length`, `.tokenize(prompts)`.
Prompts longer than `max_length` tokens are truncated (end token kept) with one warning per encoder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ldm.models.clip_bpe import clip_bpe_for
from ldm.models.layers import Attention
from ldm.models.weights import load_state_dict_strict, load_weights, save_weights

KINDS = ("scratch", "clip", "openclip", "sdxl", "sd3", "flux")
LAYERS = ("last", "penultimate")


@dataclass
class TextEncoderConfig:
    kind: str = "scratch"             # "scratch" | "clip" | "openclip" | "sdxl" | "sd3" | "flux"
    path: str | None = None           # scratch: saved folder (None = random init); clip: folder or hub name;
                                      # openclip: checkpoint file (.safetensors / .pt / .bin)
    max_length: int = 77              # token limit incl. start/end tokens (openclip: the tower's own)
    width: int = 256                  # scratch: token width D
    depth: int = 4                    # scratch: transformer layers
    heads: int = 4                    # scratch: attention heads
    embed_std: float = 0.02           # scratch: init std of the token embeddings (positions: half).
                                      # 0.02 as CLIP; 1.0 keeps each word in its own token when the
                                      # encoder stays frozen at init (docs/stage2-latent.md)
    tokenizer: str = "ViT-B-32"       # scratch: open_clip tokenizer name (the CLIP BPE, ships offline)
    arch: str = "ViT-H-14"            # openclip: architecture name or "local-dir:DIR" with open_clip_config.json
    layer: str = "last"               # clip/openclip: "last" or "penultimate" (then the final LayerNorm)
    local_files_only: bool = True     # clip: never reach the hub
    mask_padding: bool = True         # clip/openclip: False = the U-Net's cross-attention sees the padding
                                      # tokens too, as Stable Diffusion's U-Nets were trained (its imports)
    zero_empty: bool = False          # sdxl: an empty prompt is all zeros (SDXL's dropped captions)
    t5_max_length: int = 256          # sd3: T5's tokens after CLIP's max_length (diffusers' max_sequence_length);
                                      # flux: T5's tokens, the whole context (FLUX.1-dev 512, schnell 256)
    joint_dim: int | None = None      # sd3 without T5: the context width (None: the folder's
                                      # transformer/config.json joint_attention_dim); with T5 (and flux): T5's width

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TextEncoderConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"TextEncoderConfig.layer must be one of {LAYERS}, got {self.layer!r}")
        if self.embed_std <= 0:
            raise ValueError(f"TextEncoderConfig.embed_std must be > 0, got {self.embed_std}")
        if self.kind == "openclip" and not self.path:
            raise ValueError("TextEncoderConfig.path: the openclip kind needs a local checkpoint file")
        if self.t5_max_length < 1:
            raise ValueError(f"TextEncoderConfig.t5_max_length must be >= 1, got {self.t5_max_length}")
        if self.kind == "scratch" and not self.mask_padding:
            raise ValueError("TextEncoderConfig.mask_padding: a scratch encoder always masks its padding")

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TextEncoderConfig: unknown keys {unknown}")
        return cls(**d)


class TextEncoder(nn.Module):
    """Shared interface: forward(prompts) -> (context (B, L, D), mask (B, L) bool, True = real token)."""

    dim: int
    max_length: int

    def __init__(self):
        super().__init__()
        self._warned = False

    def _warn_truncation(self, prompts, lengths) -> None:
        long = [p for p, n in zip(prompts, lengths) if n > self.max_length]
        if long and not self._warned:
            self._warned = True  # once per encoder, not once per training step
            warnings.warn(f"{type(self).__name__}: {len(long)} prompt(s) longer than {self.max_length} tokens "
                          f"are truncated, e.g. {long[0][:60]!r}... (further truncations are silent)", stacklevel=3)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, max_length) long, mask (B, max_length) bool)."""
        raise NotImplementedError

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("text encoder takes a list of prompts, got a single str")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"text encoder: prompts must be str, got {bad[0]!r}")
    return list(prompts)


class _BPETokenize:
    """CLIP BPE ids [start] + text + [end], zero-padded, with the true lengths for the mask. `words`: added
    words (textual inversion) -> their ids, matched in the prompt as written before the BPE sees the rest."""

    def __init__(self, tokenizer, max_length: int):
        self.tok, self.max_length = tokenizer, max_length
        self.words: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if not self.words:
            return self.tok.encode(text)
        pattern = "(" + "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True)) + ")"
        return [i for part in re.split(pattern, text) if part
                for i in (self.words[part] if part in self.words else self.tok.encode(part))]

    def __call__(self, encoder: TextEncoder, prompts):
        prompts = _check_prompts(prompts)
        ids = [[self.tok.sot_token_id] + self.encode(p) + [self.tok.eot_token_id] for p in prompts]
        encoder._warn_truncation(prompts, [len(x) for x in ids])
        out = torch.zeros(len(ids), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(ids), self.max_length, dtype=torch.bool)
        for i, x in enumerate(ids):
            if len(x) > self.max_length:
                x = x[: self.max_length - 1] + [self.tok.eot_token_id]
            out[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = True
        return out, mask


def _simple_tokenizer(tokenizer, source: str):
    from open_clip.tokenizer import SimpleTokenizer
    if not isinstance(tokenizer, SimpleTokenizer):
        raise ValueError(f"{source}: only open_clip's CLIP BPE tokenizer is supported, got {type(tokenizer).__name__}")
    return tokenizer


# ---- (a) trained from scratch ------------------------------------------------------------------

class _EncoderLayer(nn.Module):
    """Pre-LN bidirectional transformer layer; padding is excluded from the keys."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, None, heads, width // heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ScratchTextEncoder(TextEncoder):
    """Token + learned position embeddings, `depth` transformer layers, final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"TextEncoderConfig: width {cfg.width} not divisible by heads {cfg.heads}")
        self.cfg, self.dim, self.max_length = cfg, cfg.width, cfg.max_length
        tok = clip_bpe_for(cfg.tokenizer)      # the plain CLIP BPE without importing open_clip (~2.5 s)
        if tok is None:
            import open_clip
            tok = _simple_tokenizer(open_clip.get_tokenizer(cfg.tokenizer), f"tokenizer {cfg.tokenizer!r}")
        self._tokenize = _BPETokenize(tok, cfg.max_length)
        self.token_embedding = nn.Embedding(tok.vocab_size, cfg.width)
        # At std 0.02 (CLIP's) the first layer's output, O(1) after its LayerNorm, swamps the
        # embedding: at random init every token carries about the same bag-of-words mixture and
        # loses its own word and place. Unit scale keeps them; the layers add context on top.
        self.pos_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * (cfg.embed_std / 2))
        nn.init.normal_(self.token_embedding.weight, std=cfg.embed_std)
        self.layers = nn.ModuleList(_EncoderLayer(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    def tokenize(self, prompts):
        return self._tokenize(self, prompts)

    def token_ids(self, text: str) -> list[int]:
        """The ids of `text` without the start and end tokens, untruncated."""
        return self._tokenize.encode(text)

    @property
    def added_words(self) -> list[str]:
        """The textual-inversion words `add_embedding` added."""
        return list(self._tokenize.words)

    def add_embedding(self, word: str, vectors: torch.Tensor) -> list[int]:
        """A textual-inversion word (ldm.models.embeddings): k new rows of the token table holding `vectors`
        (k, D), which a prompt's `word` (as written, before lower-casing) becomes. Returns their ids."""
        table = self.token_embedding.weight
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"the embedding's vectors are {vectors.shape[-1]} wide, this encoder's tokens "
                             f"{self.dim}: made for another model")
        if not word.strip() or word != word.strip() or word in self._tokenize.words:
            raise ValueError(f"{word!r} is empty, padded or a word of this encoder already: pick another word")
        ids = list(range(len(table), len(table) + len(vectors)))
        with torch.no_grad():
            grown = torch.cat([table, vectors.to(table)])
        self.token_embedding.weight = nn.Parameter(grown, requires_grad=table.requires_grad)
        self.token_embedding.num_embeddings = len(grown)
        self._tokenize.words[word] = ids
        return ids

    def forward(self, prompts):
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.pos_embedding.device), mask.to(self.pos_embedding.device)
        x = self.token_embedding(ids) + self.pos_embedding  # (B, L, D)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x), mask

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors (weights cast to `dtype` if given)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(self.cfg), "path": None}, f, indent=2)
        save_weights(self, os.path.join(directory, "model.safetensors"), dtype)

    @classmethod
    def from_pretrained(cls, directory: str) -> "ScratchTextEncoder":
        for name in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"ScratchTextEncoder.from_pretrained: missing {os.path.join(directory, name)}")
        with open(os.path.join(directory, "config.json")) as f:
            cfg = TextEncoderConfig.from_dict(json.load(f))
        model = cls(cfg)
        load_weights(model, os.path.join(directory, "model.safetensors"), directory)
        return model


# ---- frozen encoders ---------------------------------------------------------------------------

class _Frozen(TextEncoder):
    """No gradients, always in eval mode (dropout off) whatever the parent module does."""

    def _freeze(self):
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def _context_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The tokenizer's mask, or all True where the U-Net was trained on all max_length tokens."""
        return mask if self.cfg.mask_padding else torch.ones_like(mask)


def check_word(tokenizer, model, word: str, vectors: torch.Tensor) -> None:
    """ValueError unless `vectors` (k, D) fit the CLIP model's token width and `word`'s tokens are new."""
    from ldm.models.embeddings import word_tokens
    width = model.get_input_embeddings().weight.shape[1]
    if vectors.shape[-1] != width:
        raise ValueError(f"the embedding's vectors are {vectors.shape[-1]} wide, this CLIP's tokens {width} "
                         "(SD 1.x: 768, SD 2.x: 1024, SDXL: 768 and 1280): made for another model")
    taken = [t for t in word_tokens(word, len(vectors)) if t in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"{taken[0]!r} is already a token of this tokenizer: pick another word (FILE:WORD)")


def add_word(tokenizer, model, word: str, vectors: torch.Tensor) -> list[str]:
    """`word` as k new tokens of a transformers CLIP tokenizer and model, `vectors` their input embeddings."""
    from ldm.models.embeddings import word_tokens
    tokens = word_tokens(word, len(vectors))
    tokenizer.add_tokens(tokens)
    model.resize_token_embeddings(len(tokenizer))
    table = model.get_input_embeddings()
    with torch.no_grad():
        table.weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors.to(table.weight)
    return tokens


def expand_words(tokenizer, words: dict[str, str], prompt: str) -> str:
    """Each multi-vector word (`words`: word -> its tokens, space-separated) written out as its k tokens
    (diffusers' maybe_convert_prompt)."""
    if not any(" " in t for t in words.values()):
        return prompt
    present = set(tokenizer.tokenize(prompt))
    for word, tokens in words.items():
        if word in present:
            prompt = prompt.replace(word, tokens)
    return prompt


def clip_name(name: str, model: nn.Module) -> str:
    """A CLIPTextModel weight or module name as files write it ("text_model.encoder...", transformers 4's
    nesting, in which every SD checkpoint and LoRA file was written) or as transformers 5 names it
    ("encoder..."), put in the form of `model`, the installed transformers' own."""
    nested = hasattr(model, "text_model")
    if not nested and name.startswith("text_model."):
        return name[len("text_model."):]
    if nested and name.split(".", 1)[0] not in dict(model.named_children()):
        return "text_model." + name
    return name


class ClipTextEncoder(_Frozen):
    """transformers CLIPTokenizer + CLIPTextModel; a SD pipeline folder (tokenizer/, text_encoder/) works too."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer
        if not cfg.path:
            raise ValueError("TextEncoderConfig.path: the clip kind needs a folder or hub name")
        tok_dir = enc_dir = cfg.path
        if os.path.isdir(os.path.join(cfg.path, "text_encoder")):
            tok_dir, enc_dir = os.path.join(cfg.path, "tokenizer"), os.path.join(cfg.path, "text_encoder")
        self.cfg = cfg
        self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=cfg.local_files_only)
        # fp32 whatever the file holds (transformers 5 keeps a file's dtype): an fp16 import runs as the U-Net does
        self.model = CLIPTextModel.from_pretrained(enc_dir, local_files_only=cfg.local_files_only, dtype=torch.float32)
        self.dim = self.model.config.hidden_size
        self.max_length = min(cfg.max_length, self.tokenizer.model_max_length,
                              self.model.config.max_position_embeddings)
        self._words: dict[str, str] = {}          # textual-inversion word -> its tokens, space-separated
        self.clip_skip: int | None = None         # set: the layer counted from the end (A1111's "clip skip")
        self._freeze()

    @property
    def added_words(self) -> list[str]:
        """The textual-inversion words `add_embedding` added."""
        return list(self._words)

    def add_embedding(self, word: str, vectors: torch.Tensor) -> list[str]:
        """A textual-inversion word (ldm.models.embeddings): k new tokens with `vectors` (k, D) as their
        input embeddings; a prompt's `word` then becomes all k. Returns the tokens."""
        check_word(self.tokenizer, self.model, word, vectors)
        tokens = add_word(self.tokenizer, self.model, word, vectors)
        self._words[word] = " ".join(tokens)
        return tokens

    def _expand_words(self, prompt: str) -> str:
        return expand_words(self.tokenizer, self._words, prompt)

    def tokenize(self, prompts):
        prompts = [self._expand_words(p) for p in _check_prompts(prompts)]
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        self._warn_truncation(prompts, [len(x) for x in full])
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    def token_ids(self, text: str) -> list[int]:
        """The ids of `text` without the start and end tokens, untruncated (embedding words written out)."""
        return self.tokenizer(self._expand_words(text), add_special_tokens=False, verbose=False)["input_ids"]

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, start/end/padding included -> (B, L, D) from the configured layer, or from
        the `clip_skip`-th layer from the end when set (1 = the last, 2 = the penultimate, ...). The
        weights are frozen, so no graph is built, except through a textual-inversion word being trained
        (stages/train_embedding.py), whose vectors enter through a hook on the token embedding."""
        skip = self.clip_skip or (2 if self.cfg.layer == "penultimate" else 1)
        # No attention mask into CLIP, as in SD: it is causal, so padding never reaches real tokens.
        out = self.model(input_ids=ids.to(self.model.device), output_hidden_states=skip > 1)
        if skip > 1:   # an inner layer goes through the final LayerNorm too, as SD 2.x and A1111's clip skip do
            return getattr(self.model, "text_model", self.model).final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state

    def forward(self, prompts):
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids), self._context_mask(mask.to(self.model.device))


def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text encoder checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


class OpenClipTextEncoder(_Frozen):
    """The text tower of an open_clip model (CLIP or CustomTextCLIP) loaded from a local checkpoint."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        import open_clip
        self.cfg = cfg
        model = open_clip.create_model(cfg.arch, pretrained=None, load_weights=False)
        model.visual = None  # the image tower is never used: drop its weights before loading
        state = {k: v for k, v in _read_state_dict(cfg.path).items() if not k.startswith("visual.")}
        load_state_dict_strict(model, state, cfg.path)
        self.tower = getattr(model, "text", model)  # CustomTextCLIP keeps the tower in .text
        if getattr(self.tower, "cls_emb", None) is not None:
            raise ValueError(f"openclip arch {cfg.arch!r}: text towers with a class token are not supported")
        tok = _simple_tokenizer(open_clip.get_tokenizer(cfg.arch), f"openclip arch {cfg.arch!r}")
        self.max_length = self.tower.positional_embedding.shape[0]
        self.dim = self.tower.positional_embedding.shape[1]
        self._tokenize = _BPETokenize(tok, self.max_length)
        self._freeze()

    def tokenize(self, prompts):
        return self._tokenize(self, prompts)

    @torch.no_grad()
    def forward(self, prompts):
        ids, mask = self.tokenize(prompts)
        tower = self.tower
        device = tower.positional_embedding.device
        ids, mask = ids.to(device), mask.to(device)
        x = tower.token_embedding(ids) + tower.positional_embedding  # (B, L, D)
        blocks = tower.transformer.resblocks
        if self.cfg.layer == "penultimate":
            blocks = blocks[:-1]
        batch_first = getattr(tower.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=tower.attn_mask)  # causal, like open_clip's own encode_text
        x = x if batch_first else x.transpose(0, 1)
        return tower.ln_final(x), self._context_mask(mask)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The encoder `cfg.kind` names; a scratch encoder loads from `cfg.path` when given."""
    if cfg.kind == "scratch":
        return ScratchTextEncoder.from_pretrained(cfg.path) if cfg.path else ScratchTextEncoder(cfg)
    if cfg.kind == "clip":
        return ClipTextEncoder(cfg)
    if cfg.kind == "sdxl":
        from ldm.models.text_sdxl import SdxlTextEncoder
        return SdxlTextEncoder(cfg)
    if cfg.kind == "sd3":
        from ldm.models.text_sd3 import Sd3TextEncoder
        return Sd3TextEncoder(cfg)
    if cfg.kind == "flux":
        from ldm.models.text_flux import FluxTextEncoder
        return FluxTextEncoder(cfg)
    return OpenClipTextEncoder(cfg)
