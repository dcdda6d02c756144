"""The package's layering: the model files travel alone as remote code, and no import runs upward."""

import ast
import sys
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


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every `import` statement anywhere in the file (inside
    functions and `if TYPE_CHECKING:` too). `from .a import b` is an edge to `a.b` when that is a module, else to `a`."""
    modules = {_module_name(path, package): path for path in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_parts[: len(package_parts) - node.level + 1]
                    module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                else:
                    module = node.module
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    targets.add(submodule if submodule in modules else module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import circle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_sees_a_type_checking_import(tmp_path):
    """The finder itself can fail: a circle closed only under `if TYPE_CHECKING:` is a circle."""
    package = tmp_path / "modeling_ctm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import other\n")
    (package / "c.py").write_text("from . import a\n")
    graph = import_graph(package)
    assert graph["modeling_ctm.c"] == {"modeling_ctm.a"}
    assert import_cycles(graph) == [["modeling_ctm.a", "modeling_ctm.b"]]


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "modeling_ctm.observers_ctm" in graph and "modeling_ctm.memory.plasticity" in graph  # the walk saw them
    assert import_cycles(graph) == []


def test_the_model_files_import_nothing_that_builds_on_them():
    """The model files import torch, transformers, safetensors, numpy, the standard library and each other: never
    memory/, training/, hub/, the pictures, the command line, or an eval/ module (harness, flops, ...)."""
    graph = import_graph()
    # triton: the fused kernels of kernels_ctm, imported only where CUDA runs (it ships with torch)
    libraries = {"torch", "triton", "transformers", "safetensors", "numpy", "modeling_ctm", *sys.stdlib_module_names}
    for name in MODEL_FILES:
        module = f"modeling_ctm.{name[:-3]}"
        above = {t for t in graph[module] if t.split(".")[1] in ("memory", "training", "hub", "fmri", "gauge", "cli")}
        assert not above, (module, above)
        outside = {m for m in _imports(PACKAGE / name) if m.split(".")[0] not in libraries}
        assert not outside, (module, outside)
    assert "modeling_ctm.modeling_ctm" not in graph["modeling_ctm.observers_ctm"]  # the observer never sees the model


def test_the_model_files_import_only_each_other():
    for name in MODEL_FILES:
        own = {m for m in _imports(PACKAGE / name) if m.startswith("modeling_ctm")}
        allowed = {f"modeling_ctm.{sibling[:-3]}" for sibling in MODEL_FILES}
        assert own <= allowed, (name, own - allowed)


def test_no_import_runs_upward():
    """memory/ may import the model files and itself; training/ and hub/ may import memory; sleep draws nothing."""
    for path in (PACKAGE / "memory").rglob("*.py"):
        own = {m for m in _imports(path) if m.startswith("modeling_ctm")}
        upward = {m for m in own if m.startswith(("modeling_ctm.training", "modeling_ctm.hub", "modeling_ctm.fmri",
                                                  "modeling_ctm.cli", "harness"))}  # fmt: skip
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
