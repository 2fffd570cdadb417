"""Where the faces of one photo are: insightface's SCRFD detector, run until it finds them.

A single detector run misses what users' photos often hold: a face that fills the frame (a tight crop),
a small face in a very large photo, and a face turned sideways or upside down (read with its keypoints as
if upright, which gives another person's ArcFace vector). The tries here retry at smaller sizes, with a
black border and on larger canvases, check a first find of only small faces for a frame-filling one, and
read a doubtful photo each way up.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import numpy as np

from .errors import ConfigError
from .image_io import DetectionCanvas, detection_canvas

logger = logging.getLogger(__name__)

Detection = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Boxes ``[n, 4]``, keypoints ``[n, 5, 2]`` (the photo's own pixels) and scores ``[n]``."""

RETRY_DET_SIZES = (640, 512, 384, 256)
LARGE_CANVAS_SIDES = (1280, 1920)
"""Canvases for a last try on big photos, where shrinking to ``det_size`` made a real face too small."""
SMALL_IMAGE_SIDE = 256  # below this, tight crops are framed in a border before the first try
BYSTANDER_FRACTION = 4
"""A first hit whose largest face is under 1/4 of the photo's shorter side may be a bystander beside a
frame-filling face that try missed: one more try, with a border at the smallest detector size (a sixth of
the first try's cost), runs, and its faces win when its largest is at least twice as big."""
TURN_CHECK_SCORE = 0.75
"""A largest face scoring under this (or no face at all) may be in a photo turned sideways or upside down,
where SCRFD often reads the keypoints as if upright and ArcFace then gives someone else's vector; the photo
is then read each way up, with and without a border (seven more detector runs). buffalo_s on the test
photos: upright faces score 0.74-0.88, the same faces turned 0.50-0.78, and no turn of an upright photo
ever scored higher."""
TURN_MARGIN = 0.1
"""How much better a turned photo's largest face must score to be read that way up."""

def _largest_side(boxes: np.ndarray) -> float:
    """The side of the square as large as the largest box: a face's size, whatever its aspect."""
    return float(np.sqrt(np.max((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))))


def _largest_score(found: Detection) -> float:
    boxes, _, scores = found
    return float(scores[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))])


def _unturn(points: np.ndarray, quarter_turns: int, height: int, width: int) -> np.ndarray:
    """Points ``[..., 2]`` found in ``np.rot90(photo, quarter_turns)`` in the ``height x width`` photo's pixels."""
    x, y = points[..., 0], points[..., 1]
    if quarter_turns == 1:
        x, y = width - y, x
    elif quarter_turns == 2:
        x, y = width - x, height - y
    elif quarter_turns == 3:
        x, y = y, height - x
    return np.stack([x, y], axis=-1).astype(points.dtype)


def _fixed_detector_size(detector: Any) -> Optional[tuple[int, int]]:
    """(width, height) when the detector graph has a fixed input, which rules out the retries."""
    shape = detector.session.get_inputs()[0].shape
    if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:4]):
        return int(shape[3]), int(shape[2])
    return None


class FaceDetection:
    """An insightface detector with the tries that find the faces one run misses."""

    def __init__(self, detector: Any, det_size: int = 640, det_thresh: float = 0.5):
        if getattr(detector, "taskname", None) != "detection":
            raise ConfigError(f"{getattr(detector, 'model_file', detector)} is not a face detector")
        if not getattr(detector, "use_kps", False):
            raise ConfigError(
                f"detector {getattr(detector, 'model_file', '')} gives no facial keypoints, which alignment "
                "needs; use a *_bnkps model such as scrfd_10g_bnkps.onnx"
            )
        if det_size < 64 or det_size % 32:
            raise ConfigError(f"det_size must be a multiple of 32 from 64 up (the detector's largest stride), got {det_size}")
        self.detector = detector
        self.det_size = int(det_size)
        self.det_thresh = float(det_thresh)
        fixed = _fixed_detector_size(detector)
        self.resizable = fixed is None
        if fixed is not None:
            self.det_sizes: list[tuple[int, int]] = [fixed]
        else:
            sizes = [self.det_size] + [s for s in RETRY_DET_SIZES if s < self.det_size]
            self.det_sizes = [(s, s) for s in sizes]
        self.max_side = max(max(size) for size in self.det_sizes)
        # ctx_id 0 keeps the providers the sessions were made with (negative would force CPU).
        detector.prepare(0, det_thresh=self.det_thresh, nms_thresh=0.4)

    def _attempts(self, bgr: np.ndarray) -> Iterator[tuple[DetectionCanvas, tuple[int, int], bool]]:
        """The (canvas, detector input size, enlarged) tries, in order: as given, then with a border, smaller
        sizes within each; last, for photos shrunk to fit, larger canvases where a small face is big enough to see."""
        small = min(bgr.shape[:2]) < SMALL_IMAGE_SIDE
        for pad in (small, not small):
            canvas = detection_canvas(bgr, self.max_side, pad)
            for size in self.det_sizes:
                yield canvas, size, False
        longest = max(bgr.shape[:2])
        if self.resizable and longest > self.max_side:
            for side in LARGE_CANVAS_SIDES:
                canvas = detection_canvas(bgr, side, False)
                input_side = -(-max(canvas.image.shape[:2]) // 32) * 32  # the detector's largest stride
                yield canvas, (input_side, input_side), True
                if side >= longest:
                    break

    def _try(self, canvas: DetectionCanvas, size: tuple[int, int]) -> Optional[Detection]:
        """One detector run: boxes, keypoints (original pixels) and scores, or None when it finds no face."""
        height, width = canvas.image.shape[:2]
        if min(height, width) * min(size) < max(height, width):
            return None  # a sliver (e.g. 1x300): the detector's aspect-keeping resize would make a side 0 px
        dets, kps = self.detector.detect(canvas.image, input_size=size, max_num=0)
        if dets is None or not len(dets) or kps is None:
            return None
        boxes, points = canvas.to_original(dets, kps)
        return boxes, points, dets[:, 4].astype(np.float32)

    def _detect_upright(self, bgr: np.ndarray) -> Optional[Detection]:
        """Boxes, keypoints (original pixels) and scores from the first try that finds any, None when none
        does; when its faces are all small, one cheap try with a border checks for a frame-filling face
        that try missed (``BYSTANDER_FRACTION``)."""
        for attempt, (canvas, size, enlarged) in enumerate(self._attempts(bgr)):
            found = self._try(canvas, size)
            if found is None:
                continue
            if attempt:
                logger.debug("face found on try %d (canvas %s, det size %s)", attempt + 1, canvas.image.shape[:2], size)
            if not enlarged and _largest_side(found[0]) * BYSTANDER_FRACTION < min(bgr.shape[:2]):
                closer = self._try(detection_canvas(bgr, self.max_side, True), min(self.det_sizes, key=min))
                if closer is not None and _largest_side(closer[0]) >= 2 * _largest_side(found[0]):
                    logger.debug("a frame-filling face outranks the %.0f px one found first", _largest_side(found[0]))
                    return closer
            return found
        return None

    def _turned(self, bgr: np.ndarray, quarter_turns: int, pad: bool) -> Optional[Detection]:
        """One detector run on the photo turned by ``quarter_turns`` (``np.rot90``), in the photo's own pixels."""
        turned = np.ascontiguousarray(np.rot90(bgr, quarter_turns)) if quarter_turns else bgr
        hit = self._try(detection_canvas(turned, self.max_side, pad), self.det_sizes[0])
        if hit is None or not quarter_turns:
            return hit
        height, width = bgr.shape[:2]
        boxes, points, scores = hit
        corners = _unturn(boxes.reshape(-1, 2, 2), quarter_turns, height, width)
        boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
        return boxes, _unturn(points, quarter_turns, height, width), scores

    def detect(self, bgr: np.ndarray, name: str) -> Detection:
        """Boxes ``[n, 4]``, keypoints ``[n, 5, 2]`` (original pixels) and scores ``[n]``.

        A photo whose largest face is doubtful or missing is read once more each way up, with and without a
        border (tight crops need one, and like is compared with like), and a turn wins when its largest face
        scores clearly better than every upright reading and is not a much smaller face (a bystander upright
        in a corner must not replace a subject whose face is partly covered): ``TURN_CHECK_SCORE``.
        """
        found = self._detect_upright(bgr)
        score = _largest_score(found) if found is not None else 0.0
        if score < TURN_CHECK_SCORE:
            first_pad = min(bgr.shape[:2]) < SMALL_IMAGE_SIDE  # the canvas of the first try, already read
            readings = {(turns, pad): self._turned(bgr, turns, pad) for turns in range(4) for pad in (False, True)
                        if turns or pad != first_pad}
            scores = {key: _largest_score(reading) if reading is not None else 0.0 for key, reading in readings.items()}
            upright = max(score, scores[0, not first_pad])
            best = max((key for key in readings if key[0]), key=scores.__getitem__)
            least_side = _largest_side(found[0]) / 2 if found is not None else 0.0
            if (readings[best] is not None and scores[best] >= upright + TURN_MARGIN
                    and _largest_side(readings[best][0]) >= least_side):
                logger.info("%s is read turned by %d degrees: its face is upright that way", name, 90 * best[0])
                return readings[best]
        if found is None:
            empty = np.zeros((0,), np.float32)
            return empty.reshape(0, 4), empty.reshape(0, 5, 2), empty
        return found

