import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (released_oracle, strategies)
# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"

from r1vl_fast.rewards import MathVerifier  # noqa: E402


@pytest.fixture(scope="session")
def verifier():
    with MathVerifier(timeout=20.0, workers=2) as v:
        yield v
