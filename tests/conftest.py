import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    logging.getLogger("ltxf").setLevel(logging.INFO)
