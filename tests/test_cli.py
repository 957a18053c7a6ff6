"""The txt2img / img2img / inpaint CLIs on a tiny random model folder with one student."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm import img2img, inpaint, txt2img
from ldm.models.unet import UNet

from tests.tiny_models import random_flow_model, random_model_with_student

RES = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=RES, w_features=16,
                                     dtype=torch.float16)


def size(path):
    with Image.open(path) as im:
        return im.size


def test_txt2img_student_teacher_and_grid(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--out", str(out)])
    assert size(out) == (RES, RES)
    printed = capsys.readouterr().out
    assert "student-2" in printed and "NFE 2" in printed
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--teacher", "--guidance", "1",
                  "--n", "4", "--sampler", "stochastic", "--out", str(tmp_path / "grid.png")])
    assert size(tmp_path / "grid.png") == (2 * (RES + 2) + 2,) * 2      # 2x2 grid, 2-pixel padding
    printed = capsys.readouterr().out
    assert "teacher" in printed and "NFE 4" in printed and "stochastic" in printed
    txt2img.main(["", "--model", model, "--steps", "1", "--guidance", "0", "--out", str(tmp_path / "e.png")])
    assert "teacher" in capsys.readouterr().out and size(tmp_path / "e.png") == (RES, RES)


def test_teacher_samplers_count_their_network_evaluations(model, tmp_path, capsys):
    for sampler, nfe in (("heun", (2 * 3 - 1) * 2), ("dpmpp_2m", 3 * 2), ("euler", 3 * 2),  # CFG: 2 a call;
                         ("unipc", 3 * 2), ("dpmpp_3m_sde", 3 * 2)):     # the corrector costs no call
        txt2img.main(["a red circle", "--model", model, "--steps", "3", "--sampler", sampler,     # Heun's last
                      "--guidance", "1", "--out", str(tmp_path / f"{sampler}.png")])               # step is Euler
        printed = capsys.readouterr().out
        grid = " (karras)" if sampler == "heun" else ""                                        # heun's default grid
        assert f"teacher, 3 steps, {sampler}{grid}, w=1, NFE {nfe}," in printed
    with pytest.warns(UserWarning, match="student-2 was distilled to match DDIM steps; 'heun'"):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--sampler", "heun",
                      "--out", str(tmp_path / "s.png")])
    assert "student-2, 2 steps, heun, w=2, NFE 3," in capsys.readouterr().out


def test_negative_prompt_is_the_teachers_unconditional_branch(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--negative", "blue",
                      "--out", str(tmp_path / "n.png")])
    assert e.value.code == 2 and "--negative needs the teacher" in capsys.readouterr().err
    # (1 + w) c - w c = c: with the prompt itself as the negative, any w gives the conditional model (w = 0)
    for args, name in ((["--negative", "a red circle", "--guidance", "3"], "same"), (["--guidance", "0"], "plain"),
                       (["--negative", "a blue square", "--guidance", "3"], "other")):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--teacher", *args,
                      "--out", str(tmp_path / f"{name}.png")])
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in ("same", "plain", "other")}
    assert np.abs(pixels["same"] - pixels["plain"]).max() <= 1              # PNG rounding
    assert np.abs(pixels["other"] - pixels["plain"]).max() > 8


def test_guidance_rescale_is_a_teacher_option(model, tmp_path, capsys):
    """--guidance-rescale PHI (Lin et al. 2024): refused for students and outside [0, 1]; at w = 0 the guided
    prediction is the conditional one, so the rescale is the identity; at w = 3 it changes the image."""
    for args, message in ((["--guidance-rescale", "0.7"], "--guidance-rescale needs the teacher"),
                          (["--teacher", "--guidance-rescale", "1.5"], "must be in [0, 1], got 1.5")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, "--steps", "2", *args, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    for args, name in ((["--guidance", "0"], "w0"), (["--guidance", "0", "--guidance-rescale", "1"], "w0-phi1"),
                       (["--guidance", "3"], "w3"), (["--guidance", "3", "--guidance-rescale", "1"], "w3-phi1")):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--teacher", *args,
                      "--out", str(tmp_path / f"{name}.png")])
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("w0", "w0-phi1", "w3", "w3-phi1")}
    assert np.array_equal(pixels["w0"], pixels["w0-phi1"])
    assert np.abs(pixels["w3"] - pixels["w3-phi1"]).max() > 8
    write_image(tmp_path / "in.png")
    img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "2",
                  "--teacher", "--guidance-rescale", "0.7", "--model", model, "--out", str(tmp_path / "i.png")])
    assert "teacher, 1 steps" in capsys.readouterr().out


def test_prompt_weights_are_read_unless_off(model, tmp_path, capsys):
    """'(red:1.0)' is 'red' with the default a1111 syntax; `--prompt-weights off` sends the brackets as text.
    A bracket left open, or a weight inside a word, is a usage error before anything is drawn."""
    def draw(name, prompt, *args):
        txt2img.main([prompt, "--model", model, "--steps", "2", *args, "--out", str(tmp_path / f"{name}.png")])
        return np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    plain = draw("plain", "a red circle")
    assert np.array_equal(draw("one", "a (red:1.0) circle"), plain)
    assert not np.array_equal(draw("literal", "a (red:1.0) circle", "--prompt-weights", "off"), plain)
    assert not np.array_equal(draw("heavy", "a (red:3) circle"), plain)
    for prompt, message in (("a (red circle", "is never closed"), ("a (red)dish circle", "must cover whole words")):
        with pytest.raises(SystemExit) as e:
            draw("bad", prompt)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        draw("bad", "a red circle", "--teacher", "--negative", "[blue")
    assert "'[' at position 0 is never closed" in capsys.readouterr().err


def test_embedding_errors_are_usage_errors(model, tmp_path, capsys):
    from safetensors.torch import save_file
    save_file({"<w>": torch.zeros(1, 8)}, str(tmp_path / "w.safetensors"))
    for arg, message in ((str(tmp_path / "none.pt"), "no file"),
                         (str(tmp_path / "w.safetensors"), "made for another model")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, "--embedding", arg, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_png_holds_the_settings_that_draw_it_again(model, tmp_path, capsys):
    txt2img.main(["a (red:1.2) circle", "--model", model, "--steps", "3", "--teacher", "--guidance", "1.5",
                  "--seed", "7", "--sampler", "dpmpp_2m", "--spacing", "karras", "--negative", "blue",
                  "--guidance-rescale", "0.5", "--out", str(tmp_path / "a.png")])
    with Image.open(tmp_path / "a.png") as im:
        text = dict(im.text)
    assert text["parameters"] == ("a (red:1.2) circle\nNegative prompt: blue\nSteps: 3, Sampler: DPM++ 2M Karras, "
                                  f"CFG scale: 2.5, Seed: 7, Size: {RES}x{RES}, Model: {model.rstrip('/').split('/')[-1]}")
    import json
    run = json.loads(text["ldm"])
    assert run["drawn_by"] == "teacher" and run["guidance_rescale"] == 0.5
    flags = ["--steps", run["steps"], "--guidance", run["guidance"], "--seed", run["seed"], "--sampler", run["sampler"],
             "--spacing", run["spacing"], "--negative", run["negative"], "--guidance-rescale", run["guidance_rescale"],
             "--prompt-weights", run["prompt_weights"], "--model", run["model"]]
    txt2img.main([run["prompt"], *map(str, flags), *(["--teacher"] if run["teacher"] else []),
                  "--out", str(tmp_path / "b.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--out", str(tmp_path / "c.png")])      # the same, in one flag
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--seed", "8", "--out", str(tmp_path / "d.png")])
    with Image.open(tmp_path / "d.png") as im:                                             # a flag given wins
        assert json.loads(im.text["ldm"])["seed"] == 8 and json.loads(im.text["ldm"])["negative"] == "blue"
    write_image(tmp_path / "in.png")
    img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "2",
                  "--model", model, "--out", str(tmp_path / "i.png")])
    with Image.open(tmp_path / "i.png") as im:
        run = json.loads(im.text["ldm"])
    assert (run["strength"], run["image"], run["drawn_by"]) == (0.5, str(tmp_path / "in.png"), "student-2")
    for png, message in (("i.png", "drawn by img2img/inpaint"), ("in.png", "no settings of ours")):
        with pytest.raises(SystemExit):
            txt2img.main(["--replay", str(tmp_path / png)])
        assert message in capsys.readouterr().err


def test_each_image_of_a_grid_has_its_own_seed(model, tmp_path, capsys):
    """--n 4 --seed 5: image i is what --seed 5+i draws alone (A1111's rule), for the teacher and the student."""
    for extra in ([], ["--teacher", "--sampler", "dpmpp_2m"]):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--n", "4", "--seed", "5", *extra,
                      "--out", str(tmp_path / "grid.png")])
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--seed", "7", *extra,
                      "--out", str(tmp_path / "one.png")])
        assert ", seeds 5-8" in capsys.readouterr().out                     # which seed each image has
        grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)
        tile = grid[2 + RES + 2: 2 + RES + 2 + RES, 2: 2 + RES]              # row 1, column 0: image 2
        one = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
        assert np.abs(tile - one).max() <= 1                                # a batch of 4 vs 1: rounding at most
        assert np.abs(grid[2: 2 + RES, 2: 2 + RES] - one).max() > 8         # image 0 is another draw


def test_hires_fix_draws_twice_at_two_sizes(model, tmp_path, capsys):
    txt2img.main(["a red circle", "--model", model, "--steps", "4", "--teacher", "--guidance", "1", "--hires", "2:0.5",
                  "--out", str(tmp_path / "big.png")])
    assert size(tmp_path / "big.png") == (2 * RES, 2 * RES)
    assert "teacher, 6 steps, ddim, w=1, NFE 12," in capsys.readouterr().out     # 4 + 2 steps, CFG: 2 a step
    for bad, message in (("1.1", "each side must be a positive multiple of"), ("0.5", "SCALE must be > 1"),
                         ("2:0", "STRENGTH in (0, 1]")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, "--hires", bad, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_freeu_and_clip_skip_flags(model, tmp_path, capsys):
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--freeu", "1.2,1.4,0.9,0.2",
                  "--out", str(tmp_path / "f.png")])                    # the student too: it is a U-Net
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--out", str(tmp_path / "p.png")])
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), np.asarray(Image.open(tmp_path / "p.png")))
    for args, message in ((["--freeu", "1.2,1.4"], "expected four numbers"),
                          (["--clip-skip", "2"], "--clip-skip needs a CLIP text encoder")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, *args, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_txt2img_size(model, tmp_path, capsys):
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--size", f"{2 * RES}x{RES}",
                  "--out", str(tmp_path / "wide.png")])
    assert size(tmp_path / "wide.png") == (2 * RES, RES)
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--size", f"{RES}x{RES}", "--out", str(tmp_path / "sq.png")])
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--out", str(tmp_path / "default.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sq.png")), np.asarray(Image.open(tmp_path / "default.png")))
    for bad, message in (("30x32", "each side must be a positive multiple of"), ("big", "expected WIDTHxHEIGHT")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, "--size", bad, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_txt2img_from_file_numbering_and_long_prompt(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n" + "a very long prompt " * 10 + "\n")
    with pytest.warns(UserWarning, match="truncated"):
        txt2img.main(["--from-file", str(prompts), "--outdir", str(tmp_path / "out"), "--model", model,
                      "--steps", "2"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png", "0002.png"]
    assert size(tmp_path / "out" / "0002.png") == (RES, RES)


def test_missing_model_folder_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "model_index.json" in err
    with pytest.raises(SystemExit):
        txt2img.main(["--model", str(tmp_path)])                       # neither prompt nor --from-file


def test_help_mentions_the_options(capsys):
    for module in (txt2img, img2img, inpaint):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
    assert "--strength" in capsys.readouterr().out


def write_image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(path)


def test_img2img_runs_the_remaining_steps(model, tmp_path, capsys):
    write_image(tmp_path / "in.png")
    img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "2",
                  "--model", model, "--out", str(tmp_path / "out.png")])
    assert size(tmp_path / "out.png") == (RES, RES)
    printed = capsys.readouterr().out
    assert "student-2" in printed and "1 steps" in printed and "NFE 1" in printed


def test_inpaint_keeps_the_unmasked_pixels(model, tmp_path, capsys):
    write_image(tmp_path / "in.png")
    mask = np.zeros((RES, RES), np.uint8)
    mask[8:20, 10:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint.main(["a red circle", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                  "--steps", "2", "--model", model, "--out", str(tmp_path / "out.png")])
    out = np.asarray(Image.open(tmp_path / "out.png"))
    src = np.asarray(Image.open(tmp_path / "in.png"))
    assert out.shape == (RES, RES, 3)
    keep = mask == 0
    assert np.array_equal(out[keep], src[keep])
    assert not np.array_equal(out[~keep], src[~keep])
    assert "NFE 2" in capsys.readouterr().out


def test_img2img_and_inpaint_at_another_size(model, tmp_path, capsys):
    """--size WxH: the input (and mask) cover-cropped to it, the output that size, the unmasked pixels kept."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (RES, 3 * RES, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    img2img.main(["a blue square", "--image", str(tmp_path / "wide.png"), "--strength", "0.5", "--steps", "2",
                  "--size", f"{2 * RES}x{RES}", "--model", model, "--out", str(tmp_path / "i.png")])
    assert size(tmp_path / "i.png") == (2 * RES, RES)
    mask = np.zeros((RES, 3 * RES), np.uint8)
    mask[8:20, 40:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint.main(["a red circle", "--image", str(tmp_path / "wide.png"), "--mask", str(tmp_path / "mask.png"),
                  "--size", f"{2 * RES}x{RES}", "--steps", "2", "--model", model, "--out", str(tmp_path / "p.png")])
    out = np.asarray(Image.open(tmp_path / "p.png"))
    src = np.asarray(Image.open(tmp_path / "wide.png"))[:, RES // 2: RES // 2 + 2 * RES]   # the centre crop
    keep = mask[:, RES // 2: RES // 2 + 2 * RES] == 0
    assert out.shape == (RES, 2 * RES, 3) and np.array_equal(out[keep], src[keep])
    assert not np.array_equal(out[~keep], src[~keep])
    with pytest.raises(SystemExit):
        img2img.main(["x", "--image", str(tmp_path / "wide.png"), "--size", "30x32", "--model", model])
    assert "each side must be a positive multiple of" in capsys.readouterr().err


def test_step_bar_on_a_terminal_only(model, tmp_path, capsys, monkeypatch):
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--out", str(tmp_path / "a.png")])
    assert "3/3" not in capsys.readouterr().err                       # captured stderr: not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--out", str(tmp_path / "b.png")])
    assert "3/3" in capsys.readouterr().err


def test_default_steps_follow_the_model(model, tmp_path, capsys):
    """4 where a 4-step student exists (the shipped model), else the teacher at 25 steps."""
    txt2img.main(["a red circle", "--out", str(tmp_path / "shipped.png")])
    assert "student-4, 4 steps" in capsys.readouterr().out
    txt2img.main(["a red circle", "--model", model, "--out", str(tmp_path / "teacher.png")])  # only a student-2
    assert "teacher, 25 steps, ddim, w=2, NFE 50," in capsys.readouterr().out


def test_lora_merges_into_teacher_and_students(model, tmp_path, capsys):
    from safetensors.torch import save_file

    from ldm.models.lora import add_lora, lora_file_state
    unet = UNet.from_pretrained(f"{model}/unet")
    add_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    tensors, meta = lora_file_state(unet)
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=meta)
    runs = {"plain": [], "zero": ["--lora", f"{tmp_path / 'lora.safetensors'}:0"],
            "lora": ["--lora", str(tmp_path / "lora.safetensors")]}
    pixels = {}
    for name, args in runs.items():
        for steps in ("2", "3"):                                          # student-2, teacher
            out = tmp_path / f"{name}-{steps}.png"
            txt2img.main(["a red circle", "--model", model, "--steps", steps, *args, "--out", str(out)])
            pixels[name, steps] = np.asarray(Image.open(out), dtype=np.int16)
            if name == "lora":                              # the teacher's layers (+ student-2's once loaded)
                assert f"LoRA {tmp_path / 'lora.safetensors'} x 1: {len(tensors) // 2} layers merged" in \
                    capsys.readouterr().out
    for steps in ("2", "3"):
        assert np.array_equal(pixels["zero", steps], pixels["plain", steps])
        assert np.abs(pixels["lora", steps] - pixels["plain", steps]).max() > 8
    for bad, message in (("missing.safetensors", "no file"), (f"{model}/unet/model.safetensors",
                                                               "not LoRA weights in a layout we read")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, "--lora", str(tmp_path / bad) if bad.startswith("m")
                          else bad, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_karras_spacing_for_the_teacher_warns_for_a_student(model, tmp_path, capsys):
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--sampler", "dpmpp_2m", "--spacing", "karras",
                  "--guidance", "1", "--out", str(tmp_path / "k.png")])
    assert "teacher, 3 steps, dpmpp_2m (karras), w=1, NFE 6," in capsys.readouterr().out
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--sampler", "dpmpp_2m", "--guidance", "1",
                  "--out", str(tmp_path / "t.png")])
    pixels = [np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("k", "t")]
    assert np.abs(pixels[0] - pixels[1]).max() > 8                          # another grid, another image
    with pytest.warns(UserWarning, match="distilled on the trailing time grid; 'karras'"):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--spacing", "karras",
                      "--out", str(tmp_path / "s.png")])


def test_shift_moves_the_teachers_grid_and_is_refused_for_a_student(model, tmp_path, capsys):
    """--shift S: the teacher's grid at log-SNR - 2 log S (another image; S = 1 is this VP model's own grid),
    kept in the PNG for --replay; refused for a student (distilled on its grid) and for S <= 0."""
    for args, name in (([], "own"), (["--shift", "1"], "one"), (["--shift", "3"], "three")):
        txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--guidance", "1", *args,
                      "--out", str(tmp_path / f"{name}.png")])
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("own", "one", "three")}
    assert np.array_equal(pixels["own"], pixels["one"])
    assert np.abs(pixels["three"] - pixels["own"]).max() > 8
    txt2img.main(["--replay", str(tmp_path / "three.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png"), dtype=np.int16), pixels["three"])
    for args, message in ((["--steps", "2", "--shift", "3"], "--shift needs the teacher"),
                          (["--teacher", "--shift", "0"], "--shift must be > 0"),
                          (["--teacher", "--shift", "2", "--spacing", "ays"], "the ays grid lays out its own"),
                          (["--teacher", "--shift", "2", "--sampler", "heun"], "the karras grid lays out its own")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, *args, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_dtype_flag_loads_half_precision_networks_and_is_replayed(model, tmp_path, capsys):
    """--dtype bfloat16: the image differs a little from float32's, the PNG says so, --replay draws it again."""
    import json
    for args, name in (([], "fp32"), (["--dtype", "bfloat16"], "bf16")):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--teacher", *args,
                      "--out", str(tmp_path / f"{name}.png")])
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("fp32", "bf16")}
    assert 0 < np.abs(pixels["fp32"] - pixels["bf16"]).mean() < 8
    with Image.open(tmp_path / "bf16.png") as im:
        assert json.loads(im.text["ldm"])["dtype"] == "bfloat16"
    txt2img.main(["--replay", str(tmp_path / "bf16.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png"), dtype=np.int16), pixels["bf16"])


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_spacing_with_a_step_at_rectified_flows_data_end_is_a_usage_error(tmp_path, capsys, spacing):
    """A rectified-flow model (its schedule, prediction flow): leading and linspace grids end a step at t = 0, the
    data, where every sampler divides by sigma (a ZeroDivisionError traceback before); trailing draws."""
    folder = random_flow_model(tmp_path / "flow")
    run = ["a red circle", "--model", folder, "--teacher", "--steps", "3", "--out", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as exit_:
        txt2img.main([*run, "--spacing", spacing])
    assert exit_.value.code == 2
    assert f"--spacing: the {spacing} spacing puts a step at t = 0" in capsys.readouterr().err
    txt2img.main([*run, "--spacing", "trailing"])
    assert np.isfinite(np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float64)).all()


def test_control_units_spread_one_value_over_every_unit():
    from ldm.cli import control_units
    run = {"controlnet": ["a/canny/", "b/depth"], "control_scale": [0.5], "control_range": [[0.2, 0.9], [0.0, 0.5]],
           "t2i_adapter": ["x/sketch", "y/color"], "adapter_scale": [1.0, 0.25], "adapter_factor": [0.5]}
    assert control_units(run) == [
        "Model: canny, Weight: 0.5, Guidance Start: 0.2, Guidance End: 0.9",
        "Model: depth, Weight: 0.5, Guidance Start: 0, Guidance End: 0.5",
        "Model: sketch, Weight: 1, Guidance Start: 0, Guidance End: 0.5",
        "Model: color, Weight: 0.25, Guidance Start: 0, Guidance End: 0.5"]
    assert control_units({"controlnet": ["c"], "control_scale": []}) == [
        "Model: c, Weight: 1, Guidance Start: 0, Guidance End: 1"]
    assert control_units({"prompt": "no control"}) == []


def test_replay_list_flags_given_now_replace_the_pngs_lists():
    # "flags given with it override them": argparse's append action would add --lora B to the PNG's [A]
    from ldm.cli import parse_replayed
    stored = {"prompt": "a red circle", "lora": ["a.safetensors:0.5"], "control_scale": [0.8, 0.6], "seed": 3}
    args = parse_replayed(txt2img.build_parser(), ["--replay", "x.png", "--lora", "b.safetensors"],
                          lambda parser, path: dict(stored))
    assert args.lora == ["b.safetensors"] and args.control_scale == [0.8, 0.6] and args.seed == 3
    args = parse_replayed(txt2img.build_parser(), ["--replay", "x.png", "--control-scale", "0.3", "--seed", "5"],
                          lambda parser, path: dict(stored))
    assert args.lora == ["a.safetensors:0.5"] and args.control_scale == [0.3] and args.seed == 5
