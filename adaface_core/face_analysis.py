"""Face photo -> unit ArcFace vector (DESIGN §2.1), with insightface's own ONNX model classes.

Only two models of a pack are used (detector and recogniser), loaded from a folder the user filled
by hand with an explicit onnxruntime provider list; insightface's ``FaceAnalysis(name=...)`` is never
used, since it downloads at run time and guesses providers. Finding the faces, with the tries one
detector run needs, is ``face_detection``'s job. The largest face by true box area is the subject (the
reference code's sort key lacks parentheses). Several photos of one person average their unit vectors,
a photo without a face is reported and skipped rather than ending the run, and photos that may put a
stranger into the average are named.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .errors import AdaFaceError, ConfigError, NoFaceError, git_lfs_hint
from .face_detection import FaceDetection
from .face_pack import FacePackFiles, onnx_providers, resolve_face_pack
from .image_io import ImageInput, as_image_list, image_name, to_bgr_uint8

logger = logging.getLogger(__name__)

__all__ = ["ANALYSIS_REVISION", "DetectedFace", "FaceAnalyzer", "FaceModelLoadError", "IdentityResult", "ImageInput", "average_identity"]

ALIGNED_SIZE = 112
MIN_FACE_SIDE = 24
"""Shorter box side (original pixels) below which a face is refused: ArcFace cannot tell people apart there."""
SMALL_FACE_SIDE = 48
"""Below this the identity is used but a warning says it may be off."""
SAME_PERSON_COSINE = 0.3
"""A photo whose face is less like the other photos' mean than this is probably someone else (buffalo_s on
the test photos: one person's pairs 0.53 or more, different people's 0.23 or less)."""
CLOSE_SECOND_FACE = 0.5
"""A second face at least this share of the largest's area makes "the largest" a close call."""
ANALYSIS_REVISION = 2
"""Raised when the same models would give some photos another face (2: turned photos); a cache of
results records it, so results of an older reading are made again."""
NO_FACE_ADVICE = (
    "use a photo where the face is clearly visible, roughly frontal, not cut off by the frame and "
    f"not tiny (at least about {SMALL_FACE_SIDE} pixels across)"
)


class FaceModelLoadError(AdaFaceError):
    """A face model file is there but onnxruntime or insightface cannot load it (damaged or not ONNX)."""


@dataclass
class DetectedFace:
    """One face: where it is, how sure the detector was, and who it is (the unit ArcFace vector)."""

    normed_embedding: np.ndarray
    """``[D]`` float32, unit length (D = 512 for ArcFace)."""
    bbox: np.ndarray
    """``[4]`` x1, y1, x2, y2 in the original photo's pixels (may reach past its edges)."""
    kps: np.ndarray
    """``[5, 2]`` eyes, nose tip, mouth corners, in the original photo's pixels."""
    det_score: float
    aligned: np.ndarray
    """``112x112x3`` uint8 RGB crop on the ArcFace template (what the recogniser saw)."""
    name: str = ""
    embedding_norm: float = 0.0
    """Length of the raw embedding: low values go with blurred or odd crops."""
    next_largest_area: float = 0.0
    """True box area of the photo's next largest face (0 when it has one face): a close second means the
    largest face may not be the person meant."""

    @property
    def embedding(self) -> np.ndarray:
        """The unit vector (alias of ``normed_embedding``)."""
        return self.normed_embedding

    @property
    def area(self) -> float:
        """True box area ``(x2 - x1) * (y2 - y1)``."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox[:4])
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def min_side(self) -> float:
        """Shorter side of the box, in the original photo's pixels."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox[:4])
        return max(0.0, min(x2 - x1, y2 - y1))

    def embedding_tensor(self) -> Any:
        """The unit vector as a float32 torch tensor ``[D]``."""
        import torch

        return torch.from_numpy(self.normed_embedding.copy())


@dataclass
class IdentityResult:
    """One person from several photos: the re-normalised mean vector and what each photo gave."""

    embedding: np.ndarray
    """``[D]`` float32 unit vector."""
    faces: list[DetectedFace] = field(default_factory=list)
    """The face used from each photo that had one, in input order."""
    skipped_names: list[str] = field(default_factory=list)
    """Photos in which no face was found."""
    notes: list[str] = field(default_factory=list)
    """What may be wrong with the average, in words (also logged): photos left out and why, small faces, a
    face unlike the others, a close call in a group photo."""

    @property
    def used_names(self) -> list[str]:
        return [face.name for face in self.faces]

    def report(self) -> str:
        """The photos used and every note, one per line: what a host shows the user beside the result."""
        total = len(self.faces) + len(self.skipped_names)
        used = f"{len(self.faces)} of {total} photo{'s' if total > 1 else ''} used ({_listed(self.used_names)})"
        return "\n".join([used + ("" if self.notes else "; nothing to check"), *self.notes])


def average_identity(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of unit vectors, re-normalised: each photo counts equally, whatever its embedding length."""
    if not vectors:
        raise NoFaceError("no face vectors to average")
    units = [np.asarray(v, np.float32).reshape(-1) for v in vectors]
    units = [v / max(float(np.linalg.norm(v)), 1e-12) for v in units]
    mean = np.mean(np.stack(units), axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise AdaFaceError("the photos' face vectors cancel out; they cannot be of one person")
    return (mean / norm).astype(np.float32)


def _listed(names: Sequence[str], shown: int = 5) -> str:
    """Names for a log line: a 100-frame video's list is cut to its first few."""
    names = list(names)
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown])} and {len(names) - shown} more"


def _stranger_notes(faces: Sequence[DetectedFace]) -> list[str]:
    """The photos that may put someone else into one person's average: a face unlike the mean of the
    others (a wrong photo, a video whose largest face changes hands) and a largest face with a close
    second (a group photo)."""
    notes = []
    close_calls = [face.name for face in faces if face.next_largest_area >= CLOSE_SECOND_FACE * face.area > 0]
    if close_calls:
        notes.append(f"{_listed(close_calls)} {'has' if len(close_calls) == 1 else 'have'} several faces of about the "
                     "same size; the largest was used")
    if len(faces) < 2:
        return notes
    vectors = np.stack([face.normed_embedding for face in faces])
    total = vectors.sum(axis=0)
    others = total[None, :] - vectors
    likeness = np.einsum("nd,nd->n", vectors, others) / np.maximum(np.linalg.norm(others, axis=1), 1e-12)
    usual = f"one person's photos are usually above {SAME_PERSON_COSINE:.1f}"
    if len(faces) == 2 and likeness[0] < SAME_PERSON_COSINE:
        notes.append(f"the faces in {faces[0].name} and {faces[1].name} do not look like one person (cosine similarity "
                     f"{likeness[0]:.2f}; {usual}): both are averaged into one subject, so check the photos")
    elif len(faces) > 2:
        strangers = [f"{face.name} ({value:.2f})" for face, value in zip(faces, likeness) if value < SAME_PERSON_COSINE]
        if strangers:
            notes.append(f"the face in {_listed(strangers)} does not look like the others' (cosine similarity to their "
                         f"mean in brackets; {usual}): every photo is averaged into one subject, so check the photos")
    return notes


def _small_face_note(face: DetectedFace) -> Optional[str]:
    if face.min_side >= SMALL_FACE_SIDE:
        return None
    return (f"the face in {face.name} is only {face.min_side:.0f} pixels across; its identity may be off "
            f"({SMALL_FACE_SIDE} or more are better)")


def _usable(face: DetectedFace) -> DetectedFace:
    """``face`` if it is big enough to identify someone; ``NoFaceError`` saying how small it is otherwise."""
    side = face.min_side
    if side < MIN_FACE_SIDE:
        reason = (f"the face in {face.name} is only {side:.0f} pixels across, too small to identify anyone "
                  f"(at least {MIN_FACE_SIDE} are needed, {SMALL_FACE_SIDE} or more are better)")
        raise NoFaceError(f"{reason}; use a larger photo or a closer crop", reason)
    note = _small_face_note(face)
    if note:
        logger.warning("%s", note)
    return face


class FaceAnalyzer:
    """Detector + recogniser from one insightface pack folder; finds faces and their ArcFace vectors."""

    def __init__(
        self,
        detector: Any,
        recognizer: Any,
        det_size: int = 640,
        det_thresh: float = 0.5,
        files: Optional[FacePackFiles] = None,
    ):
        if getattr(recognizer, "taskname", None) != "recognition":
            raise ConfigError(f"{getattr(recognizer, 'model_file', recognizer)} is not a face recognition model")
        self.detection = FaceDetection(detector, det_size, det_thresh)
        self.recognizer = recognizer
        self.files = files
        # Graphs that declare batch 1 (on input or output) get one crop per run: onnxruntime rejects
        # or warns about anything else.
        leading = [recognizer.session.get_inputs()[0].shape[0], recognizer.session.get_outputs()[0].shape[0]]
        self._one_by_one = any(isinstance(v, int) and v == 1 for v in leading)

    @classmethod
    def from_folder(
        cls,
        folder: Union[str, Path],
        provider: str = "auto",
        det_size: int = 640,
        det_thresh: float = 0.5,
    ) -> "FaceAnalyzer":
        """Load the detector and recogniser of the pack in ``folder`` (antelopev2 layout or any pack).

        ``provider``: auto (CUDA or ROCm when this onnxruntime offers one, else CPU: ``AUTO_ORDER``), cpu,
        cuda, rocm, coreml or directml.
        """
        from insightface.model_zoo import get_model

        files = resolve_face_pack(folder)
        providers = onnx_providers(provider)
        models = []
        for path, role in ((files.detector, "detection"), (files.recognizer, "recognition")):
            try:
                model = get_model(str(path), providers=providers)
            except Exception as error:  # onnxruntime raises its own types for corrupt files
                raise FaceModelLoadError(f"cannot load face {role} model {path}: {error}.{git_lfs_hint(path)}") from error
            if model is None or getattr(model, "taskname", None) != role:
                kind = getattr(model, "taskname", "unrecognised")
                raise ConfigError(f"{path} was expected to be a face {role} model, but insightface reads it as {kind}")
            models.append(model)
        active = list(models[0].session.get_providers())
        if providers[0] != "CPUExecutionProvider" and providers[0] not in active:
            logger.warning("face models asked for %s but run on %s", providers[0], ", ".join(active))
        logger.info(
            "face models from %s: detector %s, recogniser %s, providers %s",
            files.folder,
            files.detector.name,
            files.recognizer.name,
            ", ".join(active),
        )
        return cls(models[0], models[1], det_size=det_size, det_thresh=det_thresh, files=files)

    @property
    def detector(self) -> Any:
        """insightface's detector model."""
        return self.detection.detector

    @property
    def providers(self) -> list[str]:
        """The onnxruntime providers the detector session actually runs on."""
        return list(self.detector.session.get_providers())

    def _embed(self, bgr: np.ndarray, kps: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Raw embeddings ``[n, D]`` and the 112 px RGB aligned crops for the faces with keypoints ``kps``."""
        from insightface.utils import face_align

        size = int(self.recognizer.input_size[0])
        with warnings.catch_warnings():  # skimage deprecation inside insightface, once per call otherwise
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.utils\.face_align")
            crops = [face_align.norm_crop(bgr, landmark=points, image_size=size) for points in kps]
            if size != ALIGNED_SIZE:
                crops_112 = [face_align.norm_crop(bgr, landmark=points, image_size=ALIGNED_SIZE) for points in kps]
        if self._one_by_one:
            feats = np.concatenate([self.recognizer.get_feat([crop]) for crop in crops])
        else:
            feats = self.recognizer.get_feat(crops)
        if size != ALIGNED_SIZE:
            crops = crops_112
        aligned = [np.ascontiguousarray(crop[:, :, ::-1]) for crop in crops]
        return np.asarray(feats, np.float32).reshape(len(crops), -1), aligned

    def _faces(self, image: ImageInput, name: str, largest_only: bool) -> list[DetectedFace]:
        bgr = to_bgr_uint8(image, name)
        boxes, kps, scores = self.detection.detect(bgr, name)
        if not len(boxes):
            return []
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-areas, kind="stable")
        next_largest = float(areas[order[1]]) if largest_only and len(order) > 1 else 0.0
        if largest_only:
            order = order[:1]
        feats, aligned = self._embed(bgr, kps[order])
        faces = []
        for row, index in enumerate(order):
            norm = float(np.linalg.norm(feats[row]))
            faces.append(
                DetectedFace(
                    normed_embedding=(feats[row] / max(norm, 1e-12)).astype(np.float32),
                    bbox=boxes[index].copy(),
                    kps=kps[index].copy(),
                    det_score=float(scores[index]),
                    aligned=aligned[row],
                    name=name,
                    embedding_norm=norm,
                    next_largest_area=next_largest,
                )
            )
        return faces

    def detect_all(self, image: ImageInput, name: Optional[str] = None) -> list[DetectedFace]:
        """Every face in one photo, largest first; an empty list when there is none."""
        return self._faces(image, name or image_name(image, 0), largest_only=False)

    def analyze(self, image: ImageInput, name: Optional[str] = None) -> DetectedFace:
        """The largest face in one photo; ``NoFaceError`` (naming the photo) when there is none or it is too small."""
        name = name or image_name(image, 0)
        faces = self._faces(image, name, largest_only=True)
        if not faces:
            raise NoFaceError(f"no face found in {name}; {NO_FACE_ADVICE}", f"no face found in {name}")
        return _usable(faces[0])

    def identity(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        names: Optional[Sequence[str]] = None,
        on_photo: Optional[Callable[[int, int], None]] = None,
    ) -> IdentityResult:
        """One person's vector from one or several photos (or a ``BxHxWxC`` batch).

        The largest face of each photo counts once; photos without a face are listed in
        ``skipped_names`` and logged, and only when none has a face is it an error. A face unlike the
        others' and a photo whose largest face is a close call are logged too: either puts a stranger
        into the average. ``on_photo(done, total)`` runs after each photo: a host's progress bar, and
        its chance to stop a long batch.
        """
        items = as_image_list(images)
        if not items:
            raise NoFaceError("no photos were given; " + NO_FACE_ADVICE)
        if names is None:
            names = [image_name(item, index) for index, item in enumerate(items)]
        elif len(names) != len(items):
            raise ConfigError(f"{len(names)} names for {len(items)} photos")
        faces, skipped, reasons = [], [], []
        for done, (item, name) in enumerate(zip(items, names), start=1):
            try:
                faces.append(self.analyze(item, str(name)))
            except NoFaceError as error:
                skipped.append(str(name))
                reasons.append(error)
            if on_photo is not None:
                on_photo(done, len(items))
        if not faces:
            if len(items) == 1:
                raise reasons[0]
            raise NoFaceError(f"no usable face in any of the {len(items)} photos ({', '.join(skipped)}); {NO_FACE_ADVICE}")
        left_out = [
            "; ".join(e.reason for e in reasons[:5]) + (f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else "")
            + f", so {'it was' if len(skipped) == 1 else 'they were'} left out; the subject comes from "
            + _listed([face.name for face in faces])
        ] if skipped else []
        strangers = _stranger_notes(faces)
        for note in left_out + strangers:
            logger.warning("%s", note)
        small = [note for note in map(_small_face_note, faces) if note]  # analyze() has logged these, first
        return IdentityResult(
            embedding=average_identity([face.normed_embedding for face in faces]),
            faces=faces,
            skipped_names=skipped,
            notes=small + left_out + strangers,
        )
