"""`python -m ldm.bench` end to end on CPU at the toy sizes: JSON layout, timings, weight check.

The runs call its main(ARGS) in this process, since a fresh start-up of torch and diffusers costs more than a
toy size's benches; test_the_command_line_calls_main runs the module itself. Each case is timed over one call
(--reps 1) after the CPU's one warm-up call, so a step that breaks on its second call still fails."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

BENCHES = ["unet-infer", "vae-decode"]
pytestmark = pytest.mark.usefixtures("one_thread_module")  # toy sizes: intra-op threads only contend


def _bench_here(*args) -> str:
    """What `python -m ldm.bench ARGS` runs, in this process: main(ARGS) on the CPU path, even on a GPU machine;
    returns what it printed. The diffusers log level it lowers is put back."""
    from diffusers.utils import logging as diffusers_logging

    from ldm.bench import main
    verbosity, printed = diffusers_logging.get_verbosity(), io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
            mp.setattr(torch.cuda, "is_available", lambda: False)
            main(args)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return printed.getvalue()


@pytest.fixture(scope="module", autouse=True)
def command_line():
    """`python -m ldm.bench --size tiny-xl --only txt2img` on the CPU path, started with the module: its start-up
    runs beside the one-thread benches of this process."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.bench", "--size", "tiny-xl", "--only", "txt2img"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    proc.kill()  # no-op once it exited


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tmp.json"
    md = out.with_suffix(".md")
    printed = _bench_here("--size", "tiny", "--only", ",".join(BENCHES), "--compile", "eager", "--layout", "both",
                          "--reps", "1", "--out", str(out), "--md", str(md), "--profile", str(out.parent / "profiles"))
    assert "CPU-only timings" in printed  # the banner
    return json.loads(out.read_text()), md.read_text()


def test_report_header(report):
    data, _ = report
    for key in ("size", "device", "versions", "date", "command", "note", "weight_check", "results",
                "comparisons"):
        assert key in data, key
    assert data["size"] == "tiny" and data["device"].startswith("cpu")
    for name in ("torch", "triton", "diffusers"):
        assert data["versions"][name], name
    assert "--only unet-infer,vae-decode" in data["command"]
    assert (data["warmup"], data["reps"]) == (1, 1)  # CPU's warm-up call, then --reps 1


def test_weights_shared(report):
    data, _ = report
    assert set(data["weight_check"]) == {"unet", "vae"}
    for name, err in data["weight_check"].items():
        assert 0.0 <= err["max_abs_err"] < 1e-4, (name, err)


def test_every_case_timed(report):
    data, _ = report
    rows = data["results"]
    # CPU: fp32 only, eager only, ours vs diffusers with SDPA (no xformers without CUDA).
    assert {(r["bench"], r["dtype"], r["mode"], r["impl"]) for r in rows} == {
        (b, "fp32", "eager", impl) for b in BENCHES for impl in ("ours", "diffusers-sdpa")}
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0, r


def test_both_layouts_compared_within_each(report):
    data, _ = report
    cases = {c["case"] for c in data["comparisons"] if c["bench"] == "unet-infer"}
    assert len(cases) == 2 and sum(case.endswith(" NHWC") for case in cases) == 1


def test_comparisons(report):
    data, md = report
    comps = data["comparisons"]
    assert {c["bench"] for c in comps} == set(BENCHES)
    for c in comps:
        assert c["speedup"] == pytest.approx(c["peer_ms"] / c["ours_ms"])
        assert c["goal_met"] is None  # goals are judged on GPU runs only
    infer = next(c for c in comps if c["bench"] == "unet-infer")
    assert infer["goal"] == ">= 1.15x"
    assert md.count("| unet-infer |") == 2 and md.count("| vae-decode |") == 1   # NCHW and NHWC rows


def test_goal_verdicts_on_gpu():
    from ldm.bench import compare

    def row(bench, case, mode, impl, ms, gb=None):
        return dict(bench=bench, case=case, dtype="bf16", mode=mode, impl=impl, ms=ms, peak_gb=gb)
    rows = [row("unet-infer", "a", "eager", "ours", 10.0), row("unet-infer", "a", "eager", "diffusers-sdpa", 11.0),
            row("unet-infer", "a", "compiled", "ours", 10.0),
            row("unet-infer", "a", "compiled", "diffusers-sdpa", 10.0),
            row("unet-train", "b", "eager", "ours", 10.0, 5.0),
            row("unet-train", "b", "eager", "diffusers-sdpa", 12.0, 4.0),
            row("unet-train", "b", "eager", "diffusers-xformers", 12.0, 4.0),
            row("mmdit-infer", "c", "eager", "ours", 10.0), row("mmdit-infer", "c", "eager", "diffusers-sdpa", 10.5),
            row("mmdit-train", "d", "compiled", "ours", 10.0, 5.0),
            row("mmdit-train", "d", "compiled", "diffusers-sdpa", 9.0, 6.0)]
    verdicts = {(c["bench"], c["mode"], c["peer"]): (round(c["speedup"], 3), c["goal_met"])
                for c in compare(rows, on_gpu=True)}
    assert verdicts == {
        ("unet-infer", "eager", "diffusers-sdpa"): (1.1, False),       # needs 1.15x
        ("unet-infer", "compiled", "diffusers-sdpa"): (1.0, True),     # needs 1.0x
        ("unet-train", "eager", "diffusers-sdpa"): (1.2, False),       # fast enough, but more memory
        ("unet-train", "eager", "diffusers-xformers"): (1.2, None),    # no goal against xformers
        ("mmdit-infer", "eager", "diffusers-sdpa"): (1.05, True),      # needs parity
        ("mmdit-train", "compiled", "diffusers-sdpa"): (0.9, True),    # compiled training: memory only
    }


def test_profile_tables(report):
    """--profile writes one per-op table per U-Net inference case, named in its row."""
    data, _ = report
    infer = [r for r in data["results"] if r["bench"] == "unet-infer"]
    assert infer and all("profile" in r for r in infer)
    for r in infer:
        text = open(r["profile"]).read()
        assert r["impl"] in r["profile"] and "convolution" in text, r["profile"]
    assert not any("profile" in r for r in data["results"] if r["bench"] != "unet-infer")


def test_sdxl_sizes_run_with_the_added_embedding(tmp_path):
    """--size tiny-xl (SDXL's structure at toy widths): both U-Nets get the pooled text and the size numbers,
    share their weights, and are timed; txt2img (SD's pipeline) is left out, and refused when asked for
    (test_sizes_run_the_benches_of_their_models: tiny-xl, refuse-txt2img-on-tiny-xl)."""
    out = tmp_path / "xl.json"
    _bench_here("--size", "tiny-xl", "--compile", "eager", "--reps", "1", "--out", str(out),
                "--only", "unet-infer,unet-train")
    data = json.loads(out.read_text())
    assert data["size"] == "tiny-xl" and data["weight_check"]["unet"]["max_abs_err"] < 1e-4
    assert {r["bench"] for r in data["results"]} == {"unet-infer", "unet-train"}
    assert all("error" not in r and r["ms"] > 0 for r in data["results"])


# ---- the transformers: SD3's MMDiT and FLUX.1's ----------------------------------------------------

# size, family, inference case (SD3: CFG batch 2 over 77 CLIP + 256 T5 tokens; FLUX.1: batch 1, guidance as an
# input, 64 T5 tokens), training batch
TRANSFORMERS = {"sd3": ("tiny-sd3", "mmdit", "B=2 16x16 L=333", 2), "flux": ("tiny-flux", "flux", "B=1 16x16 L=64", 2)}
MMDIT_BENCHES = ["mmdit-infer", "mmdit-train"]


@pytest.fixture(scope="module", params=sorted(TRANSFORMERS))
def transformer_report(request, tmp_path_factory):
    """A toy size of the family's layout, both of its benches, eager: (report, markdown, family, infer case, B)."""
    size, family, case, batch = TRANSFORMERS[request.param]
    out = tmp_path_factory.mktemp(f"bench-{family}") / f"{family}.json"
    md = out.with_suffix(".md")
    _bench_here("--size", size, "--only", f"{family}-infer,{family}-train", "--compile", "eager", "--reps", "1",
                "--out", str(out), "--md", str(md))
    return json.loads(out.read_text()), md.read_text(), family, case, batch


def test_transformer_weights_shared(transformer_report):
    data, md, family, _, _ = transformer_report
    assert set(data["weight_check"]) == {family}
    assert 0.0 <= data["weight_check"][family]["max_abs_err"] < 1e-4
    assert f"{family} max abs err" in md


def test_transformer_every_case_timed(transformer_report):
    data, _, family, case, batch = transformer_report
    rows = data["results"]
    assert {(r["bench"], r["case"], r["dtype"], r["mode"], r["impl"]) for r in rows} == {
        (bench, c, "fp32", "eager", impl) for impl in ("ours", "diffusers-sdpa")
        for bench, c in [(f"{family}-infer", case), (f"{family}-train", f"B={batch} 16x16 ckpt=off"),
                         (f"{family}-train", f"B={batch} 16x16 ckpt=on")]}
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0, r


def test_transformer_comparisons(transformer_report):
    data, md, family, _, _ = transformer_report
    comps = data["comparisons"]
    assert sorted(c["bench"] for c in comps) == [f"{family}-infer", f"{family}-train", f"{family}-train"]
    for c in comps:
        assert c["peer"] == "diffusers-sdpa" and c["speedup"] == pytest.approx(c["peer_ms"] / c["ours_ms"])
        assert c["goal"] == (">= 1.0x" if c["bench"].endswith("-infer") else ">= 1.0x and peak <= peer")
        assert c["goal_met"] is None  # CPU
    assert md.count(f"| {family}-infer |") == 1 and md.count(f"| {family}-train |") == 2


@pytest.mark.parametrize("size, only, runs", [
    ("tiny-sd3", None, MMDIT_BENCHES),                                  # the size's own benches only
    ("sd15", None, ["unet-infer", "unet-train", "vae-decode", "txt2img"]),
    ("tiny-xl", None, ["unet-infer", "unet-train", "vae-decode"]),
    ("tiny-xl", "txt2img", "no txt2img bench yet"),                    # SD's pipeline, one CLIP
    ("tiny", "mmdit-train", "the tiny size has no mmdit"),              # refused when asked for
    ("sd3", "unet-infer,mmdit-infer", "the sd3 size has no unet"),
    ("tiny-sd3", "txt2img", "has no unet / vae / clip"),
    ("flux-slice", None, ["flux-infer", "flux-train"]),
    ("sd3", "flux-infer", "the sd3 size has no flux"),
], ids=["tiny-sd3", "sd15", "tiny-xl", "refuse-txt2img-on-tiny-xl", "refuse-mmdit-on-tiny", "refuse-unet-on-sd3",
        "refuse-txt2img-on-tiny-sd3", "flux-slice", "refuse-flux-on-sd3"])
def test_sizes_run_the_benches_of_their_models(capsys, size, only, runs):
    from ldm.bench import parse_args

    argv = ["--size", size] + (["--only", only] if only else [])
    if isinstance(runs, list):
        assert parse_args(argv).only == runs
        return
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and runs in capsys.readouterr().err


def test_reps_times_at_least_one_call(capsys):
    from ldm.bench import parse_args

    assert parse_args(["--reps", "1"]).reps == 1 and parse_args([]).reps is None  # None: the device's default
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--reps", "0"])
    assert exit_.value.code == 2 and "at least one call" in capsys.readouterr().err


def test_the_command_line_calls_main(command_line):
    """`python -m ldm.bench` parses its own command line: a bench the size lacks is refused (exit 2, why on stderr).
    Last in the file, so the process started with the module has finished by now."""
    stdout, stderr = command_line.communicate(timeout=300)
    assert command_line.returncode == 2 and "no txt2img bench yet" in stderr, stdout[-2000:] + stderr[-4000:]
