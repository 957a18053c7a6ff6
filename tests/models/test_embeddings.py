"""Textual-inversion files (ldm.models.embeddings): the same files, loaded into diffusers' pipeline with its
load_textual_inversion and into ours, give the same images; bad files and wrong models are refused by name."""
import pytest
import torch
from safetensors.torch import save_file

from sd_layouts import on_our_grid, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.embeddings import parse_embedding_arg, read_embedding
from ldm.models.from_diffusers import convert
from ldm.models.prompt_weights import parse_weighted, token_weights
from ldm.pipeline import DEFAULT_MODEL, TextToImage

diffusers = pytest.importorskip("diffusers")
WIDTH = TINY.clip["hidden_size"]


def write_embeddings(folder) -> dict:
    """One file per layout: {path: (word for FILE:WORD or None, the word diffusers is told, vectors)}."""
    g = torch.Generator().manual_seed(0)
    vec = lambda k: torch.randn(k, WIDTH, generator=g) * 0.5     # noqa: E731
    files = {}
    a = vec(1)
    save_file({"<a>": a}, str(folder / "diffusers-style.safetensors"))                # diffusers: {word: (1, D)}
    files[str(folder / "diffusers-style.safetensors")] = ("<a>", "<a>", a)
    b = vec(3)
    torch.save({"string_to_param": {"*": b}, "name": "ignored"}, str(folder / "bstyle.pt"))   # A1111 .pt
    files[str(folder / "bstyle.pt")] = (None, "bstyle", b)
    c = vec(2)
    save_file({"emb_params": c}, str(folder / "cfix.safetensors"))                    # A1111 .safetensors
    files[str(folder / "cfix.safetensors")] = (None, "cfix", c)
    return files


def test_embeddings_draw_what_diffusers_draws(tmp_path, one_thread):
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    prompts = ["a <a> in bstyle", "cfix cat"]
    before, _ = pipe.generate(prompts, steps=3, seed=0, negative="cfix")
    for path, (word, theirs_word, vectors) in write_embeddings(tmp_path).items():
        assert pipe.add_embedding(path, word) == (theirs_word, len(vectors))
        theirs.load_textual_inversion(path, token=theirs_word)
    assert pipe.text_encoder.tokenize(["bstyle"])[1].sum() == 2 + 3         # a 3-vector word is 3 tokens
    ours, info = pipe.generate(prompts, steps=3, seed=0, negative="cfix")
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(3), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    on_our_grid(theirs)
    with torch.no_grad():
        reference = theirs(prompts, negative_prompt=["cfix"] * 2, num_inference_steps=3, guidance_scale=1 + info["guidance"],
                           latents=noise, output_type="pt").images
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    assert (ours - before).abs().max() > 1e-2                                 # the new words did something
    weights = token_weights(pipe.text_encoder, parse_weighted("a (bstyle:1.5) cat"))   # emphasis covers all 3
    assert weights[2:5].tolist() == [1.5] * 3 and weights[1] == weights[5] == 1
    with pytest.raises(ValueError, match="'<a>' is already a token"):
        pipe.add_embedding(str(tmp_path / "diffusers-style.safetensors"), "<a>")


def test_bad_files_and_models_are_refused(tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="an SDXL embedding"):
        read_embedding(str(tmp_path / "xl.safetensors"))
    save_file({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="no embedding layout recognised"):
        read_embedding(str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable embedding file"):
        read_embedding(str(tmp_path / "junk.pt"))

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    torch.save({"string_to_param": {"*": Evil()}}, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="not a readable embedding file"):          # weights_only: never run
        read_embedding(str(tmp_path / "evil.pt"))
    save_file({"w": torch.zeros(1, 16)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="16 wide, this encoder's tokens 128"):   # the shapes model's scratch encoder
        TextToImage.from_folder(DEFAULT_MODEL).add_embedding(str(tmp_path / "narrow.safetensors"))
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    with pytest.raises(ValueError, match=f"16 wide, this CLIP's tokens {WIDTH}"):
        TextToImage.from_folder(str(tmp_path / "model")).add_embedding(str(tmp_path / "narrow.safetensors"))
    assert parse_embedding_arg("e.pt") == ("e.pt", None) and parse_embedding_arg("e.pt:<w>") == ("e.pt", "<w>")
    assert parse_embedding_arg(r"C:\e.pt") == (r"C:\e.pt", None)
