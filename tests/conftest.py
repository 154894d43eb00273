"""Shared fixtures: the real model (converted once into the repo's kvrag_data/models),
real data paths."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import rag  # noqa: F401  (sets HF offline flags before anything loads)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SHARED_DATA = REPO.parent / "shared" / "data"
MODELS_DIR = Path(os.environ.get("KVRAG_MODEL_CACHE_DIR", REPO / "kvrag_data" / "models"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS_DIR


@pytest.fixture(scope="session")
def lm32(models_dir):
    """SmolLM2-135M-Instruct at float32 (the dtype oracles are compared at)."""
    from rag.model.loader import load_model

    return load_model("", models_dir, "float32")


@pytest.fixture(scope="session")
def paragraphs() -> list[str]:
    """The sample documents' paragraphs of over 150 characters (real text for prompts)."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLES.glob("*.md")))
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 150]


@pytest.fixture
def settings(tmp_path, models_dir):
    from rag.config import Settings

    return Settings(
        data_dir=tmp_path / "data",
        model_cache_dir=models_dir,
        cache_disk_mb=256,
        cache_memory_mb=256,
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: on a machine with few cores, test processes running
    side by side would otherwise wait on each other's threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _private_redis():
    from tests.redis_server import PrivateRedis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_redis():
    """A redis-server of the test's own on a free port, which it may kill by pid and restart."""
    yield from _private_redis()


@pytest.fixture(scope="module")
def module_private_redis():
    """The same, shared by a module's tests."""
    yield from _private_redis()
