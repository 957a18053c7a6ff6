"""Composable prompts, in the AUTOMATIC1111 web UI's syntax: sub-prompts joined by the uppercase word AND, each with
an optional weight suffix ':W' (default 1).

    "a red circle AND a blue square"            two sub-prompts, weight 1 each
    "a red circle :1.2 AND a blue square :0.8"  weights; spaces around ':' allowed, as the web UI's pattern
    "a red circle AND a red square :-0.5"       a negative weight pushes away from a sub-prompt (NOT)
    "a red circle and a blue square"            lowercase 'and' is plain text: one prompt

The guided prediction is the conjunction of Liu et al. 2022 ("Compositional Visual Generation with Composable
Diffusion Models", sec. 4, Concept Conjunction, with classifier-free guidance), as the web UI's wiki (Features,
"Composable Diffusion") and its denoiser combine it: D(u) + sum_i W_i s (D(c_i) - D(u)), s = SD's scale 1 + w
(ldm.diffusion.composable). Each sub-prompt keeps the rest of the syntax: emphasis "(word:1.3)" and prompt editing
"[from:to:when]" / "[a|b]" (ldm.models.prompt_schedule) are read in each sub-prompt alone, as the web UI splits
at AND before it reads brackets.

As the web UI: AND is split as a whole uppercase word (its pattern \\bAND\\b, so " AND " and also ",AND "; not
"ANDROID" or "SAND"); the weight is a number at the very end after ':' ("1", "1.", ".5", "-0.3"). Unlike the web
UI, a prompt with no AND is never a composition, whatever it ends in: the web UI reads "a clock at 10:30" as "a
clock at 10" at weight 30 (a composition of one sub-prompt), which would also send an everyday prompt away from
the students, which take no composition. Also unlike the web UI, which reads anything it cannot parse as text, we refuse: an empty sub-prompt, a ':' at the end with a
malformed or no number after it ("a cat :1.2.3", "a cat :"; write '\\:' for a literal ':'), and AND inside a bracket
("(a AND b)", "[a AND b:c:2]", which the web UI would cut in two), each with its position in the prompt.
"""
from __future__ import annotations

import re

_AND = re.compile(r"\bAND\b")
_TAIL = re.compile(r"(?<!\\):([^:]*)$")                     # the last unescaped ':' and what follows it
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")           # the web UI's weight: 1, 1., 1.5, .5, signed
_NUMBERISH = re.compile(r"[-+.,\deE]*")                     # what a mistyped weight looks like (1,5  1.2.3  1e)


def _bracket_depths(prompt: str) -> list[int]:
    """Depth of '(' and '[' nesting at each character (escaped brackets, '\\(' etc., do not count)."""
    depths, depth, i = [0] * len(prompt), 0, 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\":
            depths[i:i + 2] = [depth] * len(depths[i:i + 2])
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(depth - 1, 0)            # unmatched closers: the schedule parser names them
        depths[i] = depth
        i += 1
    return depths


def _split_weight(prompt: str, piece: str, start: int) -> tuple[str, float | None]:
    """(the sub-prompt `piece`, found at `start` in `prompt`, without its weight; the weight or None when it has
    none); ValueError for a ':' at the end followed by a malformed number or by nothing."""
    tail = _TAIL.search(piece)
    if tail is None:
        return piece, None
    written = tail.group(1).strip()
    if _NUMBER.fullmatch(written):
        return piece[:tail.start()], float(written)
    if _NUMBERISH.fullmatch(written) and (written == "" or any(c.isdigit() for c in written)
                                          or set(written) <= set("+-.")):
        raise ValueError(f"prompt {prompt!r}: the weight after ':' at position {start + tail.start()} is "
                         f"{written!r}, not a number such as 0.8 or -1.5 (write \\: for a literal ':')")
    return piece, None                               # "a cat: big": text, as the web UI reads it


def parse_composable(prompt: str) -> list[tuple[str, float]]:
    """`prompt` -> [(sub-prompt text, weight), ...], split at AND, texts stripped; a prompt without AND is itself, as
    written, with weight 1 (so "" stays the unconditional prompt, and "at 10:30" is text). ValueError names a
    malformed part's position."""
    splits = list(_AND.finditer(prompt))
    if not splits:
        return [(prompt, 1.0)]
    depths = _bracket_depths(prompt)
    for match in splits:
        if depths[match.start()] > 0:
            raise ValueError(f"prompt {prompt!r}: AND at position {match.start()} is inside a bracket; AND splits "
                             "the prompt into sub-prompts before brackets are read (write 'and' for the word)")
    bounds = [0] + [i for m in splits for i in (m.start(), m.end())] + [len(prompt)]
    parts = []
    for start, end in zip(bounds[::2], bounds[1::2]):
        text, weight = _split_weight(prompt, prompt[start:end], start)
        if not text.strip():
            raise ValueError(f"prompt {prompt!r}: empty sub-prompt at position {start} (AND joins two prompts, "
                             "each with an optional ':WEIGHT' at its end)")
        parts.append((text.strip(), 1.0 if weight is None else weight))
    return parts


def is_composed(prompt: str) -> bool:
    """Whether `prompt` is more than one sub-prompt or carries a weight other than 1."""
    parts = parse_composable(prompt)
    return len(parts) > 1 or parts[0][1] != 1.0


def flatten(prompts: list[str]) -> tuple[list[str], list[int], list[float]]:
    """The sub-prompts of all `prompts` in order, the prompt each belongs to and its weight."""
    texts, owner, weights = [], [], []
    for b, prompt in enumerate(prompts):
        for text, weight in parse_composable(prompt):
            texts.append(text)
            owner.append(b)
            weights.append(weight)
    return texts, owner, weights


def has_and(text: str) -> bool:
    """Whether `text` holds the word AND (uppercase, whole), which splits a prompt into sub-prompts."""
    return _AND.search(text) is not None
