import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A private, empty weight cache in offline mode."""
    monkeypatch.setenv("DINOLLAMA_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DINOLLAMA_OFFLINE", "1")
    return tmp_path / "cache"
