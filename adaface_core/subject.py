"""The subject embedding that travels from the face encoder to the prompt: tokens plus what made them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class SubjectEmbedding:
    """One identity in text-input space.

    ``tokens`` are the inverter's output at ID guidance 1; ``pad_embeds`` are what guidance mixes
    toward (``s * tokens + (1 - s) * pad``, DESIGN §2.5), kept here so strength can change later
    without the models.
    """

    tokens: torch.Tensor
    """``[N, H]`` subject tokens."""
    pad_embeds: torch.Tensor
    """``[N, H]`` pad-token input embeddings at the subject positions."""
    id_vector: torch.Tensor
    """``[D]`` unit ArcFace vector (the average of the photos used)."""
    sources: tuple[str, ...] = field(default=())
    """Names of the photos the identity came from."""

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.pad_embeds.shape:
            raise ConfigError(f"tokens {tuple(self.tokens.shape)} and pad embeddings {tuple(self.pad_embeds.shape)} must both be [N, H]")

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def scaled_tokens(self, id_strength: float = 1.0) -> torch.Tensor:
        """Tokens at ID guidance ``id_strength`` (1 = as trained; below 1 moves toward padding)."""
        if id_strength == 1.0:
            return self.tokens
        return id_strength * self.tokens + (1.0 - id_strength) * self.pad_embeds.to(self.tokens)

    def mix(self, other: "SubjectEmbedding", weight: float) -> "SubjectEmbedding":
        """``(1 - weight) * self + weight * other``: a blend of two identities.

        Tokens blend linearly (the prompt sees exactly this mix); the ID vector is blended and
        re-normalised so it stays a unit ArcFace vector. The inverter is not linear, so the teacher's
        face for the mixed vector is close to, not equal to, the tokens' face.
        """
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"mix weight must be between 0 and 1, got {weight}")
        if self.tokens.shape != other.tokens.shape:
            raise ConfigError(f"cannot mix subjects of shapes {tuple(self.tokens.shape)} and {tuple(other.tokens.shape)}")
        other_tokens = other.tokens.to(self.tokens)
        vector = F.normalize(torch.lerp(self.id_vector.float(), other.id_vector.float().to(self.id_vector.device), weight), dim=0)
        return SubjectEmbedding(
            tokens=torch.lerp(self.tokens, other_tokens, weight),
            pad_embeds=self.pad_embeds,
            id_vector=vector,
            sources=self.sources + other.sources,
        )
