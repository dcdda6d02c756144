"""keep_freed_memory: large tensors come from the heap and stay there when freed, instead of a fresh mmap each time."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

from modeling_ctm.training import allocator
from modeling_ctm.training.recipe_config import RecipeConfigError, load_recipe_config, preset_path


# Prints glibc's mallinfo2 counters (bytes mmapped, bytes of heap) before, while and after a 64 MiB tensor lives. A
# fresh process, because the setting lasts for the life of the process that takes it.
PROBE = textwrap.dedent(
    """
    import ctypes, importlib.util, sys, torch
    # the module alone, by path: importing the package (transformers) would cost the test most of its time
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    if sys.argv[1] == "keep":
        assert allocator.keep_freed_memory()
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    def counters():
        info = libc.mallinfo2()
        return info.hblkhd, info.arena
    before = counters()
    x = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    during = counters()
    del x
    after = counters()
    print(*before, *during, *after)
    """
)
SIZE = 64 * 2**20


def counters(mode: str) -> dict:
    command = [sys.executable, "-c", PROBE, mode, allocator.__file__]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    values = list(map(int, result.stdout.split()))
    return {"mmapped": values[0::2], "heap": values[1::2]}  # each: before, during, after


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33 (mallopt and mallinfo2)")
def test_large_tensors_come_from_the_heap_and_stay():
    plain = counters("plain")
    # glibc's default: the tensor is a fresh mapping, unmapped when freed (its pages zeroed again on the next touch)
    assert plain["mmapped"][1] - plain["mmapped"][0] >= SIZE, plain
    assert plain["mmapped"][2] - plain["mmapped"][0] < SIZE, plain
    keep = counters("keep")
    assert keep["mmapped"][1] - keep["mmapped"][0] < SIZE, keep  # no mapping of its own
    assert keep["heap"][1] - keep["heap"][0] >= SIZE, keep  # the heap holds it
    assert keep["heap"][2] >= keep["heap"][1], keep  # and keeps the memory when it is freed


def test_recipe_config_checks_the_field(tmp_path):
    preset = tmp_path / "bad.yaml"
    text = preset_path("tiny").read_text().replace("keep_freed_memory: true", "keep_freed_memory: sometimes")
    preset.write_text(text)
    with pytest.raises(RecipeConfigError, match="keep_freed_memory"):
        load_recipe_config(preset)
    assert load_recipe_config("tiny").keep_freed_memory is True
