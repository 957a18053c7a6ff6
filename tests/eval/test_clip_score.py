"""`python -m ldm.eval clip-score` with a tiny random transformers CLIPModel folder: torchmetrics' CLIP score
computed independently, images matched to prompt lines as `ldm.eval score` does, the errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.__main__ import main
from ldm.eval.clip_score import clip_score, load_clip
from ldm.models.clip_bpe import write_clip_tokenizer

PROMPTS = ["a red cube on a blue floor", "", "a cat", "two dogs playing in the snow at night", "a small green circle"]
LINES = [0, 2, 3, 4]  # the non-blank lines: their images are 0000, 0002, 0003, 0004.png


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel (2 layers, 32 wide, 16-d projections, 32 px images) with CLIP's real tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder = tmp_path_factory.mktemp("clip")
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(2)  # a seed whose cosines here have both signs (seeds 0, 1: one sign)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tiny),
                         vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16)).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_images(folder):
    """One image per non-blank prompt line, unlike each other, of several sizes and modes."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(folder / "0000.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), np.uint8)).save(folder / "0002.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (30, 1))).save(folder / "0003.png")  # L
    Image.new("RGBA", (36, 36), (20, 200, 90, 128)).save(folder / "0004.png")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


def torchmetrics_way(clip_dir, folder, lines):
    """100 cos per pair as torchmetrics' CLIPScore gets it: one processor call, get_*_features, normalize."""
    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    images = [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in lines]
    inputs = processor(text=[PROMPTS[i] for i in lines], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image, text = (x if torch.is_tensor(x) else x.pooler_output for x in (image, text))
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return 100 * (image * text).sum(-1)


def test_clip_score_is_torchmetrics_score(clip_dir, tmp_path, capsys):
    folder = write_images(tmp_path / "out")
    main(["clip-score", "--images", str(folder), "--prompts", str(folder / "prompts.txt"), "--clip", str(clip_dir),
          "--batch-size", "3", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    scores = torchmetrics_way(clip_dir, folder, LINES)
    assert 0 < (scores < 0).sum() < len(LINES), "the clamps must differ to be tested: pick another seed"
    assert [row["line"] for row in result["per_prompt"]] == LINES
    np.testing.assert_allclose([row["score"] for row in result["per_prompt"]], scores, rtol=1e-4, atol=1e-4)
    assert result["clip_score"] == pytest.approx(max(scores.mean().item(), 0), abs=1e-4)
    assert result["clip_score_clamped"] == pytest.approx(scores.clamp(min=0).mean().item(), abs=1e-4)
    assert result["n"] == 4 and result["negative"] == int((scores < 0).sum()) and result["skipped"] == 0
    assert f"{result['clip_score_clamped']:.4f}" in capsys.readouterr().out


def test_unreadable_image_is_skipped_and_counted(clip_dir, tmp_path):
    folder = write_images(tmp_path / "out")
    (folder / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = clip_score(folder, folder / "prompts.txt", str(clip_dir))
    assert result["n"] == 3 and result["skipped"] == 1 and result["skipped_files"] == ["0003.png"]
    np.testing.assert_allclose([row["score"] for row in result["per_prompt"]],
                               torchmetrics_way(clip_dir, folder, [0, 2, 4]), rtol=1e-4, atol=1e-4)


def test_mismatched_prompts_and_images_are_errors(clip_dir, tmp_path, capsys):
    folder = write_images(tmp_path / "out")
    args = ["clip-score", "--images", str(folder), "--prompts", str(folder / "prompts.txt"), "--clip", str(clip_dir)]
    (folder / "0004.png").unlink()
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert "4 prompts but 3 numbered PNGs" in (message := capsys.readouterr().err)
    assert "1 prompts have no image (line 4: 0004.png)" in message
    Image.new("RGB", (8, 8)).save(folder / "0004.png")
    Image.new("RGB", (8, 8)).save(folder / "0005.png")  # one more image than prompts
    with pytest.raises(SystemExit):
        main(args)
    assert "1 images have no prompt (0005.png)" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded here"):
        load_clip("nobody/no-such-clip-model")
