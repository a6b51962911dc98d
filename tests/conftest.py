import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Tests run on the CPU with fixed seeds; keep thread counts small so the CI machine's two cores
# are not oversubscribed.
torch.set_num_threads(min(torch.get_num_threads(), 2))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
