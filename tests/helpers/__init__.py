"""What tests run beside them: the local Hub (hub_server.py), the scripts of the two-process tests
(distributed_*.py, run by torchrun or accelerate), and how to run them (processes.py)."""

from pathlib import Path


HELPERS = Path(__file__).resolve().parent
TESTS = HELPERS.parent
REPO = TESTS.parent
