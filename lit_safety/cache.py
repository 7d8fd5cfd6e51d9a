"""The on-disk cache of built artefacts (organism models and datasets, generated research data).

Everything lives under ``$LIT_SAFETY_HOME`` (default ``~/.cache/lit_safety``). An artefact is a
directory written to a staging directory and renamed into place with a checksum marker, so a partial
or corrupt artefact is detected and rebuilt, never half-used; a file lock serialises builders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable

MARKER = "lit_safety_complete.json"


def home() -> str:
    return os.path.expanduser(os.environ.get("LIT_SAFETY_HOME", os.path.join("~", ".cache", "lit_safety")))


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name != MARKER:
            with open(os.path.join(path, name), "rb") as f:
                sha.update(name.encode() + f.read())
    return sha.hexdigest()


def is_complete(path: str) -> bool:
    """True when ``path`` was fully written and no file changed since (checksum marker)."""
    sealed = checksum(path)
    try:
        return sealed is not None and sealed == _digest(path)
    except OSError:
        return False


def checksum(path: str) -> str | None:
    """The checksum sealed into artefact ``path``'s marker (read, not recomputed); None for a directory
    this cache did not publish."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def weights_checksum(path: str) -> str | None:
    """sha256 of the tensors in ``path``'s ``*.safetensors`` files (each tensor's name, dtype, shape and
    bytes, by name): what a model computes, not how it was saved. The files' own checksum (``checksum``)
    also covers the library versions written into config.json, so one set of weights saved under two
    versions of transformers would be two builds. None if ``path`` holds no safetensors."""
    tensors: dict[str, tuple[str, int, dict]] = {}  # name -> (file, offset of its data, spec)
    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        with open(os.path.join(path, name), "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        tensors.update({tensor: (name, 8 + length, spec) for tensor, spec in header.items() if tensor != "__metadata__"})
    if not tensors:
        return None
    sha = hashlib.sha256()
    for tensor, (name, data, spec) in sorted(tensors.items()):
        start, end = spec["data_offsets"]
        with open(os.path.join(path, name), "rb") as f:  # one tensor in memory at a time, at 8B scale too
            f.seek(data + start)
            sha.update(json.dumps([tensor, {"dtype": spec["dtype"], "shape": spec["shape"]}]).encode()
                       + f.read(end - start))
    return sha.hexdigest()


def staging(final: str) -> str:
    """A fresh, empty directory beside ``final`` to write an artefact into before ``publish``."""
    tmp = f"{final}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, final: str) -> None:
    """Seal ``tmp`` with its checksum marker and move it to ``final`` (replacing a stale copy)."""
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"sha256": _digest(tmp)}, f)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def lock(name: str):
    """A file lock named ``name`` in the cache, held while one process builds an artefact."""
    from filelock import FileLock

    os.makedirs(home(), exist_ok=True)
    return FileLock(os.path.join(home(), f"{name}.lock"))


def built(final: str, write: Callable[[str], None], lock_name: str | None = None) -> str:
    """``final``, unless a complete copy is there written by ``write(directory)`` into a staging
    directory and published, under the lock ``lock_name`` (default: ``final``'s name)."""
    if not is_complete(final):
        with lock(lock_name or os.path.basename(final)):
            if not is_complete(final):
                tmp = staging(final)
                write(tmp)
                publish(tmp, final)
    return final
