"""Putting subject tokens where the placeholder word stands, at the text encoder's input-embedding level.

Two front ends share one idea (AdaFace's in-place replacement, DESIGN §2.6):
- ``inject_into_chunks`` edits token entries in ComfyUI's shape: chunks of exactly 77
  ``(token, weight[, word_id])`` entries, a token being an int id or a ``[H]`` tensor that the
  text encoder splices in as an input embedding. Chunks stay 77 long and a subject's N tokens
  never straddle two chunks, so position embeddings line up as in a plain prompt.
  A plain tokenizer's output (ids, a batch of them, a ``BatchEncoding``) is taken too, and
  ``chunk_input_embeds`` turns the result into input embeddings for any CLIP text encoder.
  ``inject_prompt`` starts from the text, so only a placeholder that stands as a word is replaced
  (``z``, not the end of ``schwarz``).
- ``splice_subject_embeds`` does the same on batched ``[B, 77, H]`` token embeddings (the trainer).
Nothing after the text encoder changes, which is why any sampler or AnimateDiff works unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .devices import host_to_device
from .errors import ConfigError, PlaceholderError

logger = logging.getLogger(__name__)

Entry = tuple  # (token, weight) or (token, weight, word_id)
EMBEDDING_PREFIX = "embedding:"
"""How a ComfyUI prompt names a textual-inversion embedding (``embedding:name``)."""
COMFY_MAX_WORD_LENGTH = 8
"""ComfyUI's SD1 tokenizer moves a word (its word id: a weighted segment, or the text between two
embeddings) of fewer tokens than this whole into the next chunk rather than cutting it at the chunk's end."""


@dataclass(frozen=True)
class SpecialTokens:
    start: int
    end: int
    pad: int

    @classmethod
    def from_empty_chunk(cls, chunk: Sequence[Entry]) -> "SpecialTokens":
        """Reads start/end/pad ids from the tokenization of an empty prompt: ``[start, end, pad, ...]``."""
        return cls(int(chunk[0][0]), int(chunk[1][0]), int(chunk[2][0]))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "SpecialTokens":
        """From a transformers CLIP tokenizer (start = BOS, end = EOS, pad = its pad token or EOS)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), int(pad))


@dataclass(frozen=True)
class SubjectSlot:
    """A subject to place: the placeholder's token ids and the ``[N, H]`` tokens that replace it."""

    placeholder: str
    placeholder_ids: tuple[int, ...]
    tokens: torch.Tensor


def as_token_chunks(tokens: Any) -> list[list[Entry]]:
    """Token chunks from ComfyUI's entries, or from a plain tokenizer's output.

    A plain output is a ``BatchEncoding`` (or dict) with ``input_ids``, a list of ids, a list of such
    lists (one per chunk) or a 1-D / 2-D tensor; each id becomes an ``(id, 1.0)`` entry. Pad each
    chunk to the encoder's length (``padding="max_length"``), as ComfyUI's chunks are.
    """
    if isinstance(tokens, Mapping):
        tokens = tokens["input_ids"]
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    rows = list(tokens)
    if rows and isinstance(rows[0], int):
        rows = [rows]
    if rows and rows[0] and isinstance(rows[0][0], int):
        return [[(int(token), 1.0) for token in row] for row in rows]
    return [list(chunk) for chunk in rows]


def chunk_input_embeds(chunks: Sequence[Sequence[Entry]], token_embedding: torch.Tensor) -> torch.Tensor:
    """``[C, L, H]`` input embeddings of token chunks: id entries looked up in ``token_embedding``
    (``[V, H]``), tensor entries spliced in as they are. Weights are not applied (that is the caller's
    prompt-weighting scheme); position embeddings are added by the text encoder."""
    width = token_embedding.shape[1]
    out = []
    for chunk in chunks:
        ids = torch.tensor([0 if isinstance(e[0], torch.Tensor) else int(e[0]) for e in chunk], device=token_embedding.device)
        rows = token_embedding[ids].clone()
        for i, entry in enumerate(chunk):
            if isinstance(entry[0], torch.Tensor):
                vector = entry[0].reshape(-1)
                if vector.shape[0] != width:
                    raise ConfigError(f"a token entry of width {vector.shape[0]} cannot enter a {width}-wide text encoder")
                rows[i] = vector.to(rows)
        out.append(rows)
    return torch.stack(out)


def _token_id(entry: Entry) -> Any:
    token = entry[0]
    return token if isinstance(token, int) else None


def _matches(content: Sequence[Entry], ids: tuple[int, ...], at: int) -> bool:
    return at + len(ids) <= len(content) and all(_token_id(content[at + k]) == ids[k] for k in range(len(ids)))


def _subject_entries(slot: SubjectSlot, like: Entry) -> list[Entry]:
    """One entry per subject token, carrying the placeholder's weight (and word id)."""
    tail = tuple(like[1:])
    return [(vector, *tail) for vector in slot.tokens.unbind(0)]


def _replace_in_content(
    content: list[Entry], slots: Sequence[SubjectSlot], found: set[str], allowed: Optional[set[int]] = None
) -> list[list[Entry]]:
    """Splits content into units (subject groups are atomic), replacing every placeholder occurrence.

    Left to right; where two placeholders match at one position the first slot wins. ``allowed``, when
    given, holds the only positions a placeholder may start at. Adds each slot that occurred to ``found``.
    """
    units: list[list[Entry]] = []
    i = 0
    while i < len(content):
        slot = None
        if allowed is None or i in allowed:
            slot = next((s for s in slots if _matches(content, s.placeholder_ids, i)), None)
        if slot is None:
            units.append([content[i]])
            i += 1
        else:
            units.append(_subject_entries(slot, content[i]))
            found.add(slot.placeholder)
            i += len(slot.placeholder_ids)
    return units


def _word_id(entry: Entry) -> int:
    return int(entry[2]) if len(entry) == 3 else 0


def _keep_short_words_whole(units: list[list[Entry]]) -> list[list[Entry]]:
    """Joins the units of each word shorter than ``COMFY_MAX_WORD_LENGTH`` (counting subject tokens that
    took a placeholder's place in it) into one, so a repack after the subject lengthened the prompt moves
    ``(blue eyes:1.2)`` whole into the next chunk, as ComfyUI would. Needs word ids (3-wide entries)."""
    sizes: dict[int, int] = {}
    for unit in units:
        for entry in unit:
            sizes[_word_id(entry)] = sizes.get(_word_id(entry), 0) + 1
    joined: list[list[Entry]] = []
    for unit in units:
        word = _word_id(unit[0])
        if joined and word != 0 and _word_id(joined[-1][-1]) == word and sizes[word] < COMFY_MAX_WORD_LENGTH:
            joined[-1] = joined[-1] + unit
        else:
            joined.append(unit)
    return joined


def _pack(units: list[list[Entry]], special: SpecialTokens, length: int, width: int) -> list[list[Entry]]:
    """Greedily packs units into chunks of ``length`` entries; atomic units (a subject's tokens, a short
    word) never straddle chunks."""
    units = _keep_short_words_whole(units)
    capacity = length - 2
    chunks: list[list[Entry]] = [[]]
    for unit in units:
        if len(unit) > capacity:
            raise ConfigError(f"{len(unit)} subject tokens cannot fit one {length}-token chunk")
        if len(chunks[-1]) + len(unit) > capacity:
            chunks.append([])
        chunks[-1].extend(unit)

    def special_entry(token: int) -> Entry:
        return (token, 1.0, 0) if width == 3 else (token, 1.0)

    return [
        [special_entry(special.start), *content, special_entry(special.end)]
        + [special_entry(special.pad)] * (capacity - len(content))
        for content in chunks
    ]


def _content(chunk: Sequence[Entry], special: SpecialTokens) -> list[Entry]:
    """A chunk's entries after its start token, without the end token and padding that close it. (Not up to
    the first end token: a typed ``<|endoftext|>`` is that token too, and ComfyUI encodes the text after it.)"""
    body = list(chunk[1:])
    while body and _token_id(body[-1]) in (special.end, special.pad):
        body.pop()
    return body


def _runs(contents: Sequence[Sequence[Entry]], capacity: int) -> list[list[int]]:
    """Chunk indices (of the chunks' ``_content``) grouped into runs of continuous text: a chunk filled to the
    brim (``capacity`` entries) continues in the next.

    Why: ComfyUI's SD1 tokenizer cuts a stretch of 8 tokens or more (a weighted segment, e.g. all the
    unweighted text) at exactly 75 tokens, wherever that falls, so a placeholder of several tokens (``zwx``,
    ``jane doe``) can start at the end of one chunk and finish in the next. (A shorter segment that does not
    fit moves whole to the next chunk, leaving the first one padded: not full, so not joined.)
    """
    runs: list[list[int]] = []
    for index in range(len(contents)):
        if runs and len(contents[runs[-1][-1]]) == capacity:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def inject_into_chunks(
    chunks: Any,
    slots: Sequence[SubjectSlot],
    special: SpecialTokens,
    append_if_missing: bool = False,
    starts: Optional[Sequence[set[int]]] = None,
) -> list[list[Entry]]:
    """Replaces each slot's placeholder in ComfyUI-shaped token chunks by its subject tokens.

    Every chunk keeps exactly its original length. A chunk that overflows after replacement is
    split; a run of chunks without placeholders is returned as it was. A placeholder absent from the
    prompt is an error, unless ``append_if_missing`` puts the subject at the end. ``chunks`` may
    also be a plain tokenizer's output (see ``as_token_chunks``). Full chunks and the one after them
    count as one text (``_runs``), so a placeholder cut by a chunk boundary is found. ``starts``, per
    run, limits the content positions a placeholder may start at (``inject_prompt`` finds them from
    the text); without it every run of the placeholder's token ids counts.
    """
    chunks = as_token_chunks(chunks)
    if not chunks:
        raise ConfigError("no token chunks given")
    length = len(chunks[0])
    width = len(chunks[0][0])
    for chunk in chunks:
        if len(chunk) != length:
            raise ConfigError(f"token chunks must all have {length} entries, got one of {len(chunk)}")
    found: set[str] = set()
    out: list[list[Entry]] = []
    contents = [_content(chunk, special) for chunk in chunks]
    for index, run in enumerate(_runs(contents, length - 2)):
        found_here: set[str] = set()
        content = [entry for i in run for entry in contents[i]]
        units = _replace_in_content(content, slots, found_here, None if starts is None else starts[index])
        found |= found_here
        if not found_here:  # nothing replaced: keep the chunks untouched
            out.extend(list(chunks[i]) for i in run)
        else:
            out.extend(_pack(units, special, length, width))
    missing = [slot for slot in slots if slot.placeholder not in found]
    if missing and not append_if_missing:
        names = ", ".join(repr(s.placeholder) for s in missing)
        raise PlaceholderError(
            f"the prompt has no placeholder {names}: write it where the person goes, e.g. "
            f"'a photo of {missing[0].placeholder} in the forest' (or set append_if_missing to put the subject at the end)"
        )
    for slot in missing:
        last = out[-1]
        end = 1 + len(_content(last, special))
        units = [[e] for e in last[1:end]] + [_subject_entries(slot, last[end])]
        out[-1:] = _pack(units, special, length, width)
    return out


def mask_standalone_placeholders(text: str, slots: Sequence[SubjectSlot]) -> Optional[str]:
    """``text`` with each placeholder that stands as a word of its own replaced by one digit per token.

    Why: token ids cannot tell the word ``z`` from the end of ``schwarz`` (both end in the token
    ``z</w>``), nor ``y`` from the start of ``y2k``. CLIP's tokenizer cuts letters, digits and
    punctuation into separate pieces, so the masked text tokenizes to the same entries except at
    those words, and comparing the two tokenizations marks them. A word of its own has no letter,
    digit or underscore on either side (case is ignored, as CLIP lowercases); ``embedding:name``
    references stay as they are. None if every digit occurs in a placeholder (no mask possible).
    """
    digit = next((d for d in "0123456789" if all(d not in slot.placeholder for slot in slots)), None)
    if digit is None:
        return None
    lengths = {slot.placeholder.strip().lower(): len(slot.placeholder_ids) for slot in slots if slot.placeholder.strip()}
    if not lengths:
        return text
    words = "|".join(re.escape(word) for word in sorted(lengths, key=len, reverse=True))
    # An embedding name ends where ComfyUI's does: at a space or at the bracket that ends its weighted segment
    # ("(embedding:style:1.1),z" holds the placeholder); ComfyUI's prefix is case-sensitive, the words are not.
    pattern = re.compile(rf"({re.escape(EMBEDDING_PREFIX)}[^\s()]+)|(?<!\w)(?i:({words}))(?!\w)")
    return pattern.sub(lambda m: m.group(1) or digit * lengths[m.group(2).lower()], text)


def standalone_starts(
    chunks: Sequence[Sequence[Entry]], masked: Sequence[Sequence[Entry]], slots: Sequence[SubjectSlot],
    special: SpecialTokens,
) -> Optional[list[set[int]]]:
    """Per run of chunks (``_runs``), the content positions where a placeholder stands as a word: its ids
    in ``chunks`` and other tokens there in ``masked`` (the tokenization of ``mask_standalone_placeholders``'
    text).

    None when the two differ anywhere else, i.e. a tokenizer for which the comparison does not hold.
    """
    if len(chunks) != len(masked) or any(len(a) != len(b) for a, b in zip(chunks, masked)):
        return None
    contents, others = [_content(c, special) for c in chunks], [_content(c, special) for c in masked]
    capacity = len(chunks[0]) - 2 if chunks else 0
    runs = _runs(contents, capacity)
    if _runs(others, capacity) != runs:
        return None
    starts = []
    for run in runs:
        content = [entry for i in run for entry in contents[i]]
        other = [entry for i in run for entry in others[i]]
        if len(content) != len(other):
            return None
        differing = {i for i, (a, b) in enumerate(zip(content, other)) if _token_id(a) != _token_id(b)}
        here: set[int] = set()
        covered: set[int] = set()
        for slot in slots:
            span = len(slot.placeholder_ids)
            for i in range(len(content) - span + 1):
                if _matches(content, slot.placeholder_ids, i) and differing.issuperset(range(i, i + span)):
                    here.add(i)
                    covered.update(range(i, i + span))
        if differing - covered:
            return None
        starts.append(here)
    return starts


def inject_prompt(
    text: str,
    tokenize: Callable[[str], list[list[Entry]]],
    slots: Sequence[SubjectSlot],
    special: SpecialTokens,
    append_if_missing: bool = False,
) -> list[list[Entry]]:
    """``inject_into_chunks`` on ``tokenize(text)``, replacing only placeholders that stand as words.

    ``tokenize`` gives ComfyUI-shaped chunks (e.g. ``clip.tokenize(text)["l"]``); it is called twice,
    on the text and on its masked copy. Where the two tokenizations do not line up, every run of
    the placeholder's ids counts, as in ``inject_into_chunks``, and a warning says so.
    """
    chunks = tokenize(text)
    masked = mask_standalone_placeholders(text, slots)
    starts = None if masked is None else standalone_starts(chunks, tokenize(masked), slots, special)
    if starts is None:
        logger.warning("could not tell whole-word placeholders from parts of other words in this prompt: "
                       "every occurrence of the placeholder's tokens is replaced")
    return inject_into_chunks(chunks, slots, special, append_if_missing=append_if_missing, starts=starts)


def splice_subject_embeds(
    input_ids: torch.Tensor,
    token_embeds: torch.Tensor,
    placeholder_id: int,
    subject: torch.Tensor,
    end_id: int = 49407,
) -> torch.Tensor:
    """Batched in-place replacement on token embeddings: ``[B, L, H]`` with one placeholder per row.

    The N subject tokens take the placeholder's place and the rest of the prompt moves right;
    trailing padding falls off the end so the length stays L. Differentiable in ``subject``.
    ``input_ids`` may stay on the host while the embeddings are on a GPU: the checks and the index
    are then worked out there, and the training step never waits on the device for them.
    """
    batch, length, _ = token_embeds.shape
    n = subject.shape[1]
    is_placeholder = input_ids == placeholder_id
    if not bool((is_placeholder.sum(dim=1) == 1).all()):
        raise PlaceholderError("every prompt must hold the placeholder exactly once")
    position = is_placeholder.int().argmax(dim=1, keepdim=True)  # [B, 1]
    end_position = (input_ids == end_id).int().argmax(dim=1, keepdim=True)
    if bool((end_position + n - 1 >= length).any()):
        raise ConfigError(f"the prompt is too long to hold {n} subject tokens in {length} positions")
    j = torch.arange(length, device=input_ids.device).unsqueeze(0)
    source = torch.where(j < position, j, torch.where(j < position + n, length + j - position, j - n + 1))
    source = host_to_device(source, token_embeds.device)
    combined = torch.cat([token_embeds, subject.to(token_embeds.dtype)], dim=1)
    return combined.gather(1, source.unsqueeze(-1).expand(-1, -1, combined.shape[-1]))
