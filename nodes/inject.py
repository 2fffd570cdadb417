"""Inject Subject Tokens: the prompt is encoded by the connected CLIP with the subject in place of a word.

Works through ComfyUI's own tokenize/encode path (tensor entries in the token chunks become input
embeddings), so prompt weights, embeddings, hooks and every sampler behave as for any prompt.
"""

from __future__ import annotations

from typing import Any, Optional

from ..adaface_core.errors import ConfigError, PlaceholderError
from ..adaface_core.injection import SpecialTokens, SubjectSlot, inject_prompt
from ..adaface_core.subject import SubjectEmbedding
from .errors import UnsupportedClipError
from .types import ADAFACE_SUBJECT, CATEGORY

SD1_KEY = "l"


def sd1_chunks(clip: Any, text: str) -> list[list[tuple]]:
    """The SD1 (CLIP-L) token chunks of ``text``; any other text encoder is refused. With word ids, so a
    chunk that overflows after injection is repacked as ComfyUI packs words."""
    tokens = clip.tokenize(text, return_word_ids=True)
    if set(tokens) != {SD1_KEY}:
        raise UnsupportedClipError(
            f"AdaFace works with SD1.5 models only, but this CLIP has the text encoders {sorted(tokens)} "
            "(SDXL, SD2, Flux and others are not supported): load an SD1.5 checkpoint"
        )
    return tokens[SD1_KEY]


def placeholder_ids(clip: Any, placeholder: str, special: SpecialTokens) -> tuple[int, ...]:
    """The placeholder's token ids as the connected CLIP's own tokenizer writes them."""
    chunk = sd1_chunks(clip, placeholder)[0]
    ids = tuple(int(e[0]) for e in chunk if isinstance(e[0], int) and e[0] not in (special.start, special.end, special.pad))
    if not placeholder.strip() or not ids:
        raise PlaceholderError(f"the placeholder {placeholder!r} is empty: use a short word such as 'z'")
    return ids


class AdaFaceInjectSubject:
    DESCRIPTION = (
        "Encodes the prompt with the subject's tokens in place of the placeholder word (e.g. 'a photo of z "
        "in the forest'). Connect to any sampler's positive input. SD1.5 only."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt's conditioning with the subject in it.",)
    FUNCTION = "inject"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The SD1.5 CLIP of the checkpoint you sample with."}),
                "subject": (ADAFACE_SUBJECT, {"tooltip": "The person, from Face → ID Embedding."}),
                "text": ("STRING", {"multiline": True, "default": "a photo of z", "tooltip": "The prompt; write the placeholder where the person goes."}),
                "placeholder": ("STRING", {"default": "z", "tooltip": "The word in the prompt that the subject replaces, wherever it stands as a word of its own ('z' or 'z,' but not the z of 'schwarz')."}),
                "id_strength": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "How strongly the identity shows: 1 as trained, lower gives the prompt more say."},
                ),
                "start_percent": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Sampling progress at which this conditioning starts to apply. Outside start..end it conditions nothing, and a step with no positive conditioning at all breaks the image: combine it (Conditioning (Combine)) with a plain CLIP Text Encode for the other steps."},
                ),
                "end_percent": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Sampling progress at which this conditioning stops applying (see start_percent: combine with a plain prompt for the rest)."},
                ),
                "append_if_missing": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "When the prompt lacks the placeholder, put the subject at its end instead of stopping with an error."},
                ),
            },
            "optional": {
                "subject_2": (ADAFACE_SUBJECT, {"tooltip": "A second person, placed at the second placeholder."}),
                "placeholder_2": ("STRING", {"default": "y", "tooltip": "The word the second person replaces (used only with subject_2)."}),
            },
        }

    def inject(
        self,
        clip: Any,
        subject: SubjectEmbedding,
        text: str,
        placeholder: str,
        id_strength: float,
        start_percent: float,
        end_percent: float,
        append_if_missing: bool,
        subject_2: Optional[SubjectEmbedding] = None,
        placeholder_2: str = "y",
    ) -> tuple[list]:
        if start_percent >= end_percent:
            raise ConfigError(
                f"start_percent ({start_percent}) must be below end_percent ({end_percent}): otherwise the subject never applies"
            )
        special = SpecialTokens.from_empty_chunk(sd1_chunks(clip, "")[0])
        people = [(placeholder, subject)] + ([(placeholder_2, subject_2)] if subject_2 is not None else [])
        slots = [SubjectSlot(word, placeholder_ids(clip, word, special), person.scaled_tokens(id_strength)) for word, person in people]
        if len({slot.placeholder_ids for slot in slots}) != len(slots):
            raise PlaceholderError(f"both subjects use the placeholder {placeholder!r}: give the second one another word, e.g. 'y'")
        chunks = inject_prompt(text, lambda prompt: sd1_chunks(clip, prompt), slots, special, append_if_missing=append_if_missing)
        tokens = {SD1_KEY: chunks}
        # The range travels in add_dict, as in ComfyUI's own timestep-range handling: hook keyframes
        # outside it are then not encoded at all.
        timestep_range = {} if (start_percent, end_percent) == (0.0, 1.0) else {"start_percent": start_percent, "end_percent": end_percent}
        conditioning = clip.encode_from_tokens_scheduled(tokens, add_dict=timestep_range)
        width = conditioning[0][0].shape[-1]
        for _, person in people:
            if person.width != width:
                raise UnsupportedClipError(
                    f"the subject tokens are {person.width} wide but this CLIP is {width} wide: AdaFace subjects "
                    "fit SD1.5's CLIP (768); check that the checkpoint is SD1.5 and the inverter matches it"
                )
        return (conditioning,)
