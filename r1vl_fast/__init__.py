"""r1vl_fast: fast, exact StepGRPO (R1-VL) training for multimodal LLMs."""

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"


def _use_installed_build() -> None:
    """Run from a source checkout (``python -m r1vl_fast.train`` in the repository root, which puts the source folder
    first on sys.path) after ``pip install .``: the compiled matcher and ``r1vl_fast.kernels`` exist only in the
    installed copy, so this package also looks there."""
    here = Path(__file__).resolve().parent
    if any(here.glob("_keystep*")):
        return
    for entry in sys.path:
        installed = Path(entry or ".").resolve() / "r1vl_fast"
        if installed == here or not installed.is_dir():
            continue
        if any((installed / f"_keystep{s}").is_file() for s in importlib.machinery.EXTENSION_SUFFIXES):
            __path__.append(str(installed))  # type: ignore[name-defined]  # noqa: F821
            return


_use_installed_build()
