"""A resumable download cache for official weights, with an offline mode that says what to place where."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

OFFLINE_VARS = ("DINOLLAMA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class OfflineError(RuntimeError):
    """A file is needed that is neither cached nor downloadable right now."""


def cache_dir() -> Path:
    """``$DINOLLAMA_HOME`` if set, else torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``).

    Sharing torch.hub's folder means files fetched by ``torch.hub.load`` are found here too.
    """
    if os.environ.get("DINOLLAMA_HOME"):
        return Path(os.environ["DINOLLAMA_HOME"]).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def _offline_message(url: str, dest: Path, why: str) -> str:
    return (
        f"{why}. Download {url} by other means and place it at {dest} "
        f"(or point DINOLLAMA_HOME at a folder that holds {dest.name})."
    )


def download(url: str, dest: Path, progress: bool = True, chunk: int = 1 << 20, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest``, resuming a ``.partial`` file with an HTTP range request."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    start = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the partial file is already complete
            os.replace(partial, dest)
            return dest
        raise OfflineError(_offline_message(url, dest, f"download failed with HTTP {e.code}")) from e
    except (urllib.error.URLError, OSError) as e:
        raise OfflineError(_offline_message(url, dest, f"cannot reach {urlparse(url).netloc} ({e})")) from e
    with response:
        resumed = start and response.status == 206
        total = response.length + (start if resumed else 0) if response.length is not None else None
        mode = "ab" if resumed else "wb"
        with open(partial, mode) as f, tqdm(
            total=total, initial=start if resumed else 0, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as bar:
            while block := response.read(chunk):
                f.write(block)
                bar.update(len(block))
    os.replace(partial, dest)
    return dest


def fetch(url: str, progress: bool = True, filename: str | None = None) -> Path:
    """The cached copy of ``url``, downloaded first unless present or offline."""
    dest = cache_dir() / (filename or Path(urlparse(url).path).name)
    if dest.exists():
        return dest
    if is_offline():
        raise OfflineError(_offline_message(url, dest, f"{dest.name} is not cached and offline mode is on"))
    return download(url, dest, progress=progress)


__all__ = ["OfflineError", "cache_dir", "download", "fetch", "is_offline"]
