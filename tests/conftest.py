import logging

import pytest
import torch

# Tiny CPU ops: one intra-op thread avoids OpenMP spin-waiting against the other test processes (torchrun
# workers, DataLoader workers) on a 2-core machine, which made some tests 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    logging.getLogger("ltxf").setLevel(logging.INFO)
