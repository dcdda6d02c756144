"""Print one of the README's set-up commands, so CI runs exactly what the README says and the two cannot drift.

The README marks each command with an HTML comment on the line before its ```bash block:
`<!-- setup: tests -->` (install and run the tests) and `<!-- setup: main-job -->` (install and run the main job).
"""

import re
import sys
from pathlib import Path


def readme_command(name: str, readme: Path = Path(__file__).resolve().parent.parent / "README.md") -> str:
    text = readme.read_text()
    found = re.findall(rf"<!-- setup: {re.escape(name)} -->\n```bash\n(.*?)\n```", text, re.S)
    if len(found) != 1:
        raise SystemExit(f"README.md must mark exactly one ```bash block with <!-- setup: {name} -->, found {len(found)}")
    return found[0].strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
