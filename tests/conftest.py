import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import onnxgen  # noqa: E402,F401  (registers the domain)


@pytest.fixture
def rng(request):
    """Fresh random inputs per test, reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return np.random.default_rng(seed)
