"""The shapes world's caption grammar: write a caption from a scene, and parse one back.

A caption asks for some attributes of the scene and leaves the others random. What it
asks for is a plain, JSON-friendly dict (`asks`) with always the same keys:

    {"objects": [{"colour": str, "shape": str, "size": str | None}, ...],
     "zone": str | None, "relation": str | None, "background": str | None}

`parse_caption` inverts `caption` exactly: parse_caption(caption(scene, rng)[0]) equals
the asks that `caption` returned. The empty caption asks for nothing (objects == []).
"""
from __future__ import annotations

import re

import numpy as np

BACKGROUND_NAMES = ("white", "black", "gray")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPE_NAMES = ("circle", "square", "triangle")
SIZE_NAMES = ("small", "large")
ZONE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                "bottom": "at the bottom", "center": "in the center"}
# relation of objects[0] to objects[1], e.g. "left_of": the first is left of the second
RELATION_PHRASES = {"left_of": "to the left of", "right_of": "to the right of",
                    "above": "above", "below": "below"}

# How often a caption names an optional attribute; the rest of the time it stays random.
P_SIZE, P_ZONE, P_BACKGROUND = 0.5, 0.5, 0.3


def empty_asks() -> dict:
    """The asks of the empty (unconditional) caption."""
    return {"objects": [], "zone": None, "relation": None, "background": None}


def caption(scene, rng: np.random.Generator, p_zone: float = P_ZONE) -> tuple[str, dict]:
    """A caption true of `scene` and the attributes it asks for; `rng` picks the template.

    `p_zone`: how often a one-object caption names its zone. It only moves a threshold, so
    every p_zone draws the same random numbers: the same scenes, only the captions differ.
    """
    asks = empty_asks()
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        size = obj.size if rng.random() < P_SIZE else None
        asks["zone"] = obj.zone if rng.random() < p_zone else None
        asks["objects"] = [{"colour": obj.colour, "shape": obj.shape, "size": size}]
    else:
        asks["objects"] = [{"colour": o.colour, "shape": o.shape, "size": None}
                           for o in scene.objects]
        asks["relation"] = scene.relation
    asks["background"] = scene.background if rng.random() < P_BACKGROUND else None
    return format_caption(asks), asks


def _object_phrase(obj: dict) -> str:
    size = f"{obj['size']} " if obj.get("size") else ""
    return f"a {size}{obj['colour']} {obj['shape']}"


def format_caption(asks: dict) -> str:
    """The one caption that asks exactly for `asks` (the grammar's writer)."""
    objects = asks["objects"]
    if not objects:
        return ""
    text = _object_phrase(objects[0])
    if len(objects) == 2:
        text += f" {RELATION_PHRASES[asks['relation']]} {_object_phrase(objects[1])}"
    elif asks.get("zone"):
        text += f" {ZONE_PHRASES[asks['zone']]}"
    if asks.get("background"):
        text += f" on a {asks['background']} background"
    return text


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_COLOUR, _SHAPE = f"({_alt(COLOUR_NAMES)})", f"({_alt(SHAPE_NAMES)})"
_BACKGROUND_RE = re.compile(f"^(.*) on a ({_alt(BACKGROUND_NAMES)}) background$")
_TWO_RE = re.compile(f"^a {_COLOUR} {_SHAPE} ({_alt(RELATION_PHRASES.values())}) "
                     f"a {_COLOUR} {_SHAPE}$")
_ONE_RE = re.compile(f"^a (?:({_alt(SIZE_NAMES)}) )?{_COLOUR} {_SHAPE}"
                     f"(?: ({_alt(ZONE_PHRASES.values())}))?$")
_ZONE_OF = {phrase: zone for zone, phrase in ZONE_PHRASES.items()}
_RELATION_OF = {phrase: rel for rel, phrase in RELATION_PHRASES.items()}


def parse_caption(text: str) -> dict:
    """The attributes a shapes-world caption asks for; ValueError if it is not one."""
    asks = empty_asks()
    if text == "":
        return asks
    body = text
    match = _BACKGROUND_RE.match(body)
    if match:
        body, asks["background"] = match.group(1), match.group(2)
    if match := _TWO_RE.match(body):
        c0, s0, rel, c1, s1 = match.groups()
        asks["objects"] = [{"colour": c0, "shape": s0, "size": None},
                           {"colour": c1, "shape": s1, "size": None}]
        asks["relation"] = _RELATION_OF[rel]
    elif match := _ONE_RE.match(body):
        size, colour, shape, zone = match.groups()
        asks["objects"] = [{"colour": colour, "shape": shape, "size": size}]
        asks["zone"] = _ZONE_OF[zone] if zone else None
    else:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    return asks
