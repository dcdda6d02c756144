"""The package's layering: the model files travel alone as remote code, and no import runs upward."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "modeling_ctm"
MODEL_FILES = sorted(p.name for p in PACKAGE.glob("*_ctm.py")) + ["modeling_ctm.py"]


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as a dotted name inside the package ('' prefix for relative ones resolved)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_model_files_import_only_each_other():
    for name in MODEL_FILES:
        own = {m for m in _imports(PACKAGE / name) if m.startswith("modeling_ctm")}
        allowed = {f"modeling_ctm.{sibling[:-3]}" for sibling in MODEL_FILES}
        assert own <= allowed, (name, own - allowed)


def test_no_import_runs_upward():
    """memory/ may import the model files and itself; training/ and hub/ may import memory; sleep draws nothing."""
    for path in (PACKAGE / "memory").glob("*.py"):
        own = {m for m in _imports(path) if m.startswith("modeling_ctm")}
        upward = {m for m in own if m.startswith(("modeling_ctm.training", "modeling_ctm.hub", "modeling_ctm.fmri",
                                                  "modeling_ctm.cli", "modeling_ctm.experiments"))}  # fmt: skip
        assert not upward, (path.name, upward)
        assert "matplotlib" not in {m.split(".")[0] for m in _imports(path)}, path.name


def test_only_the_pictures_import_matplotlib():
    users = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "matplotlib" in {m.split(".")[0] for m in _imports(path)}
    }
    assert users == {"fmri.py"}


def test_the_top_level_exports_the_headline_objects_lazily():
    import subprocess
    import sys

    code = (
        "import sys, modeling_ctm\n"
        "assert 'modeling_ctm.memory.sleep' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "from modeling_ctm import (SleepCallback, HebbianPlasticityCallback, CTMOnlineSession, OnlineConfig,\n"
        "    CTMEpisodicMemory, HebbianPlasticity, PlasticityConfig, CTMTrainer)\n"
        "from modeling_ctm.memory.sleep import SleepCallback as direct\n"
        "assert SleepCallback is direct\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_top_level_model_cards_hold_the_packaged_template_and_the_tiny_run():
    """model_cards/ shows the template the package ships (one copy: a link to it) and the tiny run's cards."""
    from modeling_ctm.hub.cards import PHASE_CARD_TEMPLATE

    cards = PACKAGE.parent / "model_cards"
    assert (cards / "phase_checkpoint.md").resolve() == PHASE_CARD_TEMPLATE.resolve()
    assert (cards / "phase_checkpoint.md").read_text() == PHASE_CARD_TEMPLATE.read_text()
    tiny = sorted(p.name for p in (cards / "tiny").glob("*.md"))
    assert tiny == ["phase1-language.md", "phase2-thinking.md", "phase3-continuity.md", "phase4-online.md"]
    for name in tiny:
        text = (cards / "tiny" / name).read_text()
        assert text.startswith("---\n") and "library_name: transformers" in text and "model_name: ctm-tiny-" in text
