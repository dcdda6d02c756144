"""Print pip constraints that pin every dependency of pyproject.toml (and the `dev` and `real`
extras, which the README's test command installs) to its lower bound, for
CI's second leg: the ranges must admit only versions the project has run."""

import re
from pathlib import Path

import tomllib


project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["dev"] + extras["real"]:
    match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*.*?>=\s*([0-9][^,;\s]*)", requirement)
    if match:
        print(f"{match.group(1)}=={match.group(3)}")
