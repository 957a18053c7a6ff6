"""No unsafe deserialisation anywhere in the package; fp16 decoding of large latents stays finite."""
import ast

import pytest
import torch

import reliability_harness as h
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL

SOURCES = [h.ROOT / "ldm", h.ROOT / "kernels", h.ROOT / "stages"]
SAFE_LOADERS = {"SafeLoader", "CSafeLoader"}


def _dotted(node: ast.AST) -> str:
    """`torch.load` for Attribute(Name('torch'), 'load'); '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what' for each torch.load without weights_only=True, yaml.load without a safe
    Loader, pickle/dill load(s), and numpy load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name, where = _dotted(node.func), f"{filename}:{node.lineno}"
        if name in ("torch.load", "torch.serialization.load"):
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: {name} without weights_only=True")
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if name != "yaml.load" or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_LOADERS:
                found.append(f"{where}: {name} without SafeLoader")
        elif name.split(".")[0] in ("pickle", "_pickle", "dill") and name.endswith((".load", ".loads", ".Unpickler")):
            found.append(f"{where}: {name}")
        elif name in ("np.load", "numpy.load"):
            flag = _keyword(node, "allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                found.append(f"{where}: {name} with allow_pickle=True")
    return found


def test_the_checker_finds_unsafe_loads():
    bad = ("import torch, yaml, pickle\n"
           "torch.load('a.pt')\n"
           "torch.load('a.pt', weights_only=False)\n"
           "yaml.load(open('c.yaml'))\n"
           "yaml.load(s, Loader=yaml.FullLoader)\n"
           "pickle.load(open('b.pkl', 'rb'))\n"
           "pickle.loads(b'')\n")
    assert [line.split(":")[1] for line in unsafe_calls(bad)] == ["2", "3", "4", "5", "6", "7"]
    good = ("torch.load('a.pt', map_location='cpu', weights_only=True)\n"
            "yaml.safe_load(s)\n"
            "yaml.load(s, Loader=yaml.SafeLoader)\n"
            "pickle.dumps(1)\n")
    assert unsafe_calls(good) == []


def test_package_sources_have_no_unsafe_loads():
    files = [p for folder in SOURCES for p in sorted(folder.rglob("*.py"))]
    assert len(files) > 20, "the source folders moved: update SOURCES"
    found = [hit for f in files for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(h.ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("guard", ["float32", "bfloat16"])
def test_fp16_decode_latents_of_large_latents_is_finite(guard):
    # tests/models/test_autoencoder.py checks AutoencoderKL.decode; this is the pipeline's entry,
    # decode_latents, whose division by scaling_factor also runs in fp16.
    torch.manual_seed(0)
    cfg = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, z_channels=4, num_groups=4,
               mid_attn=False, scaling_factor=0.18215)
    ae = AutoencoderKL(AutoencoderConfig(**cfg, fp16_decode_dtype="float16")).eval()
    with torch.no_grad():
        ae.decoder.conv_in.weight.mul_(100.0)                        # activations past 65504 in fp16
    ae.half()
    z = (2000 * torch.randn(2, 4, 8, 8)).half()                      # z / scaling_factor still < 65504
    with torch.no_grad():
        assert not torch.isfinite(ae.decode_latents(z)).all()        # unguarded fp16 overflows: the test can fail
        ae.config.fp16_decode_dtype = guard
        images = ae.decode_latents(z)
    assert images.dtype == torch.float16 and torch.isfinite(images).all()
