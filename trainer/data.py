"""Training images: a folder tree of face photos, their optional masks, and their cached ArcFace vectors.

A photo ``x.jpg`` may have ``x_mask.png`` beside it (any case; foreground = nonzero, e.g. BiSeNet parsing
label != 0). Photos without a detectable face are logged, listed in ``<output>/no_face.txt`` and
skipped; a folder with none at all is an error. A mask file that cannot be read, is not a PNG (JPEG noise
would turn background into face), has another shape than its photo or would fit two photos (``c.png`` and
``c.jpg``) is found at startup and ignored with
a warning (the photo trains with the fallback mask, as if it had none), so it cannot stop a run or
misplace a face hours in. Photos and masks are turned upright by their EXIF orientation, like face analysis
does, so pixels, ID vector and detector box all describe the same upright face. ArcFace vectors are computed once and cached in a
safetensors file keyed by relative path + size + mtime, so a changed or added photo is redone alone; the
cache records which face models made it, and one made by others is not used.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps
from safetensors import safe_open

from adaface_core.checkpoint import atomic_save_safetensors
from adaface_core.errors import ConfigError, ModelFileMissingError
from adaface_core.image_io import PHOTO_SUFFIXES, to_rgb_uint8, warn_unread_photos

logger = logging.getLogger(__name__)

MASK_STEM_SUFFIX = "_mask"
MASK_SUFFIX = MASK_STEM_SUFFIX + ".png"
CLASS_FILE = "class.txt"
"""Subject metadata: a folder's class word ('man', 'woman', 'girl'...) for stage 2's class prompts."""
_QUARTER_TURNS = (5, 6, 7, 8)
"""EXIF orientations whose upright picture swaps width and height."""
ID_CACHE_SAVE_SECONDS = 60.0
"""How often a long face analysis writes what it has so far to the ID cache."""
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for a missing, truncated, corrupt or oversized file (UnidentifiedImageError is an OSError)."""


def scan_images(root: Path) -> list[Path]:
    """Every image under ``root`` (sorted, so the order is the same on every machine), masks excluded."""
    root = Path(root)
    if not root.is_dir():
        raise ModelFileMissingError(f"training image folder not found: {root}")
    files = _files_under(root)
    warn_unread_photos(root, files)
    images = sorted(
        (p for p in files if p.suffix.lower() in PHOTO_SUFFIXES and not is_mask_file(p)),
        key=lambda p: p.relative_to(root).parts,  # as POSIX paths compare: Windows ones ignore case, giving other draws
    )
    if not images:
        raise ConfigError(f"no training images ({', '.join(PHOTO_SUFFIXES)}) under {root}")
    return images


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``, through linked folders too (a dataset assembled from symlinks), each real
    folder once (a link back up the tree is not a loop)."""
    seen: set[str] = set()
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / name for name in names if (Path(folder) / name).is_file()]
    return files


def is_mask_file(path: Path) -> bool:
    """``x_mask.png`` (any case, any image type): a mask, never a training photo."""
    return path.stem.lower().endswith(MASK_STEM_SUFFIX)


def _upright(img: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    turned = img.getexif().get(ExifTags.Base.Orientation, 1) in _QUARTER_TURNS
    return (size[1], size[0]) if turned else size


def upright_size(image: Path) -> tuple[int, int]:
    """``(width, height)`` of the photo as face analysis sees it (EXIF-rotated); cheap: only a PNG without
    EXIF in its header is decoded (PIL looks for EXIF stored after the pixels)."""
    with Image.open(image) as img:
        return _upright(img, img.size)


def header_upright_size(image: Path) -> tuple[int, int]:
    """``upright_size`` from the file's header only: a PNG's EXIF stored after its pixels is not looked for.
    Why: the startup check of every masked photo must not decode 400k PNGs."""
    with Image.open(image) as img:
        if img.format == "PNG" and "exif" not in img.info:
            return img.size
        return _upright(img, img.size)


def read_mask(mask_file: Path) -> Image.Image:
    """A mask file as a greyscale image, upright by its EXIF orientation (a no-op for the usual mask without EXIF)."""
    with Image.open(mask_file) as img:
        return ImageOps.exif_transpose(img).convert("L")


class _FolderNames:
    """Each folder's files by lower-case name, listed once: masks are matched whatever their case."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, Path]] = {}

    def get(self, folder: Path, name: str) -> Optional[Path]:
        if folder not in self._folders:
            self._folders[folder] = {child.name.lower(): child for child in folder.iterdir() if child.is_file()}
        return self._folders[folder].get(name.lower())


def find_mask_files(images: Sequence[Path]) -> dict[int, Path]:
    """The usable mask file of each photo that has one, by index; an unusable one is reported and left out.

    Why at startup: a photo is first drawn at a random step, possibly hours in, where a bad mask file
    would otherwise crash the run or put the face elsewhere. Left out, its photo gets the fallback mask
    like a photo without one.
    """
    found: dict[int, Path] = {}
    names = _FolderNames()
    namesakes: dict[tuple[Path, str], list[Path]] = {}
    for image in images:
        namesakes.setdefault((image.parent, image.stem.lower()), []).append(image)
    for index, image in enumerate(images):
        candidate = names.get(image.parent, image.stem + MASK_SUFFIX)
        sharing = namesakes[(image.parent, image.stem.lower())]
        if candidate is not None and len(sharing) > 1:
            if image == sharing[0]:
                logger.warning("mask file %s would fit %s alike: ignored for them all (they use the fallback mask); "
                               "rename the photos so each mask has one", candidate, " and ".join(p.name for p in sharing))
            continue
        if candidate is None:
            for suffix in PHOTO_SUFFIXES:
                other = names.get(image.parent, image.stem + MASK_STEM_SUFFIX + suffix)
                if other is not None:
                    logger.warning("mask file %s is not a PNG (lossy compression turns background into face): "
                                   "ignored; its photo uses the fallback mask", other)
            continue
        problem = _mask_problem(candidate, image)
        if problem is None:
            found[index] = candidate
        else:
            logger.warning("mask file %s: %s; its photo uses the fallback mask, as if it had none", candidate, problem)
    return found


def _mask_problem(mask_file: Path, photo: Path) -> Optional[str]:
    """Why the mask cannot be used, or None. Checks the file's structure and checksums without decoding its
    pixels (PIL's ``verify``, about 25x cheaper than reading it: 0.06 vs 1.4 ms at 512x512 here, which matters
    for 400k masks at every start), and that its upright shape is the photo's (a mask only scaled is fine)."""
    try:
        with Image.open(mask_file) as img:
            img.verify()  # PIL: only directly after opening
        width, height = header_upright_size(mask_file)
        photo_width, photo_height = header_upright_size(photo)
    except _UNREADABLE as exc:
        return f"cannot read it ({exc})"
    if abs(width * photo_height - height * photo_width) > 0.02 * max(width * photo_height, height * photo_width):
        return (f"it is {width}x{height} upright and its photo {photo_width}x{photo_height}, another shape, so its "
                "pixels would not line up with the photo's (made before an EXIF turn, or by a parser's fixed size?)")
    return None


def image_key(root: Path, image: Path) -> str:
    """Cache key of a photo: its path under the root, size and mtime (an edited photo is analysed again)."""
    stat = image.stat()
    return f"{image.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_id_cache(cache_file: Path, face_models: str) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """(vectors by key, keys without a face, unreadable keys) of the cache, empty when it is missing, damaged
    or made by other face models (another pack's vectors, of another size or space, must not train)."""
    if not cache_file.is_file():
        return {}, set(), set()
    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = json.loads(metadata.get("keys", "[]"))
            # A copy: safetensors maps the file, and Windows cannot replace a mapped file (the rewrite below).
            vectors = handle.get_tensor("vectors").clone() if keys else None
    except Exception as exc:  # a damaged cache is recomputed, never fatal
        logger.warning("ignoring unreadable face-ID cache %s (%s)", cache_file, exc)
        return {}, set(), set()
    if metadata.get("face_models", "") != face_models:
        logger.info("the face-ID cache %s was made with other face models: the photos are analysed again", cache_file)
        return {}, set(), set()
    return ({k: vectors[i] for i, k in enumerate(keys)}, set(json.loads(metadata.get("no_face", "[]"))),
            set(json.loads(metadata.get("unreadable", "[]"))))


def _write_id_cache(cache_file: Path, keys: list[str], stacked: torch.Tensor, no_face: set[str],
                    unreadable: set[str], face_models: str) -> None:
    """``stacked``: the ``[len(keys), D]`` vectors of ``keys``, in order."""
    atomic_save_safetensors({"vectors": stacked}, cache_file,
                            {"keys": json.dumps(keys), "no_face": json.dumps(sorted(no_face)),
                             "unreadable": json.dumps(sorted(unreadable)), "face_models": face_models})


def compute_face_ids(
    root: Path,
    images: Sequence[Path],
    cache_file: Path,
    analyzer_factory,
    skipped_file: Optional[Path] = None,
    face_models: str = "",
) -> tuple[list[Path], torch.Tensor]:
    """ArcFace unit vectors of ``images`` (cached); returns the photos with a face and their ``[M, D]`` vectors.

    ``analyzer_factory()`` builds the face analyser, only when some photo is not cached yet.
    ``face_models`` identifies the analyser's models (``FacePackFiles.fingerprint``): a cache made by
    others is not used. Photos without a face and unreadable ones are cached as such too (retried once
    the file changes), so a restart or another process does not load the face models for them.
    """
    from adaface_core.errors import NoFaceError

    cached, no_face_cached, unreadable_cached = _read_id_cache(cache_file, face_models)
    analyzer = None
    kept, vectors, skipped, keys, no_face, unreadable = [], [], [], [], [], []
    analysed, saved_at = 0, time.monotonic()

    def save_progress() -> None:
        """What is known so far, old entries included: an interrupted analysis resumes where it stopped."""
        if analysed:
            vectors_so_far = torch.stack(list(cached.values())).float() if cached else torch.zeros(0)
            _write_id_cache(cache_file, list(cached), vectors_so_far,
                            no_face_cached | set(no_face), unreadable_cached | set(unreadable), face_models)

    try:
        for image in images:
            key = image_key(root, image)
            if key in no_face_cached or key in unreadable_cached:
                skipped.append(image)
                (no_face if key in no_face_cached else unreadable).append(key)
                continue
            if key not in cached:
                if analyzer is None:
                    analyzer = analyzer_factory()
                if time.monotonic() - saved_at > ID_CACHE_SAVE_SECONDS:
                    save_progress()
                    saved_at = time.monotonic()
                analysed += 1
                try:
                    face = analyzer.analyze(str(image), name=str(image.relative_to(root)))
                    cached[key] = torch.as_tensor(np.asarray(face.normed_embedding, dtype=np.float32))
                except NoFaceError:
                    skipped.append(image)
                    no_face.append(key)
                    continue
                except Exception as exc:  # unreadable image: skipped and reported like a faceless one
                    logger.warning("cannot read %s: %s", image, exc)
                    skipped.append(image)
                    unreadable.append(key)
                    continue
            kept.append(image)
            keys.append(key)
            vectors.append(cached[key])
    except BaseException:  # Ctrl-C (or any error): hours of analysis are not lost; a SIGKILL loses a minute
        try:
            save_progress()
        except Exception as exc:  # a full disk must not hide why the analysis stopped
            logger.warning("could not save the face-ID cache so far to %s: %s", cache_file, exc)
        raise
    if skipped:
        logger.warning("%d image(s) without a detectable face (or unreadable) are skipped%s", len(skipped),
                       f" (listed in {skipped_file})" if skipped_file else "")
        for image in skipped[:20]:
            logger.warning("  no face: %s", image)
        if skipped_file is not None:
            skipped_file.parent.mkdir(parents=True, exist_ok=True)
            skipped_file.write_text("".join(f"{p}\n" for p in skipped), encoding="utf-8")
    if not kept:
        raise ConfigError(f"none of the {len(images)} images under {root} has a detectable face")
    stacked = torch.stack(vectors).float()
    if analyzer is not None or not cache_file.is_file():  # this set of photos only: entries of deleted ones go
        _write_id_cache(cache_file, keys, stacked, set(no_face), set(unreadable), face_models)
    logger.info("%d training faces (%d skipped), ArcFace vectors cached in %s", len(kept), len(skipped), cache_file)
    return kept, stacked


@dataclass
class FaceImages:
    """The usable photos and their vectors; loads a photo as ``[3, S, S]`` in [-1, 1] and its ``[1, S, S]`` mask."""

    root: Path
    paths: list[Path]
    id_vectors: torch.Tensor
    image_size: int
    fallback_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    """Masks for photos without a mask file (stage 2: from the detector, ``face_masks``); else all ones."""
    mask_files: dict[int, Path] = field(init=False, default_factory=dict, repr=False)
    """The photos' readable mask files by index, checked once here (``find_mask_files``)."""
    _class_words: dict[Path, Optional[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.mask_files = find_mask_files(self.paths)
        for index in range(len(self.paths)):  # every class.txt read now: a bad one fails the start, not hour 5
            self.class_word(index)

    def __len__(self) -> int:
        return len(self.paths)

    def class_word(self, index: int) -> Optional[str]:
        """The subject's class word: the first line of the nearest ``class.txt`` from the photo's folder up to the root."""
        folder = self.paths[index].parent
        while True:
            if folder not in self._class_words:
                self._class_words[folder] = _read_class_word(folder / CLASS_FILE)
            if self._class_words[folder] or folder == self.root or folder == folder.parent:
                return self._class_words[folder]
            folder = folder.parent

    def square_mask(self, mask: Image.Image) -> torch.Tensor:
        """A full-photo mask cropped and resized like the photo: ``[1, S, S]`` in {0, 1}."""
        m = _center_square(mask.convert("L")).resize((self.image_size, self.image_size), Image.NEAREST)
        return torch.from_numpy((np.asarray(m) > 0).astype(np.float32))[None]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The photo's pixels and mask. The pixels are read the way face analysis reads them (upright, alpha on
        black), so the latent shows the face the ID vector was computed from."""
        path = self.paths[index]
        size = self.image_size
        img = Image.fromarray(to_rgb_uint8(path, path.name))
        img = _center_square(img).resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        mask_file = self.mask_files.get(index)
        if mask_file is not None:
            mask = self.square_mask(read_mask(mask_file))
        else:
            mask = self.fallback_masks.get(index, torch.ones(1, size, size))
        return pixels, mask


def _read_class_word(file: Path) -> Optional[str]:
    """The first line that is neither empty nor a ``#`` comment, in UTF-8 (a BOM, as Notepad writes, is not
    part of the word)."""
    if not file.is_file():
        return None
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines[0] if lines else None


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, 1, S, S]`` pixel mask -> latent-resolution mask (a latent cell counts if any pixel does)."""
    return (F.adaptive_max_pool2d(mask, size) > 0).to(mask.dtype)


def load_face_images(root: Path, image_size: int, cache_file: Path, analyzer_factory,
                     skipped_file: Optional[Path], face_models: str = "") -> FaceImages:
    images = scan_images(root)
    kept, vectors = compute_face_ids(Path(root), images, cache_file, analyzer_factory, skipped_file, face_models)
    return FaceImages(Path(root), kept, vectors, image_size)
