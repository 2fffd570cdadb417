"""The face space stage 1 samples from: real photos' ArcFace vectors (slightly perturbed) ∪ random unit vectors.

Random IDs (probability ``random_id_prob``, reference 0.4) have no photo; the face-distillation loss
then starts its chain from the teacher's own x0 estimate (see ``losses_face``). All randomness comes
from the generator passed in, so a resumed run draws exactly what an uninterrupted one would.

A batch names its photos by index; the loss turns them into VAE latents through ``PhotoLatents``,
which encodes each photo once and serves it from memory afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .data import FaceImages
from .photo_latents import DEFAULT_CACHE_BYTES, PhotoLatents

logger = logging.getLogger(__name__)


@dataclass
class FaceBatch:
    id_vectors: torch.Tensor
    """``[B, D]`` unit vectors."""
    has_image: torch.Tensor
    """``[B]`` bool: True where the ID is a real photo's."""
    image_index: Optional[torch.Tensor] = None
    """``[B]`` long: the photo of each row in ``photos`` (-1 where ``has_image`` is False); None when no row has one."""
    photos: Optional[PhotoLatents] = None
    """Where the indexed photos' latents and masks come from."""
    class_words: Optional[list[Optional[str]]] = None
    """Per row, the photo's class word from ``class.txt`` (None: random ID or no metadata)."""


def id_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """The fixed random projection of wide ArcFace vectors onto a narrower (tiny) encoder."""
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randn(in_dim, out_dim, generator=g) / out_dim**0.5


class FaceSpace:
    def __init__(self, images: Optional[FaceImages], id_dim: int, random_id_prob: float, id_noise_std: float,
                 seed: int = 0, photo_cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.images = images
        self.photos = PhotoLatents(images, photo_cache_bytes) if images is not None and len(images) else None
        self.id_dim = id_dim
        self.random_id_prob = 1.0 if images is None or len(images) == 0 else random_id_prob
        self.id_noise_std = id_noise_std
        self.projection: Optional[torch.Tensor] = None
        if images is not None and images.id_vectors.shape[1] > id_dim:
            # Only tiny test/smoke models are narrower than ArcFace's 512-d: a fixed random projection
            # keeps real photos in play there (distinct faces stay distinct); real models never take this path.
            logger.warning("ID vectors are %d-d but the Arc2Face encoder is %d wide: projecting (tiny models only)",
                           images.id_vectors.shape[1], id_dim)
            self.projection = id_projection(images.id_vectors.shape[1], id_dim, seed)

    def _real_vectors(self, index: torch.Tensor) -> torch.Tensor:
        vectors = self.images.id_vectors[index]
        if self.projection is not None:
            vectors = vectors @ self.projection
        return F.normalize(vectors, dim=-1)

    def sample(self, batch_size: int, generator: torch.Generator) -> FaceBatch:
        is_random = torch.rand(batch_size, generator=generator) < self.random_id_prob
        ids = F.normalize(torch.randn(batch_size, self.id_dim, generator=generator), dim=-1)
        if self.images is None or bool(is_random.all()):
            return FaceBatch(ids, torch.zeros(batch_size, dtype=torch.bool))
        index = torch.randint(len(self.images), (batch_size,), generator=generator)
        noise = torch.randn(batch_size, self.id_dim, generator=generator) * self.id_noise_std
        real = F.normalize(self._real_vectors(index) + noise, dim=-1)
        ids = torch.where(is_random[:, None], ids, real)
        words = [None if is_random[row] else self.images.class_word(int(index[row])) for row in range(batch_size)]
        return FaceBatch(ids, ~is_random, torch.where(is_random, -1, index), self.photos, words)
