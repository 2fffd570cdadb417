"""Errors a user can act on: each message says what was expected and where."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


class AdaFaceError(Exception):
    """Base class for every error this package raises on purpose."""


class ModelFileMissingError(AdaFaceError, FileNotFoundError):
    """A model file or folder is not where it must be put by hand (nothing is ever downloaded)."""


class NoFaceError(AdaFaceError, ValueError):
    """No usable face was found in a photo (or in any of the given photos)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message
        """What was wrong with the photo, without the advice: what a list of skipped photos shows."""


class CheckpointError(AdaFaceError, ValueError):
    """A checkpoint is corrupt, of an unknown format, or does not match its configuration."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something the restricted unpickler will not create or call."""


class PlaceholderError(AdaFaceError, ValueError):
    """A prompt lacks the placeholder word that marks where the subject goes."""


class ConfigError(AdaFaceError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class WriteError(AdaFaceError, OSError):
    """A file could not be written (a full disk, a size limit, a read-only folder); nothing was replaced."""


def git_lfs_hint(path: Union[str, os.PathLike]) -> str:
    """A sentence for an unreadable model file that is a Git LFS pointer, else "". A clone of a Hugging Face
    repository made without git-lfs holds ~130-byte text stand-ins of the same names, which every reader
    rejects with its own puzzling error ("Protobuf parsing failed", "header too large")."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(GIT_LFS_POINTER))
    except OSError:
        return ""
    if head != GIT_LFS_POINTER:
        return ""
    return (f" {Path(path).name} is a Git LFS pointer, not the model: the repository was cloned without git-lfs. "
            "Run `git lfs pull` in it, or download the file from the model page.")
