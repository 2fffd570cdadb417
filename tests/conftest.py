"""Shared fixtures: tiny random models written once per session in the users' on-disk layouts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from adaface_core.tiny_face_models import write_tiny_face_pack  # noqa: E402
from adaface_core.tiny_models import (  # noqa: E402
    TinySpec,
    write_arc2face_folder,
    write_inverter_file,
    write_sd15_folder,
)


@dataclass(frozen=True)
class TinyModels:
    spec: TinySpec
    sd15: Path
    arc2face: Path
    inverter: Path

    @property
    def tokenizer(self) -> Path:
        return self.sd15 / "tokenizer"

    @property
    def encoder(self) -> Path:
        return self.arc2face / "encoder"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny_models")
    spec = TinySpec()
    return TinyModels(
        spec=spec,
        sd15=write_sd15_folder(spec, root / "sd15"),
        arc2face=write_arc2face_folder(spec, root / "arc2face"),
        inverter=write_inverter_file(spec, root / "adaface" / "tiny_inverter.safetensors"),
    )


@pytest.fixture(scope="session")
def face_pack(tmp_path_factory, tiny_models) -> Path:
    """A tiny antelopev2 pack whose ArcFace stand-in is as wide as the tiny encoder (64-d vectors)."""
    return write_tiny_face_pack(tmp_path_factory.mktemp("insightface") / "antelopev2", recognizer_dim=tiny_models.spec.hidden_size)


@pytest.fixture
def read_only_folder(monkeypatch):
    """Makes a folder refuse new files as a read-only mount does (chmod would not stop a test run as root)."""
    real_open, real_access = os.open, os.access

    def refuse_in(folder: Path) -> Path:
        def guarded_open(path, flags, *args):
            if flags & os.O_CREAT and Path(path).parent == folder:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)

        def guarded_access(path, mode, **kwargs):
            return not (mode & os.W_OK and Path(path) == folder) and real_access(path, mode, **kwargs)

        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(os, "open", guarded_open)
        monkeypatch.setattr(os, "access", guarded_access)
        return folder

    return refuse_in
