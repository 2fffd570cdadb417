"""Errors the nodes raise, in words an artist can act on (all are the core's ``AdaFaceError``)."""

from ..adaface_core.errors import AdaFaceError


class UnsupportedClipError(AdaFaceError, ValueError):
    """The CLIP connected is not an SD1.5 text encoder of the subject tokens' width."""


class EmbeddingExistsError(AdaFaceError, FileExistsError):
    """Saving would overwrite an embedding file, and overwriting was not switched on."""
