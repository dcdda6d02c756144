# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Atomic files: every file the project writes goes through here, so a reader (or a process killed at any moment)
sees the previous version or the new one, never a part; and safetensors loads whose errors name the file.

Travels with checkpoints as remote code (imported by `modeling_ctm.py`)."""

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush `tmp` to disk, give it the mode a plain `open()` would (0o666 & ~umask: temp files from `mkstemp` and
    safetensors are private, 0600) and rename it over `path` (atomic on POSIX and Windows)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write `path` so that a reader (or a process killed at any moment) sees the previous version or the new one,
    never a part: `write(tmp)` fills a temp file in the same folder, which `publish_file` then renames into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_json_atomically(path: str | os.PathLike, payload, indent: int | None = 2) -> None:
    """`atomic_write` of `json.dumps(payload, indent=indent)`."""
    write_text_atomically(path, json.dumps(payload, indent=indent))


def replace_folder_atomically(folder: str | os.PathLike, fill: Callable[[str], object]) -> object:
    """Replace a whole folder: `fill(tmp)` writes the new contents into a sibling `<folder>.tmp`, which is then swapped
    into place; returns what `fill` returned. A process killed at any moment leaves the previous folder or the new
    one, never a mix (a kill between the two renames leaves the previous one as `<folder>.old`, which the next
    replacement puts back first)."""
    folder = os.path.abspath(os.fspath(folder))
    tmp, old = folder + ".tmp", folder + ".old"
    if os.path.exists(old) and not os.path.exists(folder):
        os.rename(old, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    os.makedirs(tmp)
    result = fill(tmp)
    if os.path.exists(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return result


def save_folder_atomically(save: Callable[[str], object], save_directory: str) -> object:
    """Run `save(staging)` (e.g. `PreTrainedModel.save_pretrained`) into a private staging folder inside
    `save_directory`, then rename each file it wrote into place with the usual permissions (`publish_file`), the
    config last; returns what `save` returned. A process killed during the save leaves the previous weights file
    whole and loadable: a reader sees the old files or the new ones, never a half-written one."""
    os.makedirs(save_directory, exist_ok=True)
    for name in os.listdir(save_directory):  # what a save killed earlier left behind (one saver per folder)
        if name.startswith(".saving-"):
            shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)
    staging = tempfile.mkdtemp(dir=save_directory, prefix=".saving-")
    try:
        result = save(staging)
        written = sorted(os.listdir(staging), key=lambda name: name == "config.json")  # the config goes last
        weights = {name for name in written if name.endswith(".safetensors") or name.endswith(".index.json")}
        for name in os.listdir(save_directory):  # stale shards of an earlier, differently sharded save
            if name.startswith("model") and name.endswith((".safetensors", ".index.json")) and name not in weights:
                os.remove(os.path.join(save_directory, name))
        for name in written:
            source = os.path.join(staging, name)
            if os.path.isfile(source):
                publish_file(source, os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def unreadable_weights(folder: str | os.PathLike, error: SafetensorError) -> OSError:
    """The error for a `from_pretrained` whose safetensors load failed: it names the first unreadable weights file
    of `folder` (or the folder, or the Hub id), which safetensors' own message does not."""
    folder = os.fspath(folder)
    broken = folder
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(folder, name), framework="pt") as handle:
                        handle.keys()
                except SafetensorError:
                    broken = os.path.join(folder, name)
                    break
    return OSError(
        f"{broken} is not a readable safetensors file (truncated or corrupted?): {error}. Save the model "
        "again or download it again."
    )


def load_safetensors_file(
    path: str | os.PathLike, device: str = "cpu", require_finite: bool = False
) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` whose errors name the file (safetensors' own do not). With `require_finite`, a
    file holding an inf or NaN is refused (a memory or state that would turn every later forward non-finite)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        tensors = load_file(path, device=device)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    if require_finite:
        refuse_non_finite(tensors, path)
    return tensors


def refuse_non_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Raise naming the file and the first tensor that holds an inf or NaN."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{os.fspath(path)}: tensor {name} holds non-finite values (inf or NaN); refusing to load it "
                "(it would make every forward that reads it non-finite)"
            )
