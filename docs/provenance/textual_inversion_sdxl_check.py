"""stages/train_embedding.py on a tiny random SDXL import: 2 steps train a 2-vector word for both CLIPs, and the file
(clip_l + clip_g) gives in diffusers' StableDiffusionXLPipeline (load_textual_inversion once per encoder) the
context and pooled vector ours gives. Too slow for the suite (the tiny SDXL pipeline alone takes ~25 s to write).

    OMP_NUM_THREADS=2 python docs/provenance/textual_inversion_sdxl_check.py [WORKDIR]

Session result (2-core CPU, shared): max |ours - diffusers| 0.0 for the context and 0.0 for the pooled vector.
"""
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(work: Path) -> None:
    from ldm.models.from_diffusers import convert
    from ldm.pipeline import TextToImage
    layouts = load("sd_layouts", ROOT / "tests" / "models" / "sd_layouts.py")
    stage = load("train_embedding_stage", ROOT / "stages" / "train_embedding.py")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    theirs = layouts.write_sdxl_pipeline(work)
    convert(str(work / "sdxl"), str(work / "model"))
    pictures = work / "pictures"
    pictures.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(pictures / f"{i}.png")
    out = stage.main([f"model={work / 'model'}", "data.source=imagefolder", f"data.path={pictures}", "data.resolution=32",
                      "concept=''", 'templates=["a photo of {}"]', "embedding.word=<w>", "embedding.init_word=cat",
                      "embedding.vectors=2", "train.batch_size=2", "train.lr=0.05", f"train.output_dir={work / 'run'}",
                      "train.max_steps=2", "train.validate_every=2", "train.tracker=none", "train.min_free_disk_gb=0",
                      "val.steps=2", "val.images=2"])
    vectors = load_file(str(out))
    print({k: tuple(v.shape) for k, v in vectors.items()})
    ours = TextToImage.from_folder(str(work / "model"))
    print("ours:", ours.add_embedding(str(out)))
    theirs.load_textual_inversion(vectors["clip_l"], token="<w>", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(vectors["clip_g"], token="<w>", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    prompt = "a photo of <w>"
    with torch.no_grad():
        cond = ours.encode_prompts([prompt])
        context, _, pooled, _ = theirs.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    print(f"max |ours - diffusers|: context {(cond['context'] - context).abs().max().item():.3g}, "
          f"pooled {(cond['pooled'] - pooled).abs().max().item():.3g}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ti-sdxl-check"))
