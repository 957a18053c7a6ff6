"""Prompts that change over the sampling steps, in the AUTOMATIC1111 web UI's syntax: prompt editing and alternation.

    "a [fantasy:cyberpunk:16] landscape"   'fantasy' on steps 1-16, then 'cyberpunk'
    "a [red:blue:0.5] circle"              WHEN with a decimal point: a fraction of the steps, int(0.5 * steps)
    "a [red circle:2]"                     '[to:when]': 'red circle' added after step 2
    "a [red::2] circle"                    '[from::when]': 'red' removed after step 2
    "a [b:[c:d:4]:2] e"                    edits nest: 'b' to step 2, 'c' to step 4, then 'd'
    "a [cow|horse] in a field"             alternation: 'cow' on step 1, 'horse' on 2, 'cow' on 3, ...

As the web UI's wiki describes them (Features, "Prompt editing", "Alternating Words"): WHEN is the step after
which `to` replaces `from`: an integer is a step number, a number written with a decimal point a fraction of the
steps (the web UI's default reading since 1.6, so "1.0" is the last step and "[a:b:0.5]" switches after step
int(0.5 * steps)); WHEN <= 0 gives `to` throughout, WHEN >= steps `from` throughout. Steps count from 1 over the
steps the sampler runs (img2img: the steps left). Emphasis stays the emphasis parser's (ldm.models.prompt_weights):
"[word]" without ':' or '|' inside is 1/1.1, "(word:1.3)" inside an edit is weighted in the texts that hold it;
"\\:" and "\\|" are a literal ':' and '|', "\\[" and "\\(" literal brackets.

`prompt_schedule` gives a prompt's distinct texts with the last step each covers, [(end_step, text), ...], the
web UI's schedule form; `scheduled` is the model wrapper that gives the network step i's text conditioning.

Caution: the web UI's implementation counts its denoiser's calls from 0 and takes the first schedule entry whose
end is >= that count, so there `from` runs WHEN + 1 steps and alternation repeats its first word on the first two
steps; we follow the wiki's description instead ("[a:b:0.5]" at 16 steps: 'a' on steps 1-8, 'b' on 9-16; "[a|b]"
at 2 steps: 'a' then 'b'). A step is found from the time t the network is called at (`step_index`), so Heun's
second evaluation, at the next step's time, takes the next step's text (the web UI, counting calls, doubles its
step count for such samplers). Where the web UI reads a malformed group ("[a:b]", "[a|b:2]") as plain text, we
refuse it with its position. Hires fix's second pass (`first_pass`) continues the timeline as the web UI's does
since 1.6: "[a:b:0.5]" is 'b' throughout it, "[a:b:1.5]" switches half-way through it. "AND" (composable
diffusion) is split off before, each sub-prompt its own schedule (ldm.models.prompt_compose).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ldm.diffusion.schedules import step_index

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*")    # WHEN, spaces allowed around it as the web UI does


@dataclass
class _Edit:
    """[from:to:when]: `before` up to step `when`, then `after` (node lists)."""
    before: list
    after: list
    when: str                      # as written: a decimal point makes it a fraction of the steps


@dataclass
class _Alternation:
    """[a|b|c]: option (step - 1) mod n at step `step`."""
    options: list


def _parse(prompt: str, i: int, close: str | None) -> tuple[list[list], list[str], int]:
    """The nodes from position i up to the bracket `close` (None: the end): (parts split at this level's ':' and
    '|' inside '[...]', the separators, the position after `close`). Nodes: text, _Edit, _Alternation."""
    parts: list[list] = [[]]
    separators: list[str] = []
    start = i - 1
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt):
            # ':' and '|' mean nothing to the emphasis parser: give it the character; keep \( \[ \\ for it
            nxt = prompt[i + 1]
            parts[-1].append(nxt if nxt in ":|" else c + nxt)
            i += 2
            continue
        if c in "([":
            inner, seps, i = _parse(prompt, i + 1, {"(": ")", "[": "]"}[c])
            if c == "(":                                # emphasis: ':' inside is its weight, text to us
                parts[-1].extend(["("] + _join(inner, seps) + [")"])
            else:
                parts[-1].extend(_bracket(prompt, i, inner, seps))
            continue
        if c in ")]":
            if c != close:
                raise ValueError(f"prompt {prompt!r}: unmatched {c!r} at position {i} (write \\{c} for a literal one)")
            return parts, separators, i + 1
        if c in ":|" and close == "]":
            separators.append(c)
            parts.append([])
        else:
            parts[-1].append(c)
        i += 1
    if close is not None:
        opening = {")": "(", "]": "["}[close]
        raise ValueError(f"prompt {prompt!r}: {opening!r} at position {start} is never closed "
                         f"(write \\{opening} for a literal one)")
    return parts, separators, i


def _join(parts: list[list], separators: list[str]) -> list:
    """The parts with their separators back between them, as text."""
    out = list(parts[0])
    for sep, part in zip(separators, parts[1:]):
        out += [sep, *part]
    return out


def _bracket(prompt: str, end: int, parts: list[list], separators: list[str]) -> list:
    """What '[...]' ending before position `end` is: an edit, an alternation, or emphasis (kept as text)."""
    if not separators:
        return ["[", *parts[0], "]"]                     # "[word]": emphasis 1/1.1, the emphasis parser's
    if set(separators) == {"|"}:
        return [_Alternation(parts)]
    plain = all(isinstance(n, str) for n in parts[-1])        # WHEN is text alone, no group inside
    number = _NUMBER.fullmatch("".join(parts[-1])) if plain else None
    if "|" in separators or len(parts) > 3 or number is None:
        raise ValueError(f"prompt {prompt!r}: the group ending at position {end - 1} is neither emphasis '[word]', "
                         "an edit '[from:to:when]' / '[to:when]' (WHEN a number) nor an alternation '[a|b]' "
                         "(write \\: or \\| for a literal ':' or '|')")
    before, after = (parts[0], parts[1]) if len(parts) == 3 else ([], parts[0])
    return [_Edit(before, after, number.group(1))]


def parse_schedule(prompt: str) -> list:
    """`prompt` -> its nodes (text, _Edit, _Alternation); ValueError names a bad group's position."""
    parts, _, _ = _parse(prompt, 0, None)
    return parts[0]


def is_scheduled(prompt: str) -> bool:
    """Whether `prompt` holds an edit or an alternation (its text may change over the steps)."""
    return any(isinstance(node, (_Edit, _Alternation)) for node in parse_schedule(prompt))


def edit_step(when: str, steps: int, first_pass: int = 0) -> int:
    """The step after which an edit switches: a number with a decimal point is a fraction of `steps`, else a step
    number; truncated toward 0 and capped at `steps` as the web UI does. first_pass: the steps of the first pass
    that this run continues (hires fix's second pass; 0: none): the web UI's second timeline, where fractions
    count from 1.0 ("1.5": half this run) and step numbers from the first pass's end."""
    if "." in when:
        value = (float(when) - (1.0 if first_pass else 0.0)) * steps
    else:
        value = float(when) - first_pass
    return min(steps, int(value))


def _walk(nodes: list):
    for node in nodes:
        yield node
        if isinstance(node, _Edit):
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternation):
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list, step: int, steps: int, first_pass: int) -> str:
    """The text at `step` (from 1)."""
    out = []
    for node in nodes:
        if isinstance(node, _Edit):
            shown = node.before if step <= edit_step(node.when, steps, first_pass) else node.after
            out.append(_render(shown, step, steps, first_pass))
        elif isinstance(node, _Alternation):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps, first_pass))
        else:
            out.append(node)
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, first_pass: int = 0) -> list[tuple[int, str]]:
    """[(end_step, text), ...]: `text` is the prompt on the steps after the previous entry's end up to `end_step`
    (steps count from 1); the last end is `steps`. Adjacent equal texts are one entry. first_pass: `edit_step`'s."""
    if steps < 1:
        raise ValueError(f"a prompt schedule needs steps >= 1, got {steps}")
    nodes = parse_schedule(prompt)
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit) and 1 <= edit_step(node.when, steps, first_pass) < steps:
            ends.add(edit_step(node.when, steps, first_pass))
        elif isinstance(node, _Alternation):
            ends.update(range(1, steps))
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):                            # the text is constant on (previous end, end]
        text = _render(nodes, end, steps, first_pass)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


def step_texts(prompt: str, steps: int, first_pass: int = 0) -> list[str]:
    """The prompt's text on each of `steps` steps (list index = step - 1); first_pass: `edit_step`'s."""
    texts, start = [], 0
    for end, text in prompt_schedule(prompt, steps, first_pass):
        texts += [text] * (end - start)
        start = end
    return texts


def scheduled(model, conds: dict, rows: torch.Tensor, grid):
    """Model function (x, t, **extra_args) -> model(x, t, **extra_args) with the text conditioning of t's step:
    each tensor of `conds` (U distinct texts' context, mask, pooled vector: (U, ...)) in place of extra_args' own,
    its rows `rows[i]` (B,) at step i; rows (steps, B); grid: the run's step times (`step_index`)."""
    grid = [float(g) for g in torch.as_tensor(grid).flatten()]
    if rows.shape[0] != len(grid):
        raise ValueError(f"a prompt schedule of {rows.shape[0]} steps for a run of {len(grid)}")

    def call(x, t, **extra_args):
        picked = rows[step_index(grid, t)]
        return model(x, t, **{**extra_args, **{key: value.index_select(0, picked.to(value.device))
                                               for key, value in conds.items()}})
    return call
