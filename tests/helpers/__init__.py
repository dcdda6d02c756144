"""What tests run beside them: the local Hub (hub_server.py), the scripts of the two-process tests
(distributed_*.py, run by torchrun or accelerate), and how to run them (processes.py)."""

from pathlib import Path


HELPERS = Path(__file__).resolve().parent
TESTS = HELPERS.parent
REPO = TESTS.parent


def assert_share_of(value: float, count: int) -> None:
    """`value` is a share of `count` items (an accuracy over `count` questions): k / count for a whole k. Unlike
    `0 <= value <= 1` this fails on a mean over the wrong items, a loss in its place, or a rescaled number."""
    assert 0 <= value <= 1 and abs(value * count - round(value * count)) < 1e-6, (value, count)
