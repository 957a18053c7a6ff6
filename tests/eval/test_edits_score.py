"""ldm.eval edits: the oracle's edit judgement on exact images: the true after-image passes, the untouched input and
an edit of the wrong object fail, the unchanged-pixel error is zero for both; a text-to-image model is refused."""
from dataclasses import replace

from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.shapes import render
from ldm.eval.__main__ import main as eval_main
from ldm.eval.edits import heldout_triples, judge_edit, score
from ldm.eval.oracle import Oracle

N = 40
SHAPES64 = str(Path(__file__).resolve().parents[2] / "ldm" / "assets" / "shapes64")


@pytest.fixture(scope="module")
def setup():
    triples = heldout_triples(N)
    before, after = (torch.from_numpy(np.stack([render(getattr(t, p)) for t in triples])).permute(0, 3, 1, 2)
                     for p in ("before", "after"))
    return Oracle.load(), triples, before, after


def test_target_passes_and_input_fails(setup, one_thread):
    oracle, triples, before, after = setup
    target, unchanged = score(oracle, after, triples, before, after), score(oracle, before, triples, before, after)
    assert target["edit"] == 1.0 and target["preserved"] >= 0.95 and target["preserved_attributes"] >= 0.98 and target["unchanged_pixel_mae"] == 0.0
    assert unchanged["edit"] == 0.0 and unchanged["unchanged_pixel_mae"] == 0.0
    assert set(target["per_kind"]) == {"recolour", "background"} and len(target["outcomes"]) == N


def test_recolouring_the_other_object_is_no_edit(setup, one_thread):
    oracle, triples, _, _ = setup
    pairs = [t for t in heldout_triples(200) if t.edit.kind == "recolour" and len(t.before.objects) == 2][:10]
    assert pairs
    wrong = []
    for t in pairs:                       # the new colour painted on the object the instruction did not name
        objects = list(t.before.objects)
        other = 1 - t.edit.target
        objects[other] = replace(objects[other], colour=t.edit.value)
        wrong.append(render(replace(t.before, objects=tuple(objects))))
    readings = oracle.read(torch.from_numpy(np.stack(wrong)).permute(0, 3, 1, 2))
    assert not any(judge_edit(r, t)[0] for r, t in zip(readings, pairs))
    right = oracle.read(torch.from_numpy(np.stack([render(t.after) for t in pairs])).permute(0, 3, 1, 2))
    assert all(judge_edit(r, t)[0] for r, t in zip(right, pairs))


def test_cli_refuses_a_text_to_image_model(capsys):
    with pytest.raises(SystemExit):
        eval_main(["edits", "--model", SHAPES64, "--n", "2"])
    assert "not an InstructPix2Pix model" in capsys.readouterr().err
