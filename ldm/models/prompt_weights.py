"""Prompt emphasis in the syntax Stable Diffusion users write: `(word:1.3)`, `(word)`, `[word]`.

    "a (red:1.5) circle"        'red' weighted 1.5
    "a ((red)) circle"          'red' weighted 1.1^2 = 1.21; "[red]" divides by 1.1
    "a (red (circle:2)) now"    groups nest: 'red' 1.1, 'circle' 2.2
    r"a \\(literal\\) bracket"  backslash escapes ( ) [ ] and itself

The AUTOMATIC1111 web UI's convention, the one prompts shared for SD are written in. The weight of a
token multiplies its output embedding from the text encoder; each prompt's embedding is then scaled
back to its unweighted root-mean-square, so emphasis moves the tokens against each other, not the
prompt's overall size. (The web UI scales back to the unweighted mean instead; a text encoder ending
in a LayerNorm has a mean near 0, 3e-4 for the shipped model's, and that ratio is then noise.) Weights act on whole words: a group that ends inside a word ("(red)dish") is refused,
as the tokenizer would merge it with its neighbour.

SD3's and FLUX.1's encoders (two CLIPs and T5, ldm.models.text_sd3 / text_flux) are weighted as ComfyUI
weights them instead (`weigh_from_empty`), the convention prompts for those models are written in: each
token's output embedding is moved from the empty prompt's at the same position, z_i <- e_i + w_i (z_i - e_i).
The syntax read stays the web UI's: ComfyUI's own parser takes "[word]" as text and lets an inner
"(word:1.5)" replace the outer groups' weight where the web UI multiplies ("((word:1.5))": 1.5 there, 1.65 here).
"""
from __future__ import annotations

import re

import torch

EMPHASIS = 1.1                                    # "(x)" multiplies by it, "[x]" divides by it
_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*$")   # "(text:1.3)": the group's own weight
_SPECIAL = "()[]\\"


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """`prompt` -> [(text, weight), ...]: its plain text in pieces, adjacent equal weights merged.

    ValueError names the position of an unbalanced bracket (write \\( for a literal one)."""
    chunks: list[list] = [["", 1.0]]              # [text, weight] pieces; weights multiplied as groups close
    stack: list[tuple[str, int, int]] = []        # (bracket, index of its first chunk, its position)
    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _SPECIAL:
            chunks[-1][0] += prompt[i + 1]
            i += 2
            continue
        if c in "([":
            stack.append((c, len(chunks), i))
            chunks.append(["", 1.0])
        elif c in ")]":
            if not stack or stack[-1][0] != {")": "(", "]": "["}[c]:
                raise ValueError(f"prompt {prompt!r}: unmatched {c!r} at position {i} (write \\{c} for a literal one)")
            bracket, first, _ = stack.pop()
            factor = 1 / EMPHASIS
            if bracket == "(":
                match = _EXPLICIT.search(chunks[-1][0])
                factor = EMPHASIS
                if match:
                    factor = float(match.group(1))
                    chunks[-1][0] = chunks[-1][0][: match.start()]
            for chunk in chunks[first:]:
                chunk[1] *= factor
            chunks.append(["", 1.0])
        else:
            chunks[-1][0] += c
        i += 1
    if stack:
        bracket, _, position = stack[-1]
        raise ValueError(f"prompt {prompt!r}: {bracket!r} at position {position} is never closed "
                         f"(write \\{bracket} for a literal one)")
    out: list[tuple[str, float]] = []
    for text, weight in chunks:
        if not text:
            continue
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out


def plain_text(pieces: list[tuple[str, float]]) -> str:
    return "".join(text for text, _ in pieces)


def token_weights(encoder, pieces: list[tuple[str, float]]) -> torch.Tensor:
    """(max_length,) weights of the tokens of `plain_text(pieces)` as `encoder.tokenize` lays them out:
    1 for the start/end tokens and padding, each piece's weight on its own tokens."""
    text = plain_text(pieces)
    _, mask = encoder.tokenize([text] + [t for t, _ in pieces])
    counts = (mask.sum(1) - 2).tolist()          # minus the start and end tokens
    weights = torch.ones(mask.shape[1], dtype=torch.float32)
    if counts[0] < mask.shape[1] - 2 and sum(counts[1:]) != counts[0]:   # (a truncated prompt cannot be checked)
        raise ValueError(f"prompt weights must cover whole words: in {text!r} the weighted pieces "
                         f"{[t for t, _ in pieces]} tokenize apart to {sum(counts[1:])} tokens, together to "
                         f"{counts[0]} (put a space or punctuation where a group starts or ends)")
    position = 1                                  # after the start token
    for n, (_, weight) in zip(counts[1:], pieces):
        weights[position: min(position + n, mask.shape[1] - 1)] = weight
        position += n
    return weights


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def apply_weights(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """context (B, L, D) with token weights (B, L) applied, each prompt scaled back to its RMS."""
    weighted = context.float() * weights.to(context.device)[..., None]
    return (weighted * (_rms(context.float()) / _rms(weighted))).to(context.dtype)


def encode_weighted(encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`encoder(prompts)` with the emphasis syntax read: (context, mask) of the plain texts, weighted.
    Prompts without weights other than 1 give exactly what `encoder` gives for their plain text."""
    parsed = [parse_weighted(p) for p in prompts]
    context, mask = encoder([plain_text(p) for p in parsed])
    if all(w == 1.0 for pieces in parsed for _, w in pieces):
        return context, mask
    weights = torch.stack([token_weights(encoder, pieces) if pieces else torch.ones(mask.shape[1])
                           for pieces in parsed])
    return apply_weights(context, weights), mask


def tokenizer_weights(tokenizer, pieces: list[tuple[str, float]], length: int) -> torch.Tensor:
    """(length,) weights of the tokens a transformers `tokenizer` gives `plain_text(pieces)`, padded or cut to
    `length` as it cuts (room kept for its end token): 1 on the start and end tokens and the padding, each
    piece's weight on its own tokens.

    A piece's tokens are those that the text up to its end adds to the text up to its start, so the ids
    are exactly the whole text's, whitespace and punctuation at the boundaries included (T5's sentencepiece
    would give "," alone a word-start mark that "red," does not have). ValueError where a boundary falls
    inside a token ("(red)dish")."""
    ids = lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    text, done, weights = "", [], []
    for piece, weight in pieces:
        text += piece
        now = ids(text)
        if now[:len(done)] != done:
            raise ValueError(f"prompt weights must cover whole words: in {plain_text(pieces)!r} the piece "
                             f"{piece!r} starts inside a token of {type(tokenizer).__name__} (put a space or "
                             "punctuation where a group starts or ends)")
        weights += [weight] * (len(now) - len(done))
        done = now
    start = len(tokenizer("")["input_ids"]) - 1          # the empty prompt is [start,] end: CLIP 1, T5 0
    row = [1.0] * start + weights[: length - start - 1]
    return torch.tensor(row + [1.0] * (length - len(row)))


def from_empty(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ComfyUI's emphasis: z (B, L, D) with each token of weight w != 1 moved from the empty prompt's z_empty
    (1, L, D) at its position, z_i <- e_i + w_i (z_i - e_i); weights (B, L); tokens of weight 1 kept bit for bit."""
    w = weights.to(z.device)[..., None]
    e = z_empty.float()
    return torch.where(w != 1, e + w * (z.float() - e), z.float()).to(z.dtype)


def weigh_from_empty(z: torch.Tensor, pieces: list[list[tuple[str, float]]], tokenizer, encode) -> torch.Tensor:
    """An encoder's output z (B, L, D) for the plain texts of `pieces` (parse_weighted's, a list a prompt) as
    `tokenizer` laid them out, with `from_empty` applied: ComfyUI's ClipTokenWeightEncoder.encode_token_weights
    (comfy/sd1_clip.py), which SD3ClipModel and FluxClipModel run on CLIP-L's, bigG's and T5's tokens alike.
    As there: the encoder runs once, unweighted, on the prompt's tokens; the empty prompt (start, end, padding
    to the same length) is run only when some weight is not 1; tokens of weight 1 (specials, padding) stay;
    no rescaling after (ComfyUI's default; its "mean"/A1111 modes are a custom node's); the pooled vectors
    come from the unweighted run. Unlike there: the token ids are the whole plain text's (tokenizer_weights),
    and the lengths are diffusers' (CLIP 77, T5 t5_max_length, longer prompts cut) where ComfyUI chunks CLIP
    and lets T5 grow. encode: (1, L) ids -> (1, L, D), the same encoder."""
    if all(w == 1.0 for p in pieces for _, w in p):
        return z
    L = z.shape[1]
    weights = torch.stack([tokenizer_weights(tokenizer, p, L) for p in pieces])
    empty = tokenizer([""], padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    return from_empty(z, encode(empty), weights)
