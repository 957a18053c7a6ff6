"""The stage scripts as modules for the tests: stages/ is not a package, so each script is loaded from
its file, under the name `<stem>_stage`, registered in sys.modules before it runs so that its dataclasses
resolve their annotations. Registered as the module `stage_scripts` by tests/conftest.py."""
import importlib.util
import sys
from pathlib import Path

STAGES = Path(__file__).resolve().parents[1] / "stages"


def load_stage(stem: str):
    """stages/<stem>.py as a module, loaded once per session."""
    name = f"{stem}_stage"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, STAGES / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def save_tiny_ae(folder: Path, poison: bool = False) -> Path:
    """A random f=2 autoencoder saved like stage 1 saves one; `poison` puts a NaN in its encoder."""
    import torch

    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    torch.manual_seed(0)
    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                            num_groups=4, mid_attn=False, resolution=32, scaling_factor=0.5)
    ae = AutoencoderKL(cfg)
    if poison:
        with torch.no_grad():
            ae.encoder.conv_in.bias[0] = float("nan")
    ae.save_pretrained(folder)
    return folder


def train_latent(ae: Path, out: Path, *overrides: str) -> Path:
    """stages/train_latent.py on configs/latent/tiny.yaml with the autoencoder folder `ae`, writing `out`."""
    return load_stage("train_latent").main(["--config", str(STAGES.parent / "configs" / "latent" / "tiny.yaml"),
                                            f"autoencoder={ae}", f"train.output_dir={out}", *overrides])


def record_losses(monkeypatch, stage) -> list[float]:
    """The list that every training loss `stage` computes (its DiffusionLoss calls) is appended to."""
    losses = []

    class Recording(stage.DiffusionLoss):
        def __call__(self, *args, **kwargs):
            loss = super().__call__(*args, **kwargs)
            losses.append(loss.item())
            return loss
    monkeypatch.setattr(stage, "DiffusionLoss", Recording)
    return losses


def imported_model_config(model: Path, out: Path, net: str, diffusion: dict, **settings) -> Path:
    """A stage-2 YAML config (written beside `out`) that fine-tunes the imported tiny model folder `model`
    (an SD3 or FLUX.1 import): its own transformer config under the `net` section, its frozen text encoders,
    `diffusion`, a rank-4 LoRA, 3 steps of shapes at 32 px; `settings` add or replace top-level entries."""
    import json

    import yaml
    text = json.loads((model / "text_encoder" / "config.json").read_text())
    cfg = {"autoencoder": str(model / "autoencoder"), "init_from": str(model), "net": net,
           "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 2, "lr": 1e-2, "ema_decay": 0,
                     "checkpoint_every": 2, "log_every": 1, "validate_every": 3, "tracker": "none",
                     "min_free_disk_gb": 0},
           "data": {"source": "shapes", "resolution": 32, "length": 8},
           net: json.loads((model / "unet" / "config.json").read_text()),
           "text": {**text, "path": str(model / "text_encoder" / text["path"])},
           "diffusion": diffusion, "lora": {"rank": 4}, **settings}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lora_run_outputs(run: Path) -> tuple[Path, dict, set]:
    """After a 3-step stage-2 LoRA run in `run`: its last checkpoint is step 3 and holds the LoRA updates only,
    sample grids were written; returns (lora.safetensors, its tensors, the modules they name)."""
    from safetensors.torch import load_file

    from ldm.training import find_latest_checkpoint
    last = find_latest_checkpoint(run)
    saved = load_file(str(last / "model.safetensors"))
    assert last.name == "checkpoint-000003" and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    assert any((run / "samples").glob("*.png"))
    lora = run / "lora.safetensors"
    tensors = load_file(str(lora))
    return lora, tensors, {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
