import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (released_oracle, strategies)
# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
# On a GPU machine, TRITON_INTERPRET=0 pytest tests/test_grpo_ops_cuda.py runs the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

from r1vl_fast.rewards import MathVerifier  # noqa: E402


@pytest.fixture(scope="session")
def verifier():
    with MathVerifier(timeout=20.0, workers=2, budget=120.0) as v:
        yield v


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo data (24 RL rows, 64 SFT rows) and a tiny Qwen2-VL: random weights (``init``), then briefly
    warmed up with SFT (``model``) so that its completions earn varied rewards."""
    from r1vl_fast.config import PRESETS, SFTConfig
    from r1vl_fast.demo.models import build_demo_model, demo_processing
    from r1vl_fast.demo.shapes import write_demo_data
    from r1vl_fast.recipes import run_sft

    root = tmp_path_factory.mktemp("tiny")
    paths = write_demo_data(root / "data", train=24, sft=64, eval=8, seed=3)
    processing = demo_processing(3136, 3136)
    build_demo_model(processing, seed=0).save_pretrained(root / "init")
    processing.save_pretrained(root / "init")
    sft = SFTConfig(**{**PRESETS["demo"][SFTConfig], "model_name_or_path": str(root / "init"),
                       "dataset": str(paths["sft"]), "output_dir": str(root / "sft"), "max_steps": 100,
                       "report_to": "none"})
    model = run_sft(sft)
    return {"root": root, "init": root / "init", "model": model, **paths}
