import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (released_oracle, strategies)
# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
# On a GPU machine, TRITON_INTERPRET=0 pytest tests/test_grpo_ops_cuda.py runs the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

from r1vl_fast.rewards import MathVerifier  # noqa: E402


@pytest.fixture(scope="session")
def verifier():
    with MathVerifier(timeout=20.0, workers=2) as v:
        yield v
