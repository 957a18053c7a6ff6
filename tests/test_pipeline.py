"""TextToImage: its CPU decode (channels_last autoencoder, chunks, optional bf16) gives the plain decoder's
images; a student warns when asked for a guidance weight outside the range it was distilled on."""
import copy
import json
import warnings

import pytest
import torch

from ldm.distill.student import GuidedStudent
from ldm.models.unet import UNet
from ldm.pipeline import CPU_DECODE_CHUNK, TextToImage, load_index, native_bf16_cpu, save_index, save_random_model

from tests.tiny_models import random_model_with_student


def test_cpu_decode_in_chunks_matches_plain_decode(tmp_path, one_thread):
    save_random_model(str(tmp_path), resolution=32)
    pipe = TextToImage.from_folder(str(tmp_path), decoder_precision="fp32")
    reference = copy.deepcopy(pipe.autoencoder).to(memory_format=torch.contiguous_format)
    assert pipe.autoencoder.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(2 * CPU_DECODE_CHUNK + 3, *pipe.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    images = pipe.decode(z)
    assert images.is_contiguous() and images.shape == (len(z), 3, 32, 32)
    torch.testing.assert_close(images, reference.decode_latents(z).clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_bf16_decoder_stays_close_to_fp32(tmp_path, one_thread):
    save_random_model(str(tmp_path), resolution=32)
    pipe = TextToImage.from_folder(str(tmp_path), decoder_precision="bf16")
    reference = copy.deepcopy(pipe.autoencoder).to(memory_format=torch.contiguous_format)
    z = torch.randn(CPU_DECODE_CHUNK + 1, *pipe.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images, exact = pipe.decode(z), reference.decode_latents(z).clamp(-1, 1)
    assert images.dtype == torch.float32 and images.shape == exact.shape
    error = (images - exact).abs()                                  # bf16 ran (not exact) and stays close:
    assert 0 < error.max() < 0.1 and error.mean() < 5e-3            # bf16's eps is 2^-8 of each activation


def test_decoder_precision_auto_follows_the_cpu(tmp_path):
    save_random_model(str(tmp_path), resolution=32)
    assert TextToImage.from_folder(str(tmp_path)).decoder_precision == ("bf16" if native_bf16_cpu() else "fp32")
    with pytest.raises(ValueError, match="decoder precision"):
        TextToImage.from_folder(str(tmp_path), decoder_precision="fp16")


def test_student_warns_outside_its_trained_guidance_range(tmp_path, one_thread):
    save_random_model(str(tmp_path), resolution=32)
    unet = UNet.from_pretrained(str(tmp_path / "unet"))
    GuidedStudent(unet, 16, w_range=(1, 3)).save_pretrained(str(tmp_path / "student-1"))
    GuidedStudent(unet, 16).save_pretrained(str(tmp_path / "student-2"))   # a folder from before w_range
    assert json.loads((tmp_path / "student-1" / "config.json").read_text())["w_range"] == [1.0, 3.0]
    index = load_index(str(tmp_path))
    index.students = {"1": "student-1", "2": "student-2"}
    save_index(str(tmp_path), index)
    pipe = TextToImage.from_folder(str(tmp_path))
    assert pipe.student(1).w_range == (1.0, 3.0) and pipe.student(2).w_range is None
    for w in (0.5, 3.5):
        with pytest.warns(UserWarning, match=rf"w = {w:g} is outside \[1, 3\].*student-1"):
            pipe.sample(["a red circle"], steps=1, guidance=w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in (1.0, 2.0, 3.0):                       # inside, the ends included
            pipe.sample(["a red circle"], steps=1, guidance=w)
        pipe.sample(["a red circle"], steps=2, guidance=8.0)     # no range known: no warning
        pipe.sample(["a red circle"], steps=1, guidance=8.0, teacher=True)  # the teacher takes any w


def test_shapes_model_warns_once_for_a_prompt_outside_its_captions(tmp_path, one_thread):
    save_random_model(str(tmp_path), resolution=32)
    pipe = TextToImage.from_folder(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.sample(["a corgi"], steps=1)                  # no data source recorded: nothing to say
    index = load_index(str(tmp_path))
    index.data = "shapes"
    save_index(str(tmp_path), index)
    pipe = TextToImage.from_folder(str(tmp_path))
    with pytest.warns(UserWarning, match=r"'a corgi' is not a shapes-world caption") as record:
        pipe.sample(["a corgi", "a red circle", "a corgi"], steps=1)
    assert len([w for w in record if "corgi" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.sample(["a corgi"], steps=1)                  # once a prompt, not once a call
        pipe.sample(["", "A  Red circle", "a large red circle on the left",     # what the tokenizer sees
                     "a blue square above a green triangle on a black background"], steps=1)


def test_cpu_start_up_leaves_triton_inductor_and_open_clip_unimported():
    """Without CUDA or the interpreter the kernels cannot run, and importing them (triton, torch._inductor
    through torch.library) was ~1.5 s of every CPU txt2img, open_clip (torchvision, torch._dynamo) ~2.5 s
    more for a tokenizer; backend="triton" still loads the kernels on demand."""
    import os
    import subprocess
    import sys
    code = ("import sys, torch; from ldm.pipeline import TextToImage; TextToImage.from_folder(); "
            "print(sorted(m for m in ('triton', 'torch._inductor', 'open_clip', 'torchvision') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"


@pytest.mark.parametrize("dtype, mean_err", [(torch.bfloat16, 0.02), (torch.float16, 0.003)])
def test_half_precision_networks_draw_close_to_fp32(tmp_path, one_thread, dtype, mean_err):
    """from_folder(dtype=...): the teacher's U-Net, the text encoder and a student (loaded later) hold their
    weights in bf16 / fp16, the sampler stays fp32, and the images stay close to the fp32 ones (8e-3 and 1e-3
    mean here for bf16 and fp16)."""
    random_model_with_student(tmp_path, w_features=16)
    full = TextToImage.from_folder(str(tmp_path), decoder_precision="fp32")
    half = TextToImage.from_folder(str(tmp_path), decoder_precision="fp32", dtype=dtype)
    assert next(half.unet.parameters()).dtype == dtype and next(half.text_encoder.parameters()).dtype == dtype
    for teacher in (True, False):
        a, _ = full.generate(["a red circle", "a blue square"], steps=2, teacher=teacher)
        b, info = half.generate(["a red circle", "a blue square"], steps=2, teacher=teacher)
        assert info["model"] == ("teacher" if teacher else "student-2") and b.dtype == torch.float32
        assert torch.isfinite(b).all() and 0 < (a - b).abs().mean() < mean_err
    assert next(half.student(2).parameters()).dtype == dtype
