"""Shared by every test: one intra-op thread and a fixed seed. The tiny-config factories live in tests/tiny.py, the
helper scripts and servers in tests/helpers/."""

import pytest
import torch


# Tiny tensors gain nothing from intra-op threads, and spinning OpenMP threads on a busy 2-core runner can make a
# test 50x slower: one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
