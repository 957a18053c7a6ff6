"""fp16 storage of model folders: half the bytes, loads back into fp32 modules, same outputs to fp16 rounding."""
import os
import stat

import pytest
import torch

from ldm.models.text import ScratchTextEncoder, TextEncoderConfig
from ldm.models.unet import UNet, tiny_config
from ldm.models.weights import load_state_dict_strict, write_safetensors


def test_unet_fp16_storage_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = UNet(tiny_config())
    unet.save_pretrained(str(tmp_path / "fp32"))
    unet.save_pretrained(str(tmp_path / "fp16"), dtype=torch.float16)
    size = {k: os.path.getsize(tmp_path / k / "model.safetensors") for k in ("fp32", "fp16")}
    assert size["fp16"] < 0.52 * size["fp32"]
    back = UNet.from_pretrained(str(tmp_path / "fp16"))
    assert all(p.dtype == torch.float32 for p in back.parameters())
    for name, p in unet.state_dict().items():   # every weight equals its fp16 rounding
        torch.testing.assert_close(back.state_dict()[name], p.half().float(), rtol=0, atol=0)


def test_text_encoder_fp16_storage_round_trip(tmp_path):
    enc = ScratchTextEncoder(TextEncoderConfig(width=32, depth=1, heads=2, max_length=16))
    enc.save_pretrained(str(tmp_path), dtype=torch.float16)
    back = ScratchTextEncoder.from_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(back(["a red circle"])[0], enc(["a red circle"])[0], atol=5e-3, rtol=5e-3)


def test_strict_load_names_missing_and_unexpected_keys():
    unet = UNet(tiny_config())
    state = dict(unet.state_dict())
    state.pop("out_conv.weight" if "out_conv.weight" in state else next(iter(state)))
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: \[.*\]; unexpected keys: \['bogus\.weight'\]"):
        load_state_dict_strict(unet, state, "test")


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_weights_are_as_readable_as_any_other_file(tmp_path):
    """safetensors >= 0.8 leaves its files 0600; ours get the mode open() gives under the umask."""
    old = os.umask(0o022)
    try:
        write_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
        (tmp_path / "plain.txt").write_text("x")
        os.umask(0o077)                                        # a private umask is kept too
        write_safetensors({"w": torch.ones(2)}, tmp_path / "private.safetensors")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("w.safetensors") == mode("plain.txt") == 0o644
    assert mode("private.safetensors") == 0o600
