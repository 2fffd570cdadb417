"""Save AdaFace Embedding and Mix Subject Embeddings: subjects beyond one graph."""

from __future__ import annotations

import logging

from ..adaface_core.subject import SubjectEmbedding
from ..adaface_core.errors import AdaFaceError
from ..adaface_core.textual_inversion import (
    embedding_file_name, embedding_metadata, files_for_word, holds_tokens, save_textual_inversion,
)
from . import folders
from .errors import EmbeddingExistsError
from .types import ADAFACE_SUBJECT, CATEGORY

logger = logging.getLogger(__name__)


class AdaFaceSaveEmbedding:
    DESCRIPTION = (
        "Saves the subject as a textual-inversion embedding in ComfyUI/models/embeddings. Write "
        "'embedding:NAME' in any SD1.5 prompt to use the person without AdaFace nodes."
    )
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_word",)
    OUTPUT_TOOLTIPS = ("The text to write in a prompt, 'embedding:NAME' (link it to Preview Any to read it).",)
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "subject": (ADAFACE_SUBJECT, {"tooltip": "The person to save."}),
                "name": ("STRING", {"default": "adaface_subject", "tooltip": "File name (letters, digits, _ - .); the prompt word becomes embedding:NAME."}),
                "id_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "Identity strength baked into the file (1 as trained)."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an embedding of the same name; off, an existing file holding another subject stops the run."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, subject: object, name: str | None, id_strength: object, overwrite: object) -> str:
        """Runs again when the file was deleted or replaced since (ComfyUI would otherwise reuse the last run):
        a deleted file is written again, a replaced one is kept if it holds this subject. The queue after a
        save runs the node (and what uses ``prompt_word``) once more, since its file appeared; it then finds
        the subject already there and writes nothing. A name linked from another node (None here) is not
        followed."""
        if not isinstance(name, str):
            return "linked"
        try:
            return folders.file_state(folders.embeddings_folders()[0] / embedding_file_name(name.strip()))
        except AdaFaceError:
            return name  # the run itself says what is wrong with it

    def save(self, subject: SubjectEmbedding, name: str, id_strength: float, overwrite: bool) -> tuple[str]:
        roots = folders.embeddings_folders()
        path = roots[0] / embedding_file_name(name.strip())
        word = f"embedding:{path.stem}"
        others = files_for_word(path.stem, roots, other_than=path)
        if others:
            raise EmbeddingExistsError(f"{word} already names {', '.join(map(str, others))} (ComfyUI would load one or "
                                       "the other by chance): choose another name")
        tokens = subject.scaled_tokens(id_strength)
        if path.exists() and holds_tokens(path, tokens):  # the same subject queued again: nothing to change
            logger.info("%s already holds this subject; use it in a prompt as %s", path, word)
            return (word,)
        if path.exists() and not overwrite:
            raise EmbeddingExistsError(f"{path} already exists: choose another name, or switch on overwrite to replace it")
        save_textual_inversion(tokens, path, embedding_metadata(subject.sources, id_strength))
        logger.info("saved the subject as %s; use it in a prompt as %s", path, word)
        return (word,)


class AdaFaceMixSubjects:
    DESCRIPTION = (
        "Blends two people into one subject: weight 0 gives subject_a, 1 gives subject_b. The subject tokens "
        "(what Inject uses) are blended linearly; the ArcFace vector (what the Arc2Face teacher draws from) "
        "along the sphere, so the teacher shows a neighbouring blend, not exactly the same face."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAFACE_SUBJECT,)
    RETURN_NAMES = ("subject",)
    OUTPUT_TOOLTIPS = ("The blended subject.",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "subject_a": (ADAFACE_SUBJECT, {"tooltip": "The first person (weight 0)."}),
                "subject_b": (ADAFACE_SUBJECT, {"tooltip": "The second person (weight 1)."}),
                "weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "How much of subject_b is in the blend."}),
            }
        }

    def mix(self, subject_a: SubjectEmbedding, subject_b: SubjectEmbedding, weight: float) -> tuple[SubjectEmbedding]:
        return (subject_a.mix(subject_b, weight),)
