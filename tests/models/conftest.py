"""Registers tests/models/sd_layouts.py as the module `sd_layouts` (pytest's importlib mode puts no test
folder on sys.path)."""
import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("sd_layouts", Path(__file__).with_name("sd_layouts.py"))
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)
