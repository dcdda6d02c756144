"""The README's quick start runs as written."""

import re
from pathlib import Path


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["generated"].shape == (1 + 1, 4 + 8)
    assert (tmp_path / "episode.safetensors").is_file() and (tmp_path / "tiny-ctm" / "modeling_ctm.py").is_file()


def test_readme_shows_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert command in ci and command in README.read_text()
    assert '-e ".[dev]"' in ci and 'pip install -e ".[dev]"' in README.read_text()
    assert "torch==2.13.0" in ci and "venv" in ci
