"""Fashion-MNIST / MNIST IDX files: the Debian package's location, the official URLs, a committed subset."""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX array (optionally gzipped): magic 0x0000 dtype ndim, big-endian dims, then data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(dims))} values)")
    return arr.reshape(dims)


def write_idx(path: str | os.PathLike, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def mini_dir() -> Path:
    """The committed subset: 2000 training and 1000 test images of Fashion-MNIST."""
    return Path(str(resources.files("dinollama.data").joinpath("fashion_mnist_mini")))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` from ``root``, the Debian package or ``"mini"``.

    ``root="mini"`` selects the committed subset. Elsewhere download the four files from
    ``FASHION_URL`` into a folder and pass it as ``root``.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = mini_dir() if root == "mini" else Path(root) if root else DEBIAN_DIR
    img_file, lbl_file = (folder / f for f in FILES[split])
    if not img_file.exists():
        raise FileNotFoundError(
            f"{img_file} not found: install Debian's dataset-fashion-mnist package, or download "
            f"{FASHION_URL}/{FILES[split][0]} (and the labels) into a folder and pass it as root"
        )
    return read_idx(img_file), read_idx(lbl_file).astype(np.int64)
