"""Stable Diffusion 3's text conditioning (Esser et al. 2024, fig. 2): two frozen CLIPs and, optionally, T5.

    clip    = [CLIP ViT-L/14, layer -2 (768) ; OpenCLIP bigG/14, layer -2 (1280)], zero-padded to 4096  (B, 77, 4096)
    t5      = T5-XXL's last layer (4096), or zeros where the folder has no T5                        (B, 256, 4096)
    context = [clip ; t5] along the sequence                                                          (B, 333, 4096)
    pooled  = [ViT-L's projected pooled output (768) ; bigG's (1280)]                                 (B, 2048)

as diffusers' StableDiffusion3Pipeline.encode_prompt computes prompt_embeds and pooled_prompt_embeds. The
MMDiT attends to every token, padding included, so the mask is all True. `clip_skip` N takes layer -N of
both CLIPs (default 2; diffusers' clip_skip k is N = k + 2). Without T5 its tokens are zeros (SD3 runs so,
at a small cost in prompt following); their width is `TextEncoderConfig.joint_dim`, or else the folder's
transformer/config.json joint_attention_dim. T5 reads `TextEncoderConfig.t5_max_length` tokens (256).
`encode_pooled(..., weighted=True)` reads "(word:1.3)" emphasis as ComfyUI applies it to SD3 (both CLIPs' and
T5's tokens moved from the empty prompt's, the pooled vectors the plain text's: ldm.models.prompt_weights).

A model folder holds the parts as a diffusers SD3 pipeline names them under `TextEncoderConfig.path`:
text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ (CLIPTextModelWithProjection, CLIPTokenizer), and
optionally text_encoder_3/, tokenizer_3/ (T5EncoderModel, a T5 tokenizer).
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn.functional as F

from ldm.models.prompt_weights import parse_weighted, plain_text, weigh_from_empty
from ldm.models.text import TextEncoderConfig, _check_prompts, _Frozen

PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")          # optional, but both or neither


class Sd3TextEncoder(_Frozen):
    """transformers' CLIPTextModelWithProjection x 2 + T5EncoderModel (or None) with their tokenizers; frozen."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
        if not cfg.path or not os.path.isdir(cfg.path):
            raise ValueError(f"TextEncoderConfig.path: the sd3 kind needs a folder with {PARTS}, got {cfg.path!r}")
        present = {p for p in PARTS + T5_PARTS if os.path.isdir(os.path.join(cfg.path, p))}
        missing = [p for p in PARTS if p not in present]
        missing += [p for p in T5_PARTS if p not in present and set(T5_PARTS) & present]
        if missing:
            raise FileNotFoundError(f"{cfg.path}: SD3's text encoders lack {missing}")
        self.cfg = cfg
        part = lambda name: os.path.join(cfg.path, name)
        load = {"local_files_only": cfg.local_files_only}
        weights = {**load, "dtype": torch.float32}                 # whatever the files hold (fp16 variants)
        self.clip_l = CLIPTextModelWithProjection.from_pretrained(part("text_encoder"), **weights)
        self.clip_g = CLIPTextModelWithProjection.from_pretrained(part("text_encoder_2"), **weights)
        self.tokenizer_l = CLIPTokenizer.from_pretrained(part("tokenizer"), **load)      # pads with the end token
        self.tokenizer_g = CLIPTokenizer.from_pretrained(part("tokenizer_2"), **load)    # pads with "!" (id 0)
        has_t5 = "text_encoder_3" in present
        self.t5 = T5EncoderModel.from_pretrained(part("text_encoder_3"), **weights) if has_t5 else None
        self.tokenizer_t5 = AutoTokenizer.from_pretrained(part("tokenizer_3"), **load) if has_t5 else None
        self.max_length = min(cfg.max_length, self.tokenizer_l.model_max_length,
                              self.clip_l.config.max_position_embeddings)   # CLIP's tokens: 77
        self.t5_max_length = cfg.t5_max_length
        self.dim = self._joint_dim(cfg)
        clip_width = self.clip_l.config.hidden_size + self.clip_g.config.hidden_size
        if clip_width > self.dim:
            raise ValueError(f"{cfg.path}: the CLIPs' tokens are {clip_width} wide, wider than the context "
                             f"({self.dim})")
        self.pooled_dim = self.clip_l.config.projection_dim + self.clip_g.config.projection_dim
        self.clip_skip: int | None = None         # the layer counted from the end; None: 2, the penultimate
        self._warned_parts: set[str] = set()
        self._freeze()

    def _joint_dim(self, cfg: TextEncoderConfig) -> int:
        """The context width: T5's, else cfg.joint_dim, else the transformer's joint_attention_dim."""
        if self.t5 is not None:
            if cfg.joint_dim not in (None, self.t5.config.d_model):
                raise ValueError(f"TextEncoderConfig.joint_dim {cfg.joint_dim}: this T5's tokens are "
                                 f"{self.t5.config.d_model} wide")
            return self.t5.config.d_model
        if cfg.joint_dim is not None:
            return cfg.joint_dim
        transformer = os.path.join(cfg.path, "transformer", "config.json")
        if not os.path.isfile(transformer):
            raise ValueError(f"{cfg.path}: without T5 (text_encoder_3/) the context width comes from "
                             "TextEncoderConfig.joint_dim or transformer/config.json, and neither is there")
        with open(transformer) as f:
            return json.load(f)["joint_attention_dim"]

    def _ids(self, tokenizer, prompts, limit: int, warn: bool, part: str) -> torch.Tensor:
        """(B, limit) ids: the tokenizer's own special tokens and padding; long prompts cut (warned once a part)."""
        if warn and part not in self._warned_parts:
            long = [p for p, ids in zip(prompts, tokenizer(prompts, verbose=False)["input_ids"]) if len(ids) > limit]
            if long:
                self._warned_parts.add(part)
                warnings.warn(f"{type(self).__name__}: {len(long)} prompt(s) longer than {limit} {part} tokens are "
                              f"truncated, e.g. {long[0][:60]!r}... (further truncations are silent)", stacklevel=3)
        return tokenizer(prompts, padding="max_length", max_length=limit, truncation=True,
                         return_tensors="pt").input_ids

    def tokenize(self, prompts):
        """CLIP ViT-L's (ids, mask) (B, max_length) (bigG's differ in the padding id; T5 has its own)."""
        enc = self.tokenizer_l(_check_prompts(prompts), padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask.bool()

    @torch.no_grad()
    def encode_pooled(self, prompts, warn: bool = True,
                      weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context (B, max_length + t5_max_length, dim), mask (B, L) all True, pooled (B, pooled_dim)).
        warn: say (once for CLIP, once for T5) that long prompts are cut. weighted: read "(word:1.3)" emphasis
        as ComfyUI does (prompt_weights.weigh_from_empty) on both CLIPs' tokens and T5's; the pooled vectors
        are the plain text's."""
        pieces = [parse_weighted(p) if weighted else [(p, 1.0)] for p in _check_prompts(prompts)]
        prompts = [plain_text(p) for p in pieces]
        device = self.clip_l.device
        layer = -(self.clip_skip or 2)
        states, pooled = [], []
        for model, tokenizer in ((self.clip_l, self.tokenizer_l), (self.clip_g, self.tokenizer_g)):
            ids = self._ids(tokenizer, prompts, self.max_length, warn and model is self.clip_l, "CLIP")
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            hidden = lambda ids, model=model: model(input_ids=ids.to(device), output_hidden_states=True
                                                    ).hidden_states[layer]
            states.append(weigh_from_empty(out.hidden_states[layer], pieces, tokenizer, hidden))   # (B, 77, D_L|G)
            pooled.append(out.text_embeds)                          # (B, P_L) and (B, P_G)
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, self.dim - clip.shape[-1]))          # zeros up to T5's width
        if self.t5 is None:
            t5 = clip.new_zeros(len(prompts), self.t5_max_length, self.dim)
        else:
            ids = self._ids(self.tokenizer_t5, prompts, self.t5_max_length, warn, "T5")
            hidden = lambda ids: self.t5(input_ids=ids.to(self.t5.device)).last_hidden_state   # no mask, as SD3's
            t5 = weigh_from_empty(hidden(ids), pieces, self.tokenizer_t5, hidden).to(clip)
        context = torch.cat([clip, t5], dim=1)                      # (B, 77 + t5_max_length, dim)
        return context, torch.ones(context.shape[:2], dtype=torch.bool, device=device), torch.cat(pooled, dim=-1)

    def forward(self, prompts):
        context, mask, _ = self.encode_pooled(prompts)
        return context, mask
