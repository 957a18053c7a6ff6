"""SDXL's text conditioning (Podell et al. 2023, sec. 2.1): two frozen CLIP text encoders side by side.

    context = [CLIP ViT-L/14, layer -2 (768) ; OpenCLIP ViT-bigG/14, layer -2 (1280)]    (B, 77, 2048)
    pooled  = bigG's projected pooled output (its end token after the final LayerNorm)   (B, 1280)

Both token streams are the penultimate layer's output as it is, without the final LayerNorm that SD 2.x
applies; `clip_skip` N takes layer -N instead (default 2). The two tokenizers share CLIP's vocabulary but
pad differently (the end token; "!", id 0), each as its encoder was trained. The pooled vector enters the
U-Net beside the size numbers (UNet._added). An empty prompt is all zeros, tokens and pooled, when
`TextEncoderConfig.zero_empty` is set: SDXL dropped captions by zeroing their embeddings, and its pipeline
draws the unconditional half so (diffusers' `force_zeros_for_empty_prompt`).

A model folder holds the four parts as a diffusers SDXL pipeline names them: text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/ under `TextEncoderConfig.path`. SDXL's refiner has bigG alone (no
text_encoder/, tokenizer/): its context is bigG's 1280 wide.
"""
from __future__ import annotations

import os

import torch

from ldm.models.text import TextEncoderConfig, _check_prompts, _Frozen, add_word, check_word, expand_words

PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
REQUIRED = PARTS[2:]                # the refiner has no CLIP ViT-L


class SdxlTextEncoder(_Frozen):
    """transformers' CLIPTextModel (None for the refiner) + CLIPTextModelWithProjection with their tokenizers;
    frozen."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        if not cfg.path or not os.path.isdir(cfg.path):
            raise ValueError(f"TextEncoderConfig.path: the sdxl kind needs a folder with {PARTS}, got {cfg.path!r}")
        present = {p for p in PARTS if os.path.isdir(os.path.join(cfg.path, p))}
        missing = [p for p in PARTS if p not in present and (p in REQUIRED or {"text_encoder", "tokenizer"} & present)]
        if missing:
            raise FileNotFoundError(f"{cfg.path}: SDXL's text encoders lack {missing}")
        self.cfg = cfg
        load = {"local_files_only": cfg.local_files_only}
        weights = {**load, "dtype": torch.float32}           # whatever the files hold (fp16 variants)
        first = "text_encoder" in present
        self.model = CLIPTextModel.from_pretrained(os.path.join(cfg.path, "text_encoder"), **weights) if first else None
        self.model_2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(cfg.path, "text_encoder_2"), **weights)
        self.pairs = [(model, CLIPTokenizer.from_pretrained(os.path.join(cfg.path, f"tokenizer{suffix}"), **load))
                      for model, suffix in ((self.model, ""), (self.model_2, "_2")) if model is not None]
        self.dim = sum(m.config.hidden_size for m, _ in self.pairs)
        self.pooled_dim = self.model_2.config.projection_dim
        self.max_length = min(cfg.max_length, *(t.model_max_length for t in self.tokenizers),
                              self.model_2.config.max_position_embeddings)
        self.clip_skip: int | None = None         # the layer counted from the end; None: 2, the penultimate
        self._words: dict[str, str] = {}          # textual-inversion word -> its tokens, space-separated
        self._freeze()

    @property
    def tokenizers(self) -> list:
        """The tokenizers of `pairs`, in order (the first lays out the rows of prompt_chunks)."""
        return [tokenizer for _, tokenizer in self.pairs]

    def tokenize(self, prompts):
        """The first tokenizer's ids and mask (the second's differ only in the padding id)."""
        return self._ids(self.tokenizers[0], _check_prompts(prompts), warn=True)

    # What ldm.models.prompt_chunks and prompt_weights need (long prompts in 77-token chunks, emphasis):
    # rows are laid out by the first tokenizer, and bigG's copy of each row pads with its own id.
    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def token_ids(self, text: str) -> list[int]:
        """The ids of `text` without the start and end tokens, untruncated (the same in both tokenizers:
        one vocabulary, the same words added to both)."""
        tokenizer = self.tokenizers[0]
        return tokenizer(expand_words(tokenizer, self._words, text), add_special_tokens=False, verbose=False)["input_ids"]

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) rows in the first tokenizer's layout (start, text, end, padding) -> (N, L, D1 + D2)."""
        ids = ids.to(self.model_2.device)
        end = (ids == self.tokenizers[0].eos_token_id).int()
        padding = (end.cumsum(1) - end) > 0                 # every position after the row's first end token
        layer = -(self.clip_skip or 2)
        return torch.cat([model(input_ids=ids.masked_fill(padding, tokenizer.pad_token_id),
                                output_hidden_states=True).hidden_states[layer] for model, tokenizer in self.pairs],
                         dim=-1)

    def zero_empty_rows(self, prompts, *tensors):
        """`tensors` (B, ...) with the rows of empty prompts zeroed when `zero_empty` (one tensor: itself)."""
        if self.cfg.zero_empty:
            keep = torch.tensor([p != "" for p in prompts], device=tensors[0].device)
            tensors = tuple(t * keep.reshape(-1, *[1] * (t.ndim - 1)) for t in tensors)
        return tensors if len(tensors) > 1 else tensors[0]

    @property
    def added_words(self) -> list[str]:
        """The textual-inversion words `add_embedding` added."""
        return list(self._words)

    def add_embedding(self, word: str, vectors_l: torch.Tensor, vectors_g: torch.Tensor) -> list[str]:
        """An SDXL textual-inversion word: k new tokens in both tokenizers, `vectors_l` (k, 768) their input
        embeddings in CLIP ViT-L, `vectors_g` (k, 1280) in bigG (the file's clip_l and clip_g; the refiner
        takes clip_g alone)."""
        if len(vectors_l) != len(vectors_g):
            raise ValueError(f"the embedding has {len(vectors_l)} clip_l and {len(vectors_g)} clip_g vectors")
        pairs = [(t, m, v) for (m, t), v in zip(self.pairs, [vectors_l, vectors_g][-len(self.pairs):])]
        for tokenizer, model, vectors in pairs:             # every check first: all or nothing
            check_word(tokenizer, model, word, vectors)
        tokens = [add_word(tokenizer, model, word, vectors) for tokenizer, model, vectors in pairs][0]
        self._words[word] = " ".join(tokens)
        return tokens

    def _ids(self, tokenizer, prompts, warn=False):
        prompts = [expand_words(tokenizer, self._words, p) for p in prompts]
        if warn:
            self._warn_truncation(prompts, [len(x) for x in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]])
        enc = tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    @torch.no_grad()
    def encode_pooled(self, prompts, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context (B, L, D1 + D2), mask (B, L), all True: SDXL's U-Net sees the padding, pooled (B, P)).
        warn: say (once) that long prompts are cut to max_length (not when their tokens go in chunks)."""
        prompts = _check_prompts(prompts)
        layer = -(self.clip_skip or 2)
        states, pooled = [], None
        for model, tokenizer in self.pairs:
            ids, _ = self._ids(tokenizer, prompts, warn=warn and tokenizer is self.tokenizers[0])
            out = model(input_ids=ids.to(model.device), output_hidden_states=True)
            states.append(out.hidden_states[layer])
            pooled = getattr(out, "text_embeds", None)
        context, pooled = self.zero_empty_rows(prompts, torch.cat(states, dim=-1), pooled)
        return context, torch.ones(context.shape[:2], dtype=torch.bool, device=context.device), pooled

    def forward(self, prompts):
        context, mask, _ = self.encode_pooled(prompts)
        return context, mask
