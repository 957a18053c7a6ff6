"""ldm.data.edits: exact (before, instruction, after) triples; the edit changes what it says and nothing else."""
import numpy as np
import pytest
import torch

from ldm.data.edits import Edit, ShapesEdits, apply_edit, generate_edit
from ldm.data.loaders import DataConfig, build_dataset
from ldm.data.shapes import BACKGROUNDS, COLOURS, render, split_of
from ldm.instruct_pix2pix import drop_conditions

TRIPLES = [generate_edit(0, i, "train") for i in range(120)]


def test_both_kinds_are_drawn_and_every_edit_changes_the_scene():
    assert {t.edit.kind for t in TRIPLES} == {"recolour", "background"}
    assert all(t.after != t.before and not np.array_equal(render(t.after), render(t.before)) for t in TRIPLES)


@pytest.mark.parametrize("t", [t for t in TRIPLES if t.edit.kind == "recolour"][:30])
def test_recolour_changes_one_objects_colour_and_only_its_pixels(t):
    target = t.edit.target
    for i, (a, b) in enumerate(zip(t.before.objects, t.after.objects)):
        assert (a.shape, a.size, a.bbox, a.zone) == (b.shape, b.size, b.bbox, b.zone)       # geometry kept
        assert (b.colour == t.edit.value) if i == target else (a.colour == b.colour)
    assert t.before.background == t.after.background and t.before.relation == t.after.relation
    assert len({o.colour for o in t.after.objects}) == len(t.after.objects)                # still told apart
    before, after = render(t.before), render(t.after)
    x0, y0, x1, y1 = t.before.objects[target].bbox
    changed = (before != after).any(-1)
    outside = changed.copy()
    outside[y0:y1, x0:x1] = False
    assert changed.any() and not outside.any()                          # only inside the edited object's box
    full = (before == COLOURS[t.before.objects[target].colour]).all(-1)   # its fully covered pixels
    assert full.sum() > 50 and (after[full] == COLOURS[t.edit.value]).all()
    words = t.instruction.split()
    assert t.edit.value == words[-1] and t.before.objects[target].shape in words


@pytest.mark.parametrize("t", [t for t in TRIPLES if t.edit.kind == "background"][:20])
def test_background_edit_keeps_the_objects_pixels(t):
    assert t.after.objects == t.before.objects and t.after.background == t.edit.value != t.before.background
    before, after = render(t.before), render(t.after)
    inside = np.zeros(before.shape[:2], bool)
    for o in t.before.objects:
        inside |= (before == COLOURS[o.colour]).all(-1)                 # wholly covered by an object
    assert inside.any() and (before[inside] == after[inside]).all()
    bg = (before == BACKGROUNDS[t.before.background]).all(-1)
    assert (after[bg] == BACKGROUNDS[t.edit.value]).all() and t.edit.value in t.instruction


def test_an_object_sharing_its_shape_is_named_by_colour_too():
    shared = [t for t in (generate_edit(0, i) for i in range(400)) if t.edit.kind == "recolour" and
              len(t.before.objects) == 2 and t.before.objects[0].shape == t.before.objects[1].shape]
    assert shared
    for t in shared:
        obj = t.before.objects[t.edit.target]
        assert f"{obj.colour} {obj.shape}" in t.instruction


def test_deterministic_heldout_split_and_refusals():
    assert generate_edit(3, 5, "heldout") == generate_edit(3, 5, "heldout") != generate_edit(3, 5, "train")
    assert all(split_of(generate_edit(0, i, "heldout").before) == "heldout" for i in range(20))
    with pytest.raises(ValueError, match="unknown edit kind"):
        apply_edit(TRIPLES[0].before, Edit("move", 0, "left"))
    with pytest.raises(ValueError, match="colour of"):
        apply_edit(TRIPLES[0].before, Edit("recolour", 5, "red"))


def test_data_source_items_hold_both_images():
    data = build_dataset(DataConfig(source="shapes-edits", resolution=64, length=4, split="heldout"))
    assert isinstance(data, ShapesEdits)
    item, t = data[2], generate_edit(0, 2, "heldout")
    assert item["text"] == t.instruction and item["edit"] == t.edit.to_dict()
    for key, scene in (("pixel_values", t.after), ("source_pixels", t.before)):
        pixels = torch.from_numpy(render(scene)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(item[key], pixels, atol=1e-6)


def test_drop_conditions_drops_text_image_and_both_p_each():
    """Brooks et al. sec. 3.2.1: three disjoint 5% shares; dropped images are zero latents, the rest untouched."""
    n, p = 40000, 0.05
    texts = [f"t{i}" for i in range(n)]
    latents = torch.randn(n, 4, 2, 2) + 3.0
    out_texts, out = drop_conditions(texts, latents, p, torch.Generator().manual_seed(0))
    no_text = torch.tensor([t == "" for t in out_texts])
    no_image = (out == 0).flatten(1).all(1)
    kept = ~no_image
    assert torch.equal(out[kept], latents[kept])
    for share in ((no_text & ~no_image), (no_image & ~no_text), (no_text & no_image)):
        assert abs(share.float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
    t0, l0 = drop_conditions(texts[:10], latents[:10], 0.0)
    assert t0 == texts[:10] and torch.equal(l0, latents[:10])
