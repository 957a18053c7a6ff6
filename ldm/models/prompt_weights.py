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
