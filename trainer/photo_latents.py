"""The training photos as the losses use them: scaled VAE latents and latent-resolution face masks, cached.

Why a cache: a photo's latent (the posterior mean of a frozen VAE, no augmentation) and its mask never
change, yet decoding the file, resizing it and running the VAE encoder (1.08 TFLOP at 512x512, more
than a UNet forward) cost a good part of a training step. Each photo is therefore encoded once, the first
time it is drawn, and kept on the host (up to ``max_bytes``; each process and each stage keeps its own):
a photo drawn again is neither decoded nor encoded. Photos beyond the budget are encoded at every use.
Masks are read at that first use too, so ``images.fallback_masks`` must be set before training starts.

Each photo is encoded on its own (batch of one), so its latent does not depend on which batch first
needed it: a resumed run, whose cache starts empty, gets bit-identical latents.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

import torch

from adaface_core.devices import host_to_device

from .data import FaceImages, downsample_mask

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30
"""4 GiB: about 60k photos at 512x512 (64 KiB of fp32 latent and 4 KiB of mask each)."""
LOAD_THREADS = 4
"""Image decoding releases the GIL: a batch's uncached photos are read in parallel."""


class LatentEncoder(Protocol):
    """What the cache needs of ``trainer.models.Models``: its device and its VAE encode."""

    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...


class PhotoLatents:
    """``get(models, indices, latent_size)`` -> the photos' latents and masks on ``models.device``.

    ``hits`` counts rows served without encoding, ``misses`` photos encoded."""

    def __init__(self, images: FaceImages, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.images = images
        self.max_bytes = max(0, int(max_bytes))
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._bytes = 0
        self._full_logged = False
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        """Host memory the cached latents and masks hold."""
        return self._bytes

    def get(self, models: LatentEncoder, indices: Sequence[int], latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents ``[n, 4, s, s]``, masks ``[n, 1, s, s]`` in {0, 1}) of photos ``indices``, ``s = latent_size``;
        new tensors, so a caller may change them in place."""
        if not indices:
            return (torch.zeros(0, 4, latent_size, latent_size, device=models.device),
                    torch.zeros(0, 1, latent_size, latent_size, device=models.device))
        entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        misses = []
        for index in dict.fromkeys(int(i) for i in indices):
            entry = self._cache.get((index, latent_size))
            if entry is None:
                misses.append(index)
            else:
                entries[index] = entry
        self.hits += len(indices) - len(misses)
        self.misses += len(misses)
        for index, entry in zip(misses, self._encode(models, misses, latent_size)):
            entries[index] = entry
            self._store((index, latent_size), entry)
        latents = torch.stack([entries[int(i)][0] for i in indices])
        masks = torch.stack([entries[int(i)][1] for i in indices])
        return host_to_device(latents, models.device), host_to_device(masks, models.device, torch.float32)

    def _encode(self, models: LatentEncoder, indices: list[int], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not indices:
            return []
        if len(indices) == 1:
            loaded = [self.images.load(indices[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(LOAD_THREADS, len(indices))) as pool:
                loaded = list(pool.map(self.images.load, indices))
        out = []
        for pixels, mask in loaded:
            latent = models.encode_images(pixels[None])[0]
            if latent.shape[-1] != size:
                raise ValueError(f"VAE latents are {latent.shape[-1]} wide, expected {size}")
            latent_mask = downsample_mask(mask[None], (size, size))[0] > 0
            out.append((latent.float().cpu(), latent_mask))
        return out

    def _store(self, key: tuple[int, int], entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if self._bytes + size > self.max_bytes:
            if not self._full_logged and self.max_bytes > 0:
                logger.info("photo latent cache full (%.2f GiB, %d photos): the rest are encoded at every use "
                            "(raise data.photo_cache_gb to keep more)", self._bytes / 2**30, len(self._cache))
                self._full_logged = True
            return
        self._cache[key] = entry
        self._bytes += size
