"""Prompts longer than CLIP's 77 positions, in chunks, as the AUTOMATIC1111 web UI encodes them.

A CLIP text encoder sees 77 tokens: start, 75 of the prompt, end. A longer prompt is cut into
chunks of 75 tokens; each chunk gets its own start and end token and padding and goes through the
encoder alone, and the U-Net cross-attends to all chunks side by side (context length 77 k). Prompts
that are encoded together (the batch, and CFG's negative prompt) get the same number of chunks:
the shorter ones are filled with empty-prompt chunks (start, end, padding). A prompt of at most 75
tokens is one chunk and gives exactly the encoder's own output, so short prompts lose nothing; what
a 100-token prompt gains is its last 25 tokens, which the plain encoder drops.

With emphasis on (ldm.models.prompt_weights) each weighted piece is tokenized on its own and the
weights follow its tokens into whichever chunk they land in, as the web UI does. (It also moves a
chunk boundary back to a comma within the last 20 tokens; we cut at 75 exactly.)
"""
from __future__ import annotations

import math

import torch

from ldm.models.prompt_weights import apply_weights, parse_weighted


def _ids_and_weights(encoder, prompt: str, weighted: bool) -> tuple[list[int], list[float]]:
    pieces = parse_weighted(prompt) if weighted else [(prompt, 1.0)]
    ids, weights = [], []
    for text, weight in pieces:
        piece = encoder.token_ids(text)
        ids += piece
        weights += [weight] * len(piece)
    return ids, weights


def chunk_count(encoder, prompts: list[str], weighted: bool = False) -> int:
    """The chunks the longest of `prompts` needs (at least 1)."""
    size = encoder.max_length - 2
    return max([1] + [math.ceil(len(_ids_and_weights(encoder, p, weighted)[0]) / size) for p in prompts])


def encode_chunked(encoder, prompts: list[str], *, chunks: int = 1,
                   weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 n, D), mask (B, 77 n)) with n = max(chunks, what the longest prompt needs).

    `encoder` is a ClipTextEncoder (token_ids, encode_ids, max_length and its tokenizer's special ids)."""
    size, tok = encoder.max_length - 2, encoder.tokenizer
    parsed = [_ids_and_weights(encoder, p, weighted) for p in prompts]
    n = max(chunks, max([1] + [math.ceil(len(ids) / size) for ids, _ in parsed]))
    rows, masks, row_weights = [], [], []
    for ids, weights in parsed:
        for j in range(n):
            part, w = ids[j * size:(j + 1) * size], weights[j * size:(j + 1) * size]
            pad = size - len(part)
            rows.append([tok.bos_token_id, *part, tok.eos_token_id] + [tok.pad_token_id] * pad)
            masks.append([True] * (len(part) + 2) + [False] * pad)
            row_weights.append([1.0, *w, 1.0] + [1.0] * pad)
    context = encoder.encode_ids(torch.tensor(rows))                      # (B n, 77, D): each chunk alone
    B, L = len(prompts), n * encoder.max_length
    context = context.reshape(B, L, context.shape[-1])
    mask = encoder._context_mask(torch.tensor(masks).reshape(B, L).to(context.device))
    weights = torch.tensor(row_weights).reshape(B, L)
    if bool((weights != 1).any()):
        context = apply_weights(context, weights)
    return context, mask
