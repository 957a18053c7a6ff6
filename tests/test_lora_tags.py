"""A1111's `<lora:NAME:WEIGHT>` prompt tags (ldm.models.prompt_loras, ldm.cli.tagged_loras): cut out as A1111 cuts
them, drawn as `--lora FILE:WEIGHT` draws, the weights restored bit for bit after each job, in the CLIs and
ldm.serve."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm import txt2img
from ldm.cli import load_pipeline, tagged_loras
from ldm.models.lora import add_lora, lora_file_state
from ldm.models.prompt_loras import split_tags
from ldm.models.unet import UNet

from tests.serve_client import call, serving
from tests.tiny_models import random_model_with_student

RES = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=RES, w_features=16,
                                     dtype=torch.float16)


def write_lora(model: str, path, seed: int, metadata: dict | None = None) -> str:
    """A rank-2 LoRA on every attention projection of the model's U-Net, random enough to change its images."""
    unet = UNet.from_pretrained(f"{model}/unet")
    add_lora(unet, rank=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tensors, meta = lora_file_state(unet)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    save_file(tensors, str(path), metadata={**meta, **(metadata or {})})
    return str(path)


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """A LoRA folder: x.safetensors in a subfolder, pixel-art-v2.safetensors with kohya's name and hash metadata."""
    top = tmp_path_factory.mktemp("loras")
    write_lora(model, top / "styles" / "x.safetensors", 1)
    write_lora(model, top / "pixel-art-v2.safetensors", 2, {"ss_output_name": "pixelart", "sshs_model_hash": "ab" * 32})
    return str(top)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def draw(model, tmp_path, name, prompt, *argv) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    txt2img.main([prompt, "--model", model, "--out", str(out), "--seed", "3", *argv])
    return pixels(out)


# ----------------------------------------------------------------------------- the syntax, as A1111 reads it

@pytest.mark.parametrize("prompt, text, tags", [
    # A1111's re.sub(re_extra_net, "", prompt): the tag goes, every space and comma around it stays
    ("a corgi, pixel art <lora:pixel-art-v2:0.8>", "a corgi, pixel art ", [("pixel-art-v2", 0.8, 0.8)]),
    ("<lora:a:1>, a cat", ", a cat", [("a", 1.0, 1.0)]),
    ("1girl, <lora:agm:1.1> <lora:ray>", "1girl,  ", [("agm", 1.1, 1.1), ("ray", 1.0, 1.0)]),
    ("a <lora:s:0.3:0.9>dog", "a dog", [("s", 0.3, 0.9)]),                       # NAME:TE:UNET (A1111 1.5+)
    ("<lora:s:te=0.3:unet=0.9>", "", [("s", 0.3, 0.9)]),                           # named
    ("<lora:s:0.5:unet=0.2>", "", [("s", 0.5, 0.2)]),
    ("<lyco:old:0.7> x", " x", [("old", 0.7, 0.7)]),                               # the LyCORIS extension's alias
    ("a (red:1.2) <b> 2 < 3: c", "a (red:1.2) <b> 2 < 3: c", []),                 # no <word:...>: text
])
def test_tags_are_cut_as_a1111_cuts_them(prompt, text, tags):
    got_text, got = split_tags(prompt)
    assert got_text == text
    assert [(t.name, t.te, t.unet) for t in got] == tags


@pytest.mark.parametrize("prompt, message", [
    ("1girl, <hypernet:agm:1.1>", "<hypernet:agm:1.1>: hypernetworks are not supported"),
    ("<lora:x:1:1:8>", "<lora:x:1:1:8>: a dyn rank"),
    ("<lora:x:dyn=8>", "a dyn rank"),
    ("<lora:x:heavy>", "<lora:x:heavy>: a weight is not a number"),
    ("<lora:x:nan>", "weights must be finite"),
    ("<lora:x:lbw=1,0>", "unknown argument(s) ['lbw']"),
    ("<extrasupernet:master:12>", "unknown extra network 'extrasupernet'"),
])
def test_tags_we_do_not_run_are_named(prompt, message):
    with pytest.raises(ValueError) as e:
        split_tags(prompt)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- the CLI

def test_tag_draws_what_the_lora_flag_draws(model, loras, tmp_path, capsys):
    x = os.path.join(loras, "styles", "x.safetensors")
    for steps in ("2", "3"):                                            # student-2, teacher
        tagged = draw(model, tmp_path, f"tag{steps}", "a red circle <lora:x:0.6>", "--steps", steps,
                      "--lora-dir", loras)
        flagged = draw(model, tmp_path, f"flag{steps}", "a red circle ", "--steps", steps, "--lora", f"{x}:0.6")
        plain = draw(model, tmp_path, f"plain{steps}", "a red circle", "--steps", steps)
        np.testing.assert_array_equal(tagged, flagged)
        assert np.abs(tagged - plain).max() > 8
        assert np.array_equal(draw(model, tmp_path, f"clean{steps}", "a red circle", "--steps", steps, "--lora",
                                   f"{x}:0.6"), flagged)        # the scratch tokenizer drops the trailing space
    # the model folder's loras/ is the default folder; the lookup is by stem, case-insensitive when unique
    shutil.copytree(model, tmp_path / "m")
    shutil.copytree(loras, tmp_path / "m" / "loras")
    np.testing.assert_array_equal(draw(str(tmp_path / "m"), tmp_path, "default", "a red circle <lora:X:0.6>",
                                       "--steps", "3"), draw(model, tmp_path, "flag", "a red circle",
                                                             "--steps", "3", "--lora", f"{x}:0.6"))


def test_a_tag_may_name_the_files_alias(model, loras, tmp_path):
    """pixel-art-v2.safetensors says ss_output_name "pixelart" (kohya's metadata, A1111's alias)."""
    p = os.path.join(loras, "pixel-art-v2.safetensors")
    np.testing.assert_array_equal(draw(model, tmp_path, "alias", "a red circle <lora:pixelart:0.7>", "--steps", "3",
                                       "--lora-dir", loras),
                                  draw(model, tmp_path, "file", "a red circle", "--steps", "3", "--lora", f"{p}:0.7"))


def test_from_file_merges_per_prompt_and_restores(model, loras, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle <lora:x:0.6>\na red circle\na red circle <lora:pixel-art-v2>\n")
    txt2img.main(["--from-file", str(tmp_path / "prompts.txt"), "--outdir", str(tmp_path / "out"), "--model", model,
                  "--steps", "3", "--seed", "3", "--lora-dir", loras])
    x, p = os.path.join(loras, "styles", "x.safetensors"), os.path.join(loras, "pixel-art-v2.safetensors")
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "0000.png"),
                                  draw(model, tmp_path, "x", "a red circle", "--steps", "3", "--lora", f"{x}:0.6"))
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "0001.png"),
                                  draw(model, tmp_path, "plain", "a red circle", "--steps", "3"))
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "0002.png"),
                                  draw(model, tmp_path, "p", "a red circle", "--steps", "3", "--lora", p))


def test_img2img_and_inpaint_read_tags(model, loras, tmp_path):
    from ldm import img2img, inpaint
    from tests.tiny_models import write_image_and_mask
    image, mask = write_image_and_mask(str(tmp_path), RES)
    x = os.path.join(loras, "styles", "x.safetensors")
    for module, argv in ((img2img, ["--image", image, "--strength", "0.8"]),
                         (inpaint, ["--image", image, "--mask", mask])):
        out = {}
        for name, prompt, extra in (("tag", "a red circle <lora:x:0.6>", ["--lora-dir", loras]),
                                    ("flag", "a red circle", ["--lora", f"{x}:0.6"]), ("plain", "a red circle", [])):
            module.main([prompt, "--model", model, "--steps", "3", "--out", str(tmp_path / f"{name}.png"), *argv,
                         *extra])
            out[name] = pixels(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(out["tag"], out["flag"])
        assert np.abs(out["tag"] - out["plain"]).max() > 8


@pytest.mark.parametrize("prompt, argv, message", [
    ("a red circle <lora:xx:0.6>", [], ["<lora:xx:0.6>: no LoRA file xx{.safetensors,.pt,.ckpt}", "close: x"]),
    ("a red circle <lora:styles/x:0.6>", [], ["no LoRA file styles/x", "there are pixel-art-v2, x"]),   # a stem
    ("a red circle <lora:pixel-art:0.6>", [], ["no LoRA file pixel-art", "close: pixel-art-v2"]),
    ("a red circle <hypernet:agm:1>", [], ["<hypernet:agm:1>: hypernetworks are not supported"]),
    ("a red circle", ["--negative", "<lora:x:1> blurry"], ["--negative: <lora:...> tags act in the prompt"]),
])
def test_bad_tags_are_usage_errors(model, loras, tmp_path, capsys, prompt, argv, message):
    with pytest.raises(SystemExit) as e:
        txt2img.main([prompt, "--model", model, "--lora-dir", loras, "--out", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(m in err for m in message), err
    if "no LoRA file" in err:
        assert loras in err                                             # where it looked


def test_no_lora_folder_is_said(model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        txt2img.main(["a <lora:x>", "--model", model, "--out", str(tmp_path / "x.png")])
    assert "no --lora-dir given and the model folder has no loras/ folder" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_weights_are_restored_bit_for_bit(model, loras, tmp_path, dtype):
    """After a tagged job (teacher, text encoder, a student loaded inside it) every tensor equals its value before,
    start-up --lora included; during it, they did change."""
    parser = txt2img.build_parser()
    x = os.path.join(loras, "styles", "x.safetensors")
    args = parser.parse_args(["a red circle <lora:pixel-art-v2:0.7>", "--model", model, "--dtype", dtype,
                              "--lora-dir", loras, "--lora", f"{x}:0.4", "--steps", "2"])
    pipe = load_pipeline(parser, args, [args.prompt])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    with tagged_loras(parser, args, pipe, args.prompt) as text:
        assert text == "a red circle "
        pipe.generate([text], steps=2, seed=0)                          # loads student-2 inside the job
        assert not all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
        during = {k: v.clone() for k, v in pipe.student(2).state_dict().items()}
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    fresh = load_pipeline(parser, args, [args.prompt]).student(2).state_dict()     # start-up --lora only
    after = pipe.student(2).state_dict()
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(during[k], fresh[k]) for k in fresh)


def test_png_has_the_tag_a1111_hashes_and_replays(model, loras, tmp_path):
    out = tmp_path / "t.png"
    txt2img.main(["a red circle, <lora:x:0.6> <lora:pixel-art-v2>", "--model", model, "--out", str(out),
                  "--steps", "3", "--lora-dir", loras])
    path = os.path.join(loras, "styles", "x.safetensors")
    with open(path, "rb") as f:                                         # kohya's "addnet" hash: the tensor bytes
        data = f.read()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    with Image.open(out) as im:
        text, run = im.text["parameters"], json.loads(im.text["ldm"])
    assert text.startswith("a red circle, <lora:x:0.6> <lora:pixel-art-v2>\n")
    assert f'Lora hashes: "x: {addnet}, pixel-art-v2: {"ab" * 6}"' in text   # sshs_model_hash when the file has it
    assert run["prompt"] == "a red circle, <lora:x:0.6> <lora:pixel-art-v2>" and run["lora_dir"] == [loras]
    txt2img.main(["--replay", str(out), "--out", str(tmp_path / "r.png")])
    np.testing.assert_array_equal(pixels(tmp_path / "r.png"), pixels(out))


# ----------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(model, loras, tmp_path_factory):
    """ldm.serve with a start-up --lora (kept merged throughout) and the LoRA folder; (url, start-up LoRA)."""
    startup = write_lora(model, tmp_path_factory.mktemp("startup") / "s.safetensors", 3)
    with serving(["--model", model, "--lora-dir", loras, "--lora", f"{startup}:0.5"]) as url:
        yield url, startup


def served(url, prompt) -> np.ndarray:
    import base64
    import io
    status, answer = call(url, "txt2img", {"prompt": prompt, "steps": 3, "seed": 3})
    assert status == 200, answer
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_server_merges_per_request_and_restores(server, model, loras, tmp_path):
    url, startup = server
    x = os.path.join(loras, "styles", "x.safetensors")
    plain = served(url, "a red circle")
    tagged = served(url, "a red circle <lora:x:0.6>")
    np.testing.assert_array_equal(served(url, "a red circle"), plain)          # pixel for pixel after the tag
    np.testing.assert_array_equal(plain, draw(model, tmp_path, "s", "a red circle", "--steps", "3", "--lora",
                                              f"{startup}:0.5"))          # the start-up LoRA stays merged
    np.testing.assert_array_equal(tagged, draw(model, tmp_path, "t", "a red circle", "--steps", "3", "--lora",
                                               f"{startup}:0.5", "--lora", f"{x}:0.6"))
    status, answer = call(url, "txt2img", {"prompt": "a <lora:nope:1>", "steps": 3})
    assert status == 422 and "<lora:nope:1>: no LoRA file nope" in answer["detail"]
    np.testing.assert_array_equal(served(url, "a red circle"), plain)


def test_server_lists_and_rescans_loras(server, model, loras):
    url, _ = server
    status, listed = call(url, "loras")
    assert status == 200
    assert sorted((e["name"], e["alias"], e["path"]) for e in listed) == [
        ("pixel-art-v2", "pixelart", os.path.join(loras, "pixel-art-v2.safetensors")),
        ("x", "x", os.path.join(loras, "styles", "x.safetensors"))]
    assert next(e for e in listed if e["name"] == "pixel-art-v2")["metadata"]["sshs_model_hash"] == "ab" * 32
    added = write_lora(model, os.path.join(loras, "late.safetensors"), 4)
    try:
        assert call(url, "refresh-loras", {}) == (200, None)
        assert "late" in [e["name"] for e in call(url, "loras")[1]]
    finally:
        os.remove(added)
        call(url, "refresh-loras", {})


# ----------------------------------------------------------------------------- a CLIP model: two weights

def test_two_weights_scale_text_encoders_and_unet_apart(tmp_path, one_thread):
    """<lora:NAME:TE:UNET> draws what the file's U-Net half at UNET and its text-encoder half at TE draw as two
    --lora files; after a tagged job (fp16) the CLIP weights are bit for bit what they were."""
    pytest.importorskip("diffusers")
    from ldm.models.from_diffusers import convert
    from tests.models.sd_layouts import write_sd_pipeline
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    model, g, halves = str(tmp_path / "model"), torch.Generator().manual_seed(0), {"unet": {}, "text_encoder": {}}
    for part, net in (("unet", theirs.unet), ("text_encoder", theirs.text_encoder)):
        for n, m in net.named_modules():
            if n.endswith(("to_q", "to_v", "q_proj", "v_proj")):
                halves[part][f"{part}.{n}.lora_A.weight"] = torch.randn(2, m.weight.shape[1], generator=g) * 0.5
                halves[part][f"{part}.{n}.lora_B.weight"] = torch.randn(m.weight.shape[0], 2, generator=g) * 0.5
    os.makedirs(tmp_path / "loras")
    save_file({**halves["unet"], **halves["text_encoder"]}, str(tmp_path / "loras" / "both.safetensors"))
    for part, state in halves.items():
        save_file(state, str(tmp_path / f"{part}.safetensors"))
    steps = ["--steps", "2", "--lora-dir", str(tmp_path / "loras")]
    split = draw(model, tmp_path, "split", "a red circle ", *steps, "--lora", f"{tmp_path / 'unet.safetensors'}:0.9",
                 "--lora", f"{tmp_path / 'text_encoder.safetensors'}:0.3")
    for tag in ("<lora:both:0.3:0.9>", "<lora:both:te=0.3:unet=0.9>"):
        np.testing.assert_array_equal(draw(model, tmp_path, "tag", f"a red circle {tag}", *steps), split)
    assert np.abs(draw(model, tmp_path, "one", "a red circle <lora:both:0.9>", *steps) - split).max() > 0
    parser = txt2img.build_parser()
    args = parser.parse_args(["a red circle <lora:both:0.3:0.9>", "--model", model, "--dtype", "float16", *steps])
    pipe = load_pipeline(parser, args, [args.prompt])
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    with tagged_loras(parser, args, pipe, args.prompt):
        assert not all(torch.equal(v, before[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder.state_dict().items())
