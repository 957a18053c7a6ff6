"""setup(): output folder checks happen before training, the Accelerator follows the config."""
import pytest
import torch
from accelerate.utils import DistributedType

from ldm.training import TrainConfig, check_output_dir, seed_everything, setup


def test_unwritable_output_dir_is_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "run"                          # a folder cannot live inside a file
    with pytest.raises(PermissionError, match="output_dir .*a-file/run.* is not writable"):
        setup(TrainConfig(output_dir=str(bad), tracker="none"))


def test_too_little_free_disk_is_clear_error(tmp_path):
    with pytest.raises(OSError, match="run.* below train.min_free_disk_gb=123456.0"):
        check_output_dir(tmp_path / "run", min_free_gb=123456.0)


def test_setup_builds_accelerator_from_config(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), grad_accum=3, seed=7, tracker="tensorboard")
    accelerator = setup(cfg, project="unit")
    assert accelerator.gradient_accumulation_steps == 3
    assert accelerator.distributed_type == DistributedType.NO and accelerator.num_processes == 1
    if not torch.cuda.is_available():
        assert accelerator.device.type == "cpu"
    draw = torch.rand(2)
    seed_everything(7)                             # seed + process index 0
    assert torch.equal(draw, torch.rand(2))
    accelerator.log({"x": 1.0}, step=1)
    accelerator.end_training()
    assert list((tmp_path / "run" / "logs" / "unit").rglob("events.out.tfevents*"))
