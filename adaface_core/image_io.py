"""Turning whatever image a user has into the 8-bit RGB array face analysis needs, and back-mapping
detections from the canvas the detector saw.

Photos arrive as file paths, PIL images, ComfyUI IMAGE tensors (float 0..1, batch first) or numpy
arrays of any common depth and channel count. Each is either converted faithfully or rejected with
a message that says what was wrong; none is silently misread (a 16-bit PNG read as 8-bit, say).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import AdaFaceError

logger = logging.getLogger(__name__)

ImageInput = Union[str, "os.PathLike[str]", np.ndarray, Image.Image, Any]
"""A file path, PIL image, numpy array (HxW, HxWxC or CxHxW) or torch tensor (ComfyUI IMAGE)."""


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""What a folder of photos is read for: what Pillow decodes (a GIF or WebP by its first frame). ``.jfif`` is
how Windows browsers often save a JPEG."""


UNREAD_PHOTO_SUFFIXES = (".heic", ".heif", ".avif")
"""Phone formats Pillow does not decode without a plug-in: named in a warning, never silently passed over."""


def warn_unread_photos(folder: Path, files: Sequence[Path]) -> None:
    """A warning naming the HEIC/AVIF photos among ``files`` (those in ``folder``), which are not read."""
    unread = [str(p.relative_to(folder)) for p in files if p.suffix.lower() in UNREAD_PHOTO_SUFFIXES]
    if unread:
        logger.warning("not read from %s: %s (HEIC and AVIF photos need saving as JPEG or PNG first)", folder,
                       ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else ""))


class BadImageError(AdaFaceError, ValueError):
    """An image that cannot be read or has a layout or value range that cannot be interpreted."""


def image_name(image: ImageInput, index: int) -> str:
    """A name for messages: the file name for paths, else ``image <index>``."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return f"image {index}"


def as_image_list(images: Union[ImageInput, Sequence[ImageInput]]) -> list[ImageInput]:
    """A list of single images from a list, one image, or a batch (``BxHxWxC`` array or tensor)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    shape = getattr(images, "shape", None)
    if shape is not None and len(shape) == 4:
        return [images[i] for i in range(shape[0])]
    return [images]


def image_file(image: Union[str, "os.PathLike[str]"]) -> Path:
    """The file a path names (``~`` expanded); a clear error when there is none."""
    path = Path(image).expanduser()
    if path.is_dir():
        raise BadImageError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise BadImageError(f"image file {path} does not exist")
    return path


def _to_numpy(image: ImageInput, name: str) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        path = image_file(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)  # phone photos are stored sideways
        except Image.DecompressionBombError as error:
            raise BadImageError(f"image {path} is too large to open safely ({error}); scale it down first") from error
        except (OSError, ValueError) as error:
            raise BadImageError(f"cannot read image {path}: {error}") from error
    if isinstance(image, Image.Image):
        if image.mode in ("P", "PA"):  # palette indices are not colours
            image = image.convert("RGBA")
        elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
            image = image.convert("RGB")
        return np.asarray(image)
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch
        image = image.detach().cpu()
        return (image.float() if image.is_floating_point() else image).numpy()
    if isinstance(image, np.ndarray):
        return image
    raise BadImageError(f"{name}: unsupported image type {type(image).__name__}; give a path, PIL image or array")


FLOAT_OVERSHOOT = 1.0
"""How far above 1 a float image may go and still be read as 0..1 (clipped); a 0..255 float image
reaches far higher."""
FLOAT_UNDERSHOOT = 0.25
"""How far below 0 a float image may go and still be read as 0..1 (clipped). Further down it is most
likely a -1..1 image (the range of diffusers' and VAE tensors), which clipping would half blacken."""


def _unit_range(array: np.ndarray, name: str) -> np.ndarray:
    """Values as float32 in 0..1, judged from the dtype (and for floats, the range)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        low, high = float(array.min()), float(array.max())
        if low >= -FLOAT_UNDERSHOOT and high <= 1.0 + FLOAT_OVERSHOOT:
            # ComfyUI IMAGEs: brightened or bicubic-upscaled ones overshoot 0..1 a little, unclamped
            return np.clip(array, 0.0, 1.0)
        if low >= -1.0 - FLOAT_UNDERSHOOT and high <= 1.0 + FLOAT_OVERSHOOT:
            raise BadImageError(f"{name}: float image values span {low:.3g}..{high:.3g}, which looks like a -1..1 "
                                "image; map it to 0..1 first ((x + 1) / 2)")
        if low >= 0.0 and high <= 255.0:
            logger.debug("%s: float image with values up to %.1f read as 0..255", name, high)
            return array / 255.0
        raise BadImageError(f"{name}: float image values span {low:.3g}..{high:.3g}; expected 0..1 (or 0..255)")
    if np.issubdtype(array.dtype, np.integer):
        high = int(array.max()) if array.size else 0
        if int(array.min()) < 0:
            raise BadImageError(f"{name}: integer image has negative values")
        # The dtype decides where it can: a dark 16-bit photo (values <= 255) is still 16-bit, in
        # either byte order (a big-endian TIFF reads as >u2, which is not np.uint16).
        if array.dtype.kind == "u" and array.dtype.itemsize == 1:
            return array.astype(np.float32) / 255.0
        if array.dtype.kind == "u" and array.dtype.itemsize == 2:
            return array.astype(np.float32) / 65535.0
        if high <= 255:  # wider integer types (numpy's default int64) carry no depth: judge by range
            return array.astype(np.float32) / 255.0
        if high <= 65535:
            return array.astype(np.float32) / 65535.0
        raise BadImageError(f"{name}: integer image values reach {high}; expected 8- or 16-bit")
    raise BadImageError(f"{name}: unsupported pixel type {array.dtype}")


def to_rgb_uint8(image: ImageInput, name: str = "image") -> np.ndarray:
    """``HxWx3`` uint8 RGB from any supported input.

    Alpha is composited onto black (what transparent areas look like to the detector anyway), grey
    is repeated into three channels, 16-bit and float data are scaled to 8 bits.
    """
    array = _to_numpy(image, name)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise BadImageError(f"{name}: a batch of {array.shape[0]} images where one was expected (identity() takes several)")
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 2, 3, 4):
        array = np.transpose(array, (1, 2, 0))  # CxHxW (torch layout) to HxWxC
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise BadImageError(f"{name}: cannot read an image of shape {tuple(array.shape)}; expected HxW or HxWx1/3/4")
    if array.dtype == np.uint8 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    unit = _unit_range(array, name)
    channels = unit.shape[2]
    if channels in (2, 4):
        colour, alpha = unit[:, :, : channels - 1], unit[:, :, channels - 1 :]
        unit = colour * alpha
    if unit.shape[2] == 1:
        unit = np.repeat(unit, 3, axis=2)
    return np.ascontiguousarray(np.round(unit * 255.0).astype(np.uint8))


def to_bgr_uint8(image: ImageInput, name: str = "image") -> np.ndarray:
    """``HxWx3`` uint8 BGR, the channel order insightface's models expect."""
    return np.ascontiguousarray(to_rgb_uint8(image, name)[:, :, ::-1])


@dataclass(frozen=True)
class DetectionCanvas:
    """The picture the detector sees: the photo scaled by ``scale`` then shifted by ``offset`` pixels."""

    image: np.ndarray
    scale: float
    offset: float

    def to_original(self, boxes: np.ndarray, kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``[n, 4]`` and keypoints ``[n, 5, 2]`` in the original photo's pixels."""
        boxes = (boxes[:, :4].astype(np.float32) - self.offset) / self.scale
        kps = (kps.astype(np.float32) - self.offset) / self.scale
        return boxes, kps


def detection_canvas(bgr: np.ndarray, max_side: int, pad: bool) -> DetectionCanvas:
    """Shrink the photo to at most ``max_side`` and optionally frame it in a black border.

    Shrinking with area averaging here avoids the aliasing of the detector's own bilinear resize on
    very large photos. The border (half the longer side on every edge) gives tight face crops the
    context the detector was trained with: SCRFD misses a face that fills the whole frame.
    """
    height, width = bgr.shape[:2]
    scale = 1.0
    if max(height, width) > max_side:
        scale = max_side / float(max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        scale = bgr.shape[1] / float(width)
    offset = 0
    if pad:
        offset = max(bgr.shape[:2]) // 2
        bgr = cv2.copyMakeBorder(bgr, offset, offset, offset, offset, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return DetectionCanvas(image=bgr, scale=scale, offset=float(offset))

