"""Fashion-MNIST (Zalando product photos, MIT licence): locate, fetch from Debian's package, and load."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from common.config import cache_dir
from common.errors import VitrineError

log = logging.getLogger(__name__)

#: Class names in label order, as published with the data set.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _candidates() -> list[Path]:
    env = os.environ.get("VITRINE_FASHION_MNIST_DIR")
    dirs = [Path(env)] if env else []
    return dirs + [_SYSTEM_DIR, cache_dir() / "datasets" / "fashion-mnist"]


def find_dir() -> Path | None:
    """The first folder holding all four idx files, or None."""
    for d in _candidates():
        if all((d / f).is_file() for pair in _FILES.values() for f in pair):
            return d
    return None


def fetch() -> Path:
    """Return the data folder, downloading Debian's package (no root needed) into the cache when missing."""
    found = find_dir()
    if found is not None:
        return found
    target = cache_dir() / "datasets" / "fashion-mnist"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise VitrineError(
            "Fashion-MNIST not found and apt-get/dpkg-deb are unavailable: install the Debian package "
            f"{DEBIAN_PACKAGE} or set VITRINE_FASHION_MNIST_DIR to a folder with the four idx .gz files"
        )
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading Debian package %s", DEBIAN_PACKAGE)
        try:
            subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, check=True,
                           capture_output=True, text=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True,
                           capture_output=True, text=True)
        except (subprocess.CalledProcessError, StopIteration) as e:
            detail = getattr(e, "stderr", "") or "no .deb downloaded"
            raise VitrineError(f"could not fetch {DEBIAN_PACKAGE}: {detail.strip()[:300]}") from e
        target.mkdir(parents=True, exist_ok=True)
        for f in (f for pair in _FILES.values() for f in pair):
            shutil.copy(Path(tmp) / "root" / _SYSTEM_DIR.relative_to("/") / f, target / f)
    return target


def load(split: str = "train", fetch_missing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 ``[N, 28, 28]`` and labels as int64 ``[N]`` for ``split`` in {'train', 'test'}."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test'. Got {split!r}")
    d = fetch() if fetch_missing else find_dir()
    if d is None:
        raise VitrineError(f"Fashion-MNIST not found in {', '.join(map(str, _candidates()))}")
    images_file, labels_file = _FILES[split]
    with gzip.open(d / labels_file, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    with gzip.open(d / images_file, "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(len(labels), 28, 28)
    return images, labels
