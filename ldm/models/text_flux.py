"""FLUX.1's text conditioning (Black Forest Labs 2024): T5's tokens as the context, CLIP-L's pooled vector.

    context = T5-XXL's last layer, t5_max_length tokens, no attention mask into T5  (B, t5_max_length, 4096)
    pooled  = CLIP ViT-L/14's pooler_output (final LayerNorm at the end token, NOT projected)       (B, 768)

as diffusers' FluxPipeline.encode_prompt computes prompt_embeds and pooled_prompt_embeds. The transformer
attends to every T5 token, padding included, so the mask is all True. T5 reads `TextEncoderConfig.t5_max_length`
tokens: the imports write 512 for both families, FluxPipeline's default max_sequence_length (BFL's own code reads
256 for schnell: a folder's text_encoder/config.json may say so; the config's default is SD3's 256).
CLIP's hidden states never reach the transformer, so `clip_skip` does not apply: it stays None and setting
it is refused (a silently ignored --clip-skip would look like it worked).
`encode_pooled(..., weighted=True)` reads "(word:1.3)" emphasis as ComfyUI applies it to FLUX.1 (T5's tokens
moved from the empty prompt's; CLIP's pooled vector the plain text's: ldm.models.prompt_weights).

A model folder holds the parts as diffusers' Flux pipeline names them under `TextEncoderConfig.path` (the
numbering differs from SD3's): text_encoder/, tokenizer/ (CLIPTextModel, CLIPTokenizer) and text_encoder_2/,
tokenizer_2/ (T5EncoderModel, a T5 tokenizer); all four are required.
"""
from __future__ import annotations

import os

import torch

from ldm.models.prompt_weights import parse_weighted, plain_text, weigh_from_empty
from ldm.models.text import TextEncoderConfig, _check_prompts, _Frozen
from ldm.models.text_sd3 import Sd3TextEncoder

PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class FluxTextEncoder(_Frozen):
    """transformers' CLIPTextModel (pooled only) + T5EncoderModel with their tokenizers; frozen."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel
        if not cfg.path or not os.path.isdir(cfg.path):
            raise ValueError(f"TextEncoderConfig.path: the flux kind needs a folder with {PARTS}, got {cfg.path!r}")
        missing = [p for p in PARTS if not os.path.isdir(os.path.join(cfg.path, p))]
        if missing:
            raise FileNotFoundError(f"{cfg.path}: FLUX.1's text encoders lack {missing}")
        self.cfg = cfg
        part = lambda name: os.path.join(cfg.path, name)
        load = {"local_files_only": cfg.local_files_only}
        weights = {**load, "dtype": torch.float32}                 # whatever the files hold (bf16 releases)
        self.clip_l = CLIPTextModel.from_pretrained(part("text_encoder"), **weights)
        self.t5 = T5EncoderModel.from_pretrained(part("text_encoder_2"), **weights)
        self.tokenizer_l = CLIPTokenizer.from_pretrained(part("tokenizer"), **load)
        self.tokenizer_t5 = AutoTokenizer.from_pretrained(part("tokenizer_2"), **load)
        self.max_length = min(cfg.max_length, self.tokenizer_l.model_max_length,
                              self.clip_l.config.max_position_embeddings)   # CLIP's tokens: 77
        self.t5_max_length = cfg.t5_max_length
        self.dim = self.t5.config.d_model
        if cfg.joint_dim not in (None, self.dim):
            raise ValueError(f"TextEncoderConfig.joint_dim {cfg.joint_dim}: this T5's tokens are {self.dim} wide")
        self.pooled_dim = self.clip_l.config.hidden_size
        self._warned_parts: set[str] = set()
        self._freeze()

    @property
    def clip_skip(self) -> None:
        return None

    @clip_skip.setter
    def clip_skip(self, value) -> None:
        if value is not None:
            raise ValueError(f"clip_skip {value}: FLUX.1 takes only CLIP's pooled output of its last layer, "
                             "so no CLIP layer can be skipped")

    _ids = Sd3TextEncoder._ids            # the tokenizer's ids, cut to a limit, warned once per part
    tokenize = Sd3TextEncoder.tokenize    # CLIP-L's (ids, mask) (B, max_length); T5 has its own

    @torch.no_grad()
    def encode_pooled(self, prompts, warn: bool = True,
                      weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context (B, t5_max_length, dim), mask (B, t5_max_length) all True, pooled (B, pooled_dim)).
        warn: say (once for CLIP, once for T5) that long prompts are cut. weighted: read "(word:1.3)" emphasis
        as ComfyUI does (prompt_weights.weigh_from_empty) on T5's tokens; the pooled vector is the plain text's."""
        pieces = [parse_weighted(p) if weighted else [(p, 1.0)] for p in _check_prompts(prompts)]
        prompts = [plain_text(p) for p in pieces]
        device = self.t5.device
        ids = self._ids(self.tokenizer_l, prompts, self.max_length, warn, "CLIP")
        pooled = self.clip_l(input_ids=ids.to(self.clip_l.device)).pooler_output.to(device)   # (B, 768)
        ids = self._ids(self.tokenizer_t5, prompts, self.t5_max_length, warn, "T5")
        hidden = lambda ids: self.t5(input_ids=ids.to(device)).last_hidden_state   # (B, N, 4096); no mask, as Flux's
        context = weigh_from_empty(hidden(ids), pieces, self.tokenizer_t5, hidden)
        return context, torch.ones(context.shape[:2], dtype=torch.bool, device=device), pooled

    def forward(self, prompts):
        context, mask, _ = self.encode_pooled(prompts)
        return context, mask
