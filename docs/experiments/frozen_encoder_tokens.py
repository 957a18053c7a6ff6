"""Session-7 check (docs/stage2-latent.md): per-token feature distance between two prompts for a
random scratch text encoder at embed_std 0.02 and 1.0.  OMP_NUM_THREADS=1 python docs/experiments/frozen_encoder_tokens.py"""
import torch
from ldm.models.text import TextEncoderConfig, build_text_encoder
for std in (0.02, 1.0):
    torch.manual_seed(0)
    te = build_text_encoder(TextEncoderConfig(kind="scratch", width=128, depth=2, heads=4, max_length=32, embed_std=std)).eval()
    ps = ["a large red circle on the left", "a large red circle on the right", "a large blue circle on the left",
          "a red circle to the left of a blue square", "a blue square to the left of a red circle"]
    with torch.no_grad():
        c, m = te(ps)
    print("embed_std", std)
    for i in (1, 2):
        d = (c[i] - c[0])[m[0]].norm(dim=-1)
        print(f"  {ps[i]:<45}", " ".join(f"{v:5.2f}" for v in d.tolist()))
    d = (c[4] - c[3])[m[3]].norm(dim=-1)
    print(f"  {'swap order':<45}", " ".join(f"{v:5.2f}" for v in d.tolist()))
