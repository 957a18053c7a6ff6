"""Control images computed from pictures, for training and using ControlNets (ldm.models.controlnet).

    python -m ldm.data.hints photo.png edges.png [--controlnet DIR | --threshold 0.1]   # then --control-image edges.png

`edge_map` is a Sobel edge detector: the largest Sobel gradient magnitude over the R, G and B
channels (so a red shape on a green background of equal brightness still has an edge, which a
grey-level detector would miss), divided by 4 so that a unit step between two flat regions reads
1, and thresholded: white edges on black, in [0, 1] as ControlNets take control images. Edges are
two pixels wide (both sides of a step). Training computes the same map from each training image
(stages/train_controlnet.py, `hint: edges`), so the map a user draws with this module is the kind
the ControlNet saw.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


@torch.no_grad()
def edge_map(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, C, H, W) images in [-1, 1] -> (B, 3, H, W) edges in {0, 1}: max over channels of |Sobel| / 4 > threshold."""
    B, C, H, W = images.shape
    x = (images.float() + 1) / 2                                       # [0, 1]
    kernel = torch.stack([SOBEL_X, SOBEL_X.T]).to(x.device)[:, None]   # (2, 1, 3, 3): d/dx, d/dy
    padded = F.pad(x.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="replicate")  # no edge at the border
    grad = F.conv2d(padded, kernel).reshape(B, C, 2, H, W)
    magnitude = grad.pow(2).sum(2).sqrt().amax(1) / 4                  # (B, H, W)
    return (magnitude > threshold).to(images.dtype)[:, None].expand(B, 3, H, W).contiguous()


def trained_hint(controlnet: str) -> dict:
    """The hint.json of a ControlNet folder (or shipped name): {"hint": "edges", "edge_threshold": T} or {"hint": "column"}."""
    import json
    import os

    from ldm.models.controlnet import SHIPPED
    folder = controlnet if os.path.isdir(controlnet) else os.path.join(SHIPPED, controlnet)
    path = os.path.join(folder, "hint.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{controlnet}: no hint.json (not a ControlNet of stages/train_controlnet.py); "
                                "pass --threshold instead")
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.data.hints",
                                     description="Draw a ControlNet control image (Sobel edges) from a picture.")
    parser.add_argument("image", help="input picture (any PIL format)")
    parser.add_argument("out", help="output PNG: white edges on black")
    parser.add_argument("--threshold", type=float, default=None,
                        help="edge strength, as a share of a black-to-white step, above which a pixel is an edge "
                             "(default: the --controlnet's, else 0.1)")
    parser.add_argument("--controlnet", default=None, metavar="DIR",
                        help="draw what this ControlNet was trained on: its hint.json's threshold (a folder of "
                             "stages/train_controlnet.py, or a shipped name such as shapes64-edges)")
    args = parser.parse_args(argv)
    threshold = 0.1 if args.threshold is None else args.threshold
    if args.controlnet is not None:
        try:
            hint = trained_hint(args.controlnet)
        except (OSError, ValueError) as err:
            parser.error(str(err))
        if hint.get("hint") != "edges":
            parser.error(f"--controlnet {args.controlnet} was trained on {hint.get('hint')!r} control images, not edges")
        threshold = hint["edge_threshold"] if args.threshold is None else args.threshold
    from PIL import Image

    from ldm.data.transforms import open_image, to_tensor
    try:
        image = open_image(args.image)
    except (OSError, ValueError) as err:
        parser.error(f"cannot read {args.image}: {err}")
    edges = edge_map(to_tensor(image)[None], threshold)[0]
    Image.fromarray((edges[0] * 255).to(torch.uint8).numpy()).convert("RGB").save(args.out)
    print(f"{args.out}: {int(edges[0].sum())} edge pixels of {edges[0].numel()}")


if __name__ == "__main__":
    main()
