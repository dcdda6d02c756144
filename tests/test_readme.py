"""The README's quick start runs as written."""

import re
import subprocess
import sys
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


def test_ci_runs_the_readme_test_command_read_from_the_readme():
    """The two cannot drift: .ci/run holds no test command of its own, it runs the README's marked line."""
    ci = (README.parent / ".ci" / "run").read_text()
    command = subprocess.run(
        [sys.executable, str(README.parent / ".ci" / "readme_command.py"), "tests"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert 'readme_command.py" tests' in ci and 'bash -euo pipefail -c "$command"' in ci
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")
    assert command.endswith('pip install -e ".[dev,real]" && python -m pytest -q')
    main_job = subprocess.run(
        [sys.executable, str(README.parent / ".ci" / "readme_command.py"), "main-job"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert "recipes/run_all.py --preset tiny" in main_job


def test_the_lower_bounds_leg_rewrites_the_install_of_the_readme_command():
    """.ci/run's second leg pins every dependency to its lower bound by rewriting the README's install with bash's
    `${command//pattern/...}`; a pattern that matches nothing (brackets are a bash pattern) silently skips the leg."""
    ci = (README.parent / ".ci" / "run").read_text()
    rewrite = next(line for line in ci.splitlines() if line.startswith("lowest_command="))
    command = subprocess.run(
        [sys.executable, str(README.parent / ".ci" / "readme_command.py"), "tests"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    rewritten = subprocess.run(
        ["bash", "-c", f'{rewrite}\nprintf "%s" "$lowest_command"'], env={"command": command, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert rewritten != command and rewritten.count(" -c constraints.txt") == 1
    assert 'pip install -e ".[dev,real]" -c constraints.txt && python -m pytest -q' in rewritten


def test_every_dependency_has_a_tested_lower_bound():
    """CI's second leg pins each dependency (and the dev and real extras) to its lower bound: every requirement must
    have one."""
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["dev"] + extras["real"]
    pins = subprocess.run(
        [sys.executable, str(README.parent / ".ci" / "lower_bounds.py")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(pins) == len(requirements) and all("==" in pin for pin in pins)
    for pin in pins:  # the README names the version it was last tested with
        name, version = pin.split("==")
        if name not in ("tensorboard", "matplotlib", "pyyaml", "pytest"):
            assert f"{name} {version}" in README.read_text(), pin
