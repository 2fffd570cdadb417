"""Face photo -> ArcFace vector -> Arc2Face ID tokens -> AdaFace subject tokens, in one object.

``SubjectEncoder`` holds the three models; the results of identical photos are cached, since
artists re-run graphs with the same reference far more often than they change it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .arc2face import Arc2FaceEncoder
from .checkpoint import load_inverter
from .errors import ConfigError
from .face_analysis import FaceAnalyzer, IdentityResult, ImageInput
from .image_io import as_image_list, image_file, image_name, to_rgb_uint8
from .inverter import PromptInverter
from .subject import SubjectEmbedding
from .tokenizer import load_clip_tokenizer

logger = logging.getLogger(__name__)


def analysable(images: Sequence[ImageInput], names: Sequence[str]) -> list[ImageInput]:
    """Paths as given (their bytes are their content), anything else as the 8-bit RGB array face analysis
    reads: converted once, for both the cache key and the analysis. Why not key on the raw input: a palette
    image's array holds only indices, so two different pictures could share a key."""
    return [image if isinstance(image, (str, os.PathLike)) else to_rgb_uint8(image, name)
            for image, name in zip(images, names)]


def image_digest(images: Sequence[ImageInput]) -> str:
    """A content hash of ``analysable`` photos (files by bytes, arrays by shape and pixels)."""
    digest = hashlib.sha1()
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            digest.update(image_file(image).read_bytes())
        else:
            array = np.ascontiguousarray(image)
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class SubjectEncoder:
    """The face -> subject-tokens pipeline; ``faces`` may be None when only ID vectors are encoded."""

    def __init__(
        self,
        encoder: Arc2FaceEncoder,
        inverter: PromptInverter,
        faces: Optional[FaceAnalyzer] = None,
        cache_size: int = 32,
    ):
        if encoder.hidden_size != inverter.config.clip.hidden_size:
            raise ConfigError(
                f"the Arc2Face encoder is {encoder.hidden_size} wide but the inverter expects "
                f"{inverter.config.clip.hidden_size}: they do not belong together"
            )
        self.encoder = encoder.eval().requires_grad_(False)
        self.inverter = inverter.eval().requires_grad_(False)
        self.faces = faces
        self._cache: OrderedDict[str, tuple[SubjectEmbedding, IdentityResult]] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_paths(
        cls,
        inverter_path: Union[str, Path],
        encoder_dir: Union[str, Path],
        tokenizer_dir: Union[str, Path],
        faces: Optional[FaceAnalyzer] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "SubjectEncoder":
        """Loads the encoder folder, the tokenizer folder and the inverter file (no download, ever)."""
        encoder = Arc2FaceEncoder.from_folder(encoder_dir, load_clip_tokenizer(tokenizer_dir)).to(device, dtype)
        inverter = load_inverter(inverter_path, device=device, dtype=dtype)
        return cls(encoder, inverter, faces)

    @property
    def device(self) -> torch.device:
        return self.inverter.template_ids.device

    def to(self, device: Union[str, torch.device]) -> "SubjectEncoder":
        self.encoder.to(device)
        self.inverter.to(device)
        return self

    @torch.inference_mode()
    def encode_ids(self, id_vectors: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` unit ArcFace vectors -> ``[B, N, H]`` subject tokens (ID guidance 1)."""
        dtype = next(self.inverter.parameters()).dtype
        id_tokens = self.encoder(id_vectors.to(self.device, dtype)).id_tokens
        return self.inverter(id_tokens)

    def encode_vector(self, id_vector: torch.Tensor, sources: Sequence[str] = ()) -> SubjectEmbedding:
        """One identity from its ArcFace vector."""
        tokens = self.encode_ids(id_vector.reshape(1, -1))[0]
        with torch.inference_mode():
            pad = self.inverter.pad_embeddings()
        return SubjectEmbedding(
            tokens=tokens.float().cpu(),
            pad_embeds=pad.float().cpu(),
            id_vector=id_vector.reshape(-1).float().cpu(),
            sources=tuple(sources),
        )

    def encode_photos(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        names: Optional[Sequence[str]] = None,
        on_miss: Optional[Callable[[], None]] = None,
        on_photo: Optional[Callable[[int, int], None]] = None,
    ) -> tuple[SubjectEmbedding, IdentityResult]:
        """One identity from one or several photos; also returns the faces found (cached by content).

        ``on_miss`` runs only when the photos are not cached, before any model is used (ComfyUI loads the
        models onto the GPU there, so a repeated photo costs no model load). ``on_photo(done, total)`` runs
        after each photo analysed (``FaceAnalyzer.identity``).
        """
        if self.faces is None:
            raise ConfigError("this SubjectEncoder was built without face models")
        images = as_image_list(images)  # one photo, a list of them, or a BxHxWxC batch, as identity() takes
        names = list(names) if names is not None else [image_name(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise ConfigError(f"{len(names)} names for {len(images)} photos")
        images = analysable(images, names)
        key = image_digest(images) + "|" + "|".join(names)  # the names are part of what is returned
        if key in self._cache:
            self._cache.move_to_end(key)
            for note in self._cache[key][1].notes:  # the same photos warn each time, not only the first
                logger.warning("%s", note)
            return self._cache[key]
        if on_miss is not None:
            on_miss()
        identity = self.faces.identity(images, names, on_photo=on_photo)
        used = [face.name for face in identity.faces]
        subject = self.encode_vector(torch.as_tensor(identity.embedding), used)
        result = (subject, identity)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result
