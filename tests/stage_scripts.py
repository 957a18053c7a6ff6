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
