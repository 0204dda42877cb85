"""The artifact store: versioned output folders under any fsspec URI, with a `latest` pointer moved last."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from common.errors import NotFoundError
from common.refresher import Refresher

log = logging.getLogger(__name__)
T = TypeVar("T")

LATEST = "LATEST"  # a small text file holding the name of the newest finished version


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the file whole or not at all: locally a hidden temporary file renamed into
    place; on an object store one upload (an object appears complete when its PUT ends; a "rename" there would be a
    copy and a delete, slow and no more atomic)."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp"
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def upload_folder(folder: str | Path, uri: str) -> None:
    """Copy every file under the local ``folder`` to ``uri`` (a folder or any fsspec URI), keeping the layout."""
    fs, path = url_to_fs(uri)
    folder = Path(folder)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = f"{path.rstrip('/')}/{file.relative_to(folder).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
        fs.put_file(str(file), target)


@dataclass(frozen=True)
class ArtifactStore:
    """Artifacts live at ``<root>/<kind>/<name>/<version>/...``; ``<root>`` is a local path or a URI."""

    root: str

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = url_to_fs(self.root)
        return fs, path.rstrip("/")

    def path(self, *parts: str) -> str:
        """The URI of a file or folder below the root (keeps the root's protocol)."""
        return "/".join([self.root.rstrip("/"), *parts])

    def new_version(self, kind: str, name: str) -> str:
        """Create and return a fresh version id (UTC time, sortable) for ``kind/name``."""
        fs, base = self._fs()
        stamp = datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")
        fs.makedirs(f"{base}/{kind}/{name}/{stamp}", exist_ok=True)
        return stamp

    def publish(self, kind: str, name: str, version: str, manifest: dict) -> None:
        """Write the version's manifest, then point ``LATEST`` at it (readers never see half a version)."""
        fs, base = self._fs()
        with fs.open(f"{base}/{kind}/{name}/{version}/manifest.json", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        write_atomic(fs, f"{base}/{kind}/{name}/{LATEST}", version.encode())
        log.info("published %s/%s version %s", kind, name, version)

    def latest(self, kind: str, name: str) -> str | None:
        """The newest published version of ``kind/name``, or None when nothing was published."""
        fs, base = self._fs()
        pointer = f"{base}/{kind}/{name}/{LATEST}"
        if not fs.exists(pointer):
            return None
        with fs.open(pointer, "r") as f:
            return f.read().strip() or None

    def manifest(self, kind: str, name: str, version: str | None = None) -> dict:
        """The manifest of a version (default: latest); NotFoundError when there is none."""
        version = version or self.latest(kind, name)
        if version is None:
            raise NotFoundError(f"no published {kind} for {name!r} under {self.root}")
        fs, base = self._fs()
        with fs.open(f"{base}/{kind}/{name}/{version}/manifest.json", "r") as f:
            return json.load(f)


class LatestArtifact(Refresher[str, T | None]):
    """The latest published version of ``kind/name``, loaded, and loaded again when a newer one is published.

    A serving replica holds its rules or ranker this way, so ``vitrine rules`` or ``vitrine train ranker`` reach a
    running service without a redeploy: the ``latest`` pointer is looked at every ``check_s`` seconds (0: never
    after start-up) and a new version is loaded off the request path and swapped in whole (``value`` and
    ``version`` change together; see ``common.refresher``). A version that fails to load is logged and counted and
    the current one stays. ``value`` is None while nothing is published.
    """

    def __init__(self, store: ArtifactStore, kind: str, name: str, load: Callable[[str], T],
                 check_s: float = 30.0) -> None:
        super().__init__(version=lambda: store.latest(kind, name),
                         build=lambda version: load(version) if version is not None else None,
                         every_s=check_s, name=f"{kind}/{name}")
