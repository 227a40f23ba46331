"""Feature extraction over many images: parallel decoding, resumable chunks, torchrun sharding.

Work is cut into chunks of consecutive inputs; each finished chunk is written atomically into
``<out>.parts/``, so an interrupted run resumes where it stopped. Under ``torchrun`` each rank
takes every ``world``-th input and rank 0 merges the parts into the output file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import ImageLoadError
from ..data.datasets import FileSource, Transformed, collate_skipping_errors
from ..distributed import rank_world

FORMATS = (".safetensors", ".npy", ".parquet")


@dataclass
class EmbedResult:
    paths: list[str]
    cls: torch.Tensor
    patch: torch.Tensor | None = None
    failed: dict[str, str] = field(default_factory=dict)


def embed_paths(
    model: torch.nn.Module,
    paths: Sequence[str | os.PathLike],
    transform: Callable,
    parts_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    workers: int = 2,
    patch_tokens: bool = False,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1024,
    on_error: str = "skip",
    progress: bool = True,
) -> None:
    """Write this rank's feature chunks into ``parts_dir``, skipping chunks already there."""
    rank, world = rank_world()
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    files = FileSource(paths)
    mine = list(range(rank, len(paths), world))
    chunks = [mine[i : i + chunk_size] for i in range(0, len(mine), chunk_size)]
    todo = [(c, idx) for c, idx in enumerate(chunks) if not (parts_dir / f"rank{rank}-{c:06d}.safetensors").exists()]
    device = next(model.parameters()).device
    bar = tqdm(total=sum(len(i) for _, i in todo), unit="img", desc=f"embed[{rank}]" if world > 1 else "embed",
               disable=not progress or (rank != 0), file=sys.stderr)
    for c, indices in todo:
        loader = DataLoader(Transformed(files, indices, transform), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_skipping_errors, persistent_workers=False)
        got_idx, got_cls, got_patch, errors = [], [], [], {}
        for index, images, errs in loader:
            for i, msg in errs:
                if on_error == "fail":
                    raise ImageLoadError(paths[i], msg.split(": ", 1)[-1])
                tqdm.write(f"skipping {msg}", file=sys.stderr)
                errors[str(i)] = msg
            if images is not None:
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    if patch_tokens:
                        out = model.forward_features(images.to(device))
                        cls = out["x_norm_clstoken"]
                        got_patch.append(out["x_norm_patchtokens"].float().cpu())
                    else:
                        cls = model(images.to(device))  # class token only: less work in the last block
                got_idx.append(index)
                got_cls.append(cls.float().cpu())
            bar.update(len(index) + len(errs))
        tensors = {
            "index": torch.cat(got_idx) if got_idx else torch.zeros(0, dtype=torch.long),
            "cls": torch.cat(got_cls) if got_cls else torch.zeros(0, model.embed_dim),
        }
        if patch_tokens and got_patch:
            tensors["patch"] = torch.cat(got_patch)
        tmp = parts_dir / f"rank{rank}-{c:06d}.tmp"
        save_file(tensors, str(tmp), metadata={"errors": json.dumps(errors)})
        os.replace(tmp, parts_dir / f"rank{rank}-{c:06d}.safetensors")
    bar.close()


def merge_parts(paths: Sequence[str | os.PathLike], parts_dir: str | os.PathLike) -> EmbedResult:
    """All chunks of all ranks, in input order."""
    from safetensors import safe_open

    idx, cls, patch, failed = [], [], [], {}
    for part in sorted(Path(parts_dir).glob("rank*-*.safetensors")):
        t = load_file(str(part))
        with safe_open(str(part), "pt") as f:
            errors = json.loads((f.metadata() or {}).get("errors", "{}"))
        failed.update({str(paths[int(i)]): msg for i, msg in errors.items()})
        idx.append(t["index"])
        cls.append(t["cls"])
        if "patch" in t:
            patch.append(t["patch"])
    index = torch.cat(idx)
    order = torch.argsort(index)
    return EmbedResult(
        paths=[str(paths[i]) for i in index[order].tolist()],
        cls=torch.cat(cls)[order],
        patch=torch.cat(patch)[order] if patch else None,
        failed=failed,
    )


def write_features(result: EmbedResult, out: str | os.PathLike, model_name: str = "") -> list[Path]:
    """Save features as ``.safetensors`` (cls/patch + paths in metadata), ``.npy`` or ``.parquet``.

    Every format gets a ``<out>.paths.txt`` sidecar with one input path per feature row.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    if out.suffix == ".safetensors":
        tensors = {"cls": result.cls}
        if result.patch is not None:
            tensors["patch"] = result.patch
        meta = {"paths": json.dumps(result.paths), "model": model_name, "failed": json.dumps(result.failed)}
        save_file(tensors, str(out), metadata=meta)
    elif out.suffix == ".npy":
        np.save(out, result.cls.numpy())
        if result.patch is not None:
            written.append(out.with_suffix(".patch.npy"))
            np.save(written[-1], result.patch.numpy())
    elif out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("writing .parquet needs pyarrow: pip install 'dinollama[parquet]'") from None
        cols = {"path": result.paths, "cls": list(result.cls.numpy())}
        if result.patch is not None:
            cols["patch"] = list(result.patch.flatten(1).numpy())
        pq.write_table(pa.table(cols), out)
    else:
        raise ValueError(f"{out}: output must end in one of {', '.join(FORMATS)}")
    sidecar = out.with_name(out.name + ".paths.txt")
    sidecar.write_text("".join(p + "\n" for p in result.paths))
    written.append(sidecar)
    return written


def read_features(path: str | os.PathLike) -> EmbedResult:
    """Features written by :func:`write_features` (any format)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".paths.txt")
    paths = sidecar.read_text().splitlines() if sidecar.exists() else []
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return EmbedResult(json.loads(meta.get("paths", "[]")) or paths, t["cls"], t.get("patch"),
                           json.loads(meta.get("failed", "{}")))
    if path.suffix == ".npy":
        patch_file = path.with_suffix(".patch.npy")
        patch = torch.from_numpy(np.load(patch_file)) if patch_file.exists() else None
        return EmbedResult(paths, torch.from_numpy(np.load(path)), patch)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow: pip install 'dinollama[parquet]'") from None
    table = pq.read_table(path).to_pydict()
    cls = torch.tensor(np.stack(table["cls"]), dtype=torch.float32)  # the lists come back as Python floats
    patch = (torch.tensor(np.stack(table["patch"]), dtype=torch.float32).reshape(len(cls), -1, cls.shape[1])
             if "patch" in table else None)
    return EmbedResult(table["path"], cls, patch)
