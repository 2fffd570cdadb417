"""Face masks for photos that have no ``<name>_mask.png``: an ellipse from the detector's box and keypoints.

Why: the elastic face-preserving loss (stage 2) needs to know where the face is. Parsing masks (BiSeNet)
are best; where a photo has none, the face box holds the face, and the five keypoints (eyes, nose, mouth
corners) must lie inside whatever we call the face, so the ellipse is widened until they do.
Detections are cached in ``<output>/face_boxes.json`` (keyed like the ArcFace cache, with the face models
that made them) so a restart does not run the detector again; the file is replaced in one rename, and one
that is damaged anyway, or from other face models, is started afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from adaface_core.checkpoint import atomic_write_text

from .data import FaceImages, image_key, upright_size

logger = logging.getLogger(__name__)


def ellipse_mask(bbox: Sequence[float], kps: Optional[np.ndarray], width: int, height: int) -> np.ndarray:
    """``[height, width]`` bool: the ellipse inscribed in ``bbox`` (x1, y1, x2, y2), grown to hold every keypoint."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max((x2 - x1) / 2, 1.0), max((y2 - y1) / 2, 1.0)
    if kps is not None and len(kps):
        # The farthest keypoint in ellipse units; scale both radii so it sits on the boundary (plus a margin).
        reach = float(np.sqrt((((kps[:, 0] - cx) / rx) ** 2 + ((kps[:, 1] - cy) / ry) ** 2).max()))
        if reach > 1.0:
            rx, ry = rx * reach * 1.05, ry * reach * 1.05
    yy, xx = np.mgrid[:height, :width]
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


def _detect(path: Path, root: Path, analyzer) -> Optional[dict]:
    from adaface_core.errors import NoFaceError

    try:
        face = analyzer.analyze(str(path), name=str(path.relative_to(root)))
    except NoFaceError:
        return None
    return {"bbox": [float(v) for v in face.bbox], "kps": np.asarray(face.kps, dtype=float).tolist()}


def _read_boxes(cache_file: Path, face_models: str) -> dict:
    """The cached detections by photo key; {} when there are none, they are damaged or from other models."""
    if not cache_file.is_file():
        return {}
    try:
        stored = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the damaged face-box cache %s (%s): the detector runs again", cache_file, exc)
        return {}
    if not isinstance(stored, dict) or stored.get("face_models") != face_models or not isinstance(stored.get("boxes"), dict):
        logger.info("the face-box cache %s is from other face models: the detector runs again", cache_file)
        return {}
    return stored["boxes"]


def attach_detector_masks(images: FaceImages, analyzer_factory: Callable[[], object], cache_file: Path,
                          face_models: str = "") -> int:
    """Gives every photo without a mask file a box-and-keypoint ellipse mask (``images.fallback_masks``).

    Returns how many photos got one. ``analyzer_factory()`` is called only if some photo is not cached;
    ``face_models`` identifies its models (see ``compute_face_ids``).
    A photo whose mask file is unreadable counts as one without (``images.mask_files`` lists the readable ones).
    The ellipse is drawn on the upright (EXIF-rotated) photo, where face analysis found the box.
    """
    from PIL import Image

    cache = _read_boxes(cache_file, face_models)
    analyzer, changed, masks = None, False, {}
    for index, path in enumerate(images.paths):
        if index in images.mask_files:
            continue
        key = image_key(images.root, path)
        if key not in cache:
            analyzer = analyzer or analyzer_factory()
            cache[key] = _detect(path, images.root, analyzer)
            changed = True
        if cache[key] is None:
            continue
        width, height = upright_size(path)
        inside = ellipse_mask(cache[key]["bbox"], np.asarray(cache[key]["kps"]), width, height)
        masks[index] = Image.fromarray((inside * 255).astype(np.uint8))
    if changed:
        atomic_write_text(cache_file, json.dumps({"face_models": face_models, "boxes": cache}))
    images.fallback_masks = {i: images.square_mask(m) for i, m in masks.items()}
    logger.info("%d photo(s) without a mask file use a detector-box mask", len(masks))
    return len(masks)

