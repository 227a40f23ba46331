"""Labelled image datasets in the layouts users have, with no metadata dumps to prepare.

``open_source(spec, split)`` understands:

- ``fashion-mnist`` / ``fashion-mnist:FOLDER`` / ``fashion-mnist:mini``: the IDX files (Debian's
  ``dataset-fashion-mnist``, a folder holding the official downloads, or the committed subset);
- ``imagenet:ROOT``: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG``, or a flat ``val/``
  labelled by Kaggle's ``ROOT/LOC_val_solution.csv``; class names from ``LOC_synset_mapping.txt``;
- a folder ``root/<class>/<image>`` (the class is the folder name; a folder of loose images has no labels);
- a ``.csv`` (``path,label`` columns, header optional) or ``.jsonl`` (``{"path": ..., "label": ...}``)
  list, paths relative to the list's folder; or a ``.txt`` list of paths (no labels).

Labels become class indices over ``classes``: sorted label names unless the caller passes the
training split's classes, so train and test agree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image
from .mnist import FASHION_CLASSES, load_fashion_mnist


class ImageSource:
    """Images by index as float ``(C, H, W)`` in [0, 1] or PIL RGB, with integer labels when known."""

    labels: Tensor | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Tensor:
        raise NotImplementedError

    def pil(self, i: int):
        from PIL import Image

        arr = (self.image(i).expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr)

    def name(self, i: int) -> str:
        """A printable identity of item ``i`` (a path, or ``#i``)."""
        return f"#{i}"


class ArraySource(ImageSource):
    """uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` held in memory (Fashion-MNIST, MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, classes: list[str] | None = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels) if labels is not None else None
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Tensor:
        """``(3, H, W)``, or ``(1, H, W)`` for grayscale data (the augmentations treat it as gray RGB)."""
        x = torch.tensor(self.images[i], dtype=torch.float32).div_(255)
        return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


class FileSource(ImageSource):
    """Image files with optional label names (mapped onto ``classes``)."""

    def __init__(self, paths: list[Path], label_names: list[str] | None = None, classes: list[str] | None = None,
                 display: dict[str, str] | None = None, where: str = "") -> None:
        self.paths = [Path(p) for p in paths]
        if label_names is not None:
            self.classes = list(classes) if classes is not None else sorted(set(label_names))
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted(set(label_names) - set(index))
            if unknown:
                raise ValueError(f"{where}: labels {unknown[:5]} are not classes of the training split "
                                 f"({len(self.classes)} classes, e.g. {self.classes[:3]})")
            self.labels = torch.tensor([index[n] for n in label_names])
            if display:
                self.classes = [display.get(c, c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Tensor:
        arr = np.asarray(load_image(self.paths[i]), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def pil(self, i: int):
        return load_image(self.paths[i])

    def name(self, i: int) -> str:
        return str(self.paths[i])


class Transformed(torch.utils.data.Dataset):
    """``(index, transform(source.pil(index)), None)`` for the listed indices, or ``(index, None, error)``
    for an unreadable image, so one bad file is reported by name instead of ending a long job."""

    def __init__(self, source: ImageSource, indices: list[int], transform) -> None:
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        try:
            return idx, self.transform(self.source.pil(idx)), None
        except ImageLoadError as e:
            return idx, None, str(e)


def collate_skipping_errors(items) -> tuple[Tensor, Tensor | None, list[tuple[int, str]]]:
    """Batch of :class:`Transformed` items: (indices, images or None, [(index, error)])."""
    ok = [(i, x) for i, x, err in items if err is None]
    return (torch.tensor([i for i, _ in ok], dtype=torch.long), torch.stack([x for _, x in ok]) if ok else None,
            [(i, err) for i, _, err in items if err is not None])


def _class_tree(root: Path) -> tuple[list[Path], list[str]] | None:
    """Images and folder names when ``root`` is ``root/<class>/<image>``, else None."""
    paths = list_images(root)
    if paths and all(p.parent.parent == root for p in paths):
        return paths, [p.parent.name for p in paths]
    return None


def _labelled_list(path: Path) -> tuple[list[Path], list[str] | None]:
    """Paths (relative to the list's folder) and labels of a csv/jsonl/txt list."""
    def resolve(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else path.parent / p

    paths, labels = [], []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "path" not in row:
                    raise ValueError(f"{path}:{n}: each line needs a 'path' field (and 'label' for labels)")
                paths.append(resolve(row["path"]))
                labels.append(None if row.get("label") is None else str(row["label"]))
    elif path.suffix == ".csv":
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r and not r[0].startswith("#")]
        header = [c.strip().lower() for c in rows[0]] if rows else []
        if header and header[0] in ("path", "filename", "file", "image"):
            rows = rows[1:]
            col = next((header.index(c) for c in ("label", "class", "target") if c in header), 1 if len(header) > 1 else None)
        else:
            col = 1 if rows and len(rows[0]) > 1 else None
        for r in rows:
            paths.append(resolve(r[0].strip()))
            labels.append(r[col].strip() if col is not None and col < len(r) else None)
    else:
        return list_images(path), None
    if any(lb is None for lb in labels):
        if all(lb is None for lb in labels):
            return paths, None
        raise ValueError(f"{path}: some rows have a label and some do not")
    return paths, labels


def _imagenet(root: Path, split: str, classes: list[str] | None) -> FileSource:
    split = {"test": "val", "validation": "val"}.get(split, split)
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (imagenet:ROOT expects ROOT/train and ROOT/val)")
    train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else None
    mapping = root / "LOC_synset_mapping.txt"
    display = {}
    if mapping.exists():
        for line in mapping.read_text().splitlines():
            wnid, _, names = line.partition(" ")
            display[wnid] = names.split(",")[0].strip()
    tree = _class_tree(folder)
    if tree is not None:
        paths, labels = tree
    else:
        solution = root / "LOC_val_solution.csv"
        if not solution.exists():
            raise FileNotFoundError(f"{folder} is flat: put Kaggle's LOC_val_solution.csv in {root}, or sort the images "
                                    f"into {folder}/<wnid>/ folders")
        by_id = {r[0]: r[1].split()[0] for r in csv.reader(solution.read_text().splitlines()[1:]) if r}
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        missing = [p.name for p in paths if p.stem not in by_id]
        if missing:
            raise ValueError(f"{solution}: no label for {missing[:3]} ({len(missing)} images)")
        labels = [by_id[p.stem] for p in paths]
    return FileSource(paths, labels, classes or train_classes, display, where=str(folder))


def open_source(spec: str, split: str = "train", classes: list[str] | None = None) -> ImageSource:
    """A dataset from a spec (see the module doc); ``split`` applies to fashion-mnist and imagenet."""
    kind, _, rest = spec.partition(":")
    if kind in ("fashion-mnist", "fmnist"):
        images, labels = load_fashion_mnist("test" if split in ("val", "test") else split, rest or None)
        return ArraySource(images, labels, FASHION_CLASSES)
    if kind == "imagenet":
        return _imagenet(Path(rest), split, classes)
    path = Path(spec)
    if path.is_dir():
        tree = _class_tree(path)
        if tree is not None:
            return FileSource(tree[0], tree[1], classes, where=spec)
        paths, labels = list_images(path), None
    elif path.is_file():
        paths, labels = _labelled_list(path)
    else:
        raise FileNotFoundError(f"{spec}: no such folder or file list (or use fashion-mnist[:FOLDER|:mini], imagenet:ROOT)")
    if not paths:
        raise ValueError(f"{spec}: no images found (give a folder of images, a file list, fashion-mnist or imagenet:ROOT)")
    return FileSource(paths, labels, classes, where=spec)
