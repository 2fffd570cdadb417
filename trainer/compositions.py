"""Composition prompt pool and the four prompt instances of composition distillation (paper §2.3).

The pool is data (``trainer/data/compositions.txt``), not code, so users can read it and extend it with
their own file. Format (UTF-8, a BOM allowed): one composition per line, ``[category]`` opens a section, and
``#`` starts a comment at the start of a line or as a word of its own (`` # ``), so "wearing a #10 jersey"
keeps its number. Entries that differ only in case or a final full stop count once.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from adaface_core.errors import ConfigError, ModelFileMissingError

logger = logging.getLogger(__name__)

DEFAULT_POOL_FILE = Path(__file__).resolve().parent / "data" / "compositions.txt"
DEFAULT_PLACEHOLDER = "z"
DEFAULT_CLASS_WORD = "person"
SUBJECT_SLOT = "{subject}"
DEFAULT_TEMPLATE = f"a photo of {SUBJECT_SLOT}"
Rng = Union[random.Random, torch.Generator, None]
_INLINE_COMMENT = re.compile(r"\s#(\s|$)")


def fill_subject(template: str, subject: str) -> str:
    """A prompt template (stage 1's student prompts, stage 2's) with its ``{subject}`` slot filled; any other
    braces are the user's own text, not format fields."""
    return template.replace(SUBJECT_SLOT, subject)


def has_one_subject_slot(template: str) -> bool:
    """One ``{subject}``, standing as a word of its own: 'of{subject}' would tokenize as one glued word, and
    the subject's tokens would not line up with the class prompt's."""
    if template.count(SUBJECT_SLOT) != 1:
        return False
    before, after = template.split(SUBJECT_SLOT)
    return not (before[-1:].isalnum() or after[:1].isalnum())


@dataclass
class CompositionPool:
    """Compositions by category; ``entries`` is the flat, de-duplicated list sampled uniformly."""

    categories: dict[str, list[str]] = field(default_factory=dict)

    @property
    def entries(self) -> list[str]:
        seen: dict[str, str] = {}
        for items in self.categories.values():
            for item in items:
                seen.setdefault(_same_composition(item), item)  # the first spelling stays
        return list(seen.values())

    def __len__(self) -> int:
        return len(self.entries)

    def merge(self, other: "CompositionPool") -> "CompositionPool":
        for cat, items in other.categories.items():
            self.categories.setdefault(cat, []).extend(items)
        return self


def _same_composition(entry: str) -> str:
    """What two spellings of one composition share ('Riding a horse.' and 'riding a horse')."""
    return entry.casefold().rstrip(". ")


def parse_compositions(text: str, default_category: str = "misc", source: str = "compositions") -> CompositionPool:
    """Parse the pool format (see module docstring); ``source`` names the text in errors."""
    pool = CompositionPool()
    category = default_category
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = "" if raw.lstrip().startswith("#") else _INLINE_COMMENT.split(raw, 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            category = line[1:-1].strip() or default_category
            continue
        if SUBJECT_SLOT in line:
            raise ConfigError(f"{source}, line {number}: {line!r} holds {SUBJECT_SLOT}; a composition follows the "
                              "subject ('a photo of z <composition>'), so write it without the slot")
        pool.categories.setdefault(category, []).append(" ".join(line.split()))
    return pool


def load_composition_pool(
    extra_files: Sequence[Union[str, Path]] = (),
    include_default: bool = True,
    categories: Optional[Sequence[str]] = None,
) -> CompositionPool:
    """The packaged pool, merged with user files; optionally restricted to some categories."""
    pool = CompositionPool()
    files = ([DEFAULT_POOL_FILE] if include_default else []) + [Path(p) for p in extra_files]
    for path in files:
        if not Path(path).is_file():
            raise ModelFileMissingError(f"composition file not found: {path} (composition.extra.composition_files)")
        pool.merge(parse_compositions(Path(path).read_text(encoding="utf-8-sig"), source=str(path)))
    if categories is not None:
        unknown = set(categories) - set(pool.categories)
        if unknown:
            raise ValueError(f"unknown composition categories {sorted(unknown)}; known {sorted(pool.categories)}")
        pool = CompositionPool({c: pool.categories[c] for c in categories})
    if not len(pool):
        raise ValueError(f"composition pool from {files} is empty")
    logger.info("composition pool: %d entries in %d categories", len(pool), len(pool.categories))
    return pool


def _randbelow(n: int, rng: Rng) -> int:
    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (1,), generator=rng).item())
    return (rng or random).randrange(n)


def with_article(word: str) -> str:
    """'person' -> 'a person', 'old man' -> 'an old man'; words already carrying an article stay."""
    word = word.strip()
    first = word.split(" ", 1)[0].lower()
    if first in {"a", "an", "the"}:
        return word
    return ("an " if first[:1] in "aeiou" else "a ") + word


@dataclass(frozen=True)
class PromptQuad:
    """The four instances of one sample, in the batch order used by ``composition_step``."""

    subject_single: str
    subject_comp: str
    class_single: str
    class_comp: str
    composition: str

    def as_list(self) -> list[str]:
        return [self.subject_single, self.subject_comp, self.class_single, self.class_comp]


def build_prompts(
    composition: str,
    class_word: str = DEFAULT_CLASS_WORD,
    placeholder: str = DEFAULT_PLACEHOLDER,
    template: str = DEFAULT_TEMPLATE,
) -> PromptQuad:
    """'a photo of z', 'a photo of z <comp>', 'a photo of a <class>', 'a photo of a <class> <comp>'."""
    subj = fill_subject(template, placeholder)
    cls = fill_subject(template, with_article(class_word))
    comp = composition.strip()
    return PromptQuad(subj, f"{subj} {comp}", cls, f"{cls} {comp}", comp)


def sample_prompts(
    pool: CompositionPool,
    class_words: Union[str, Sequence[Optional[str]], None] = None,
    batch_size: Optional[int] = None,
    rng: Rng = None,
    placeholder: str = DEFAULT_PLACEHOLDER,
    default_class_word: str = DEFAULT_CLASS_WORD,
    template: str = DEFAULT_TEMPLATE,
) -> list[PromptQuad]:
    """One seeded composition per sample; ``class_words`` per sample (from metadata; None -> default)."""
    if class_words is None or isinstance(class_words, str):
        n = batch_size or 1
        class_words = [class_words] * n
    entries = pool.entries
    quads = []
    for word in class_words:
        comp = entries[_randbelow(len(entries), rng)]
        quads.append(build_prompts(comp, word or default_class_word, placeholder, template))
    return quads


def stack_prompts(quads: Sequence[PromptQuad]) -> list[str]:
    """Flatten B quads into 4B prompts: all subject-single, then subject-comp, class-single, class-comp."""
    return [getattr(q, kind) for kind in ("subject_single", "subject_comp", "class_single", "class_comp") for q in quads]


@dataclass(frozen=True)
class TokenAlignment:
    """How the token positions of the four prompts correspond (for ``composition_step``), per kind in the order
    subject-single, subject-composition, class-single, class-composition; a batch may hold one per sample."""

    index: torch.Tensor
    """``[4, K]`` (or ``[B, 4, K]``) long: the positions that correspond, the subject and 'a <class>' tokens left out."""
    subject: torch.Tensor
    """``[4, T]`` (or ``[B, 4, T]``) bool: the subject tokens of the subject prompts, 'a <class>' of the class prompts."""

    def apply(self, move: Callable[[torch.Tensor], torch.Tensor]) -> "TokenAlignment":
        """Both tensors through ``move`` (e.g. a copy to the device)."""
        return TokenAlignment(move(self.index), move(self.subject))

    @staticmethod
    def stack(samples: Sequence["TokenAlignment"]) -> "TokenAlignment":
        """One alignment per sample, ``[B, 4, ...]``, cut to the shortest sample's K."""
        k = min(sample.index.shape[1] for sample in samples)
        return TokenAlignment(torch.stack([s.index[:, :k] for s in samples]), torch.stack([s.subject for s in samples]))


def aligned_tokens(
    subject_start: int,
    subject_len: int,
    class_len: int,
    seq_len: int = 77,
) -> TokenAlignment:
    """The token positions that correspond across the four prompts, and the subject's own.

    In the subject prompts the ``subject_len`` subject tokens (e.g. 16 AdaFace tokens) start at position
    ``subject_start`` (4 for 'a photo of z': BOS, a, photo, of); in the class prompts the ``class_len``
    tokens of 'a <class word>' start there too. Each shifts the later tokens by a different amount;
    leaving them out lines up the template, the composition words, EOS and padding.
    """
    subj = list(range(subject_start)) + list(range(subject_start + subject_len, seq_len))
    cls = list(range(subject_start)) + list(range(subject_start + class_len, seq_len))
    k = min(len(subj), len(cls))
    subject = torch.zeros(4, seq_len, dtype=torch.bool)
    subject[:2, subject_start:subject_start + subject_len] = True
    subject[2:, subject_start:subject_start + class_len] = True
    return TokenAlignment(torch.tensor([subj[:k], subj[:k], cls[:k], cls[:k]], dtype=torch.long), subject)
