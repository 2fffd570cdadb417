"""Training photos as the trainer reads them: EXIF-rotated phone photos, unreadable or mismatched mask files,
class words."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_core.errors import ConfigError
from trainer.data import FaceImages, load_face_images
from trainer.face_masks import attach_detector_masks

ROTATE_CW = 6
"""EXIF orientation of a phone held upright: the stored pixels must turn 90 degrees clockwise."""
UPRIGHT_BOX = [6.0, 10.0, 30.0, 44.0]
"""A face box in the upright photo's pixels (40 wide, 60 tall), what face analysis reports."""


def _upright_photo() -> Image.Image:
    """40 wide, 60 tall, every corner different, so a turned or mirrored copy cannot pass for it."""
    yy, xx = np.mgrid[:60, :40]
    rgb = np.stack([xx * 6, yy * 4, (xx + yy) % 32 * 8], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _upright_mask() -> Image.Image:
    mask = np.zeros((60, 40), np.uint8)
    mask[5:25, 3:15] = 255  # upper left: only one orientation puts it there
    return Image.fromarray(mask)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _phone_and_twin(root: Path) -> list[Path]:
    """``phone.jpg`` stored sideways with EXIF orientation 6, and ``twin.png``: the same pixels, stored upright."""
    root.mkdir(parents=True, exist_ok=True)
    _upright_photo().transpose(Image.Transpose.ROTATE_90).save(root / "phone.jpg", quality=95, exif=_exif(ROTATE_CW))
    with Image.open(root / "phone.jpg") as stored:  # the twin holds the phone's decoded pixels, upright
        stored.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(root / "twin.png")
    return [root / "phone.jpg", root / "twin.png"]


class BoxAnalyzer:
    """Face analysis stand-in: the same upright box for every photo (ID vectors are not needed here)."""

    def analyze(self, image, name=None):
        class Face:
            bbox = np.array(UPRIGHT_BOX)
            kps = np.array([[14.0, 22.0], [24.0, 22.0], [18.0, 28.0], [15.0, 36.0], [23.0, 36.0]])
            normed_embedding = np.ones(512, np.float32) / np.sqrt(512)

        return Face()


def test_exif_rotated_photo_gives_the_pixels_of_its_upright_twin(tmp_path):
    photos = FaceImages(tmp_path, _phone_and_twin(tmp_path), torch.zeros(2, 512), image_size=32)
    phone, twin = photos.load(0)[0], photos.load(1)[0]
    assert torch.equal(phone, twin)
    top_left, bottom_right = phone[1, :4, :4].mean(), phone[1, -4:, -4:].mean()  # green grows downwards
    assert top_left < bottom_right


def test_mask_of_an_exif_rotated_photo_lines_up_with_the_upright_face(tmp_path):
    paths = _phone_and_twin(tmp_path)
    _upright_mask().save(tmp_path / "phone_mask.png")  # drawn on the upright photo, no EXIF: used as is
    _upright_mask().save(tmp_path / "twin_mask.png")
    sideways = tmp_path / "side" / "phone.jpg"
    _phone_and_twin(sideways.parent)
    _upright_mask().transpose(Image.Transpose.ROTATE_90).save(sideways.parent / "phone_mask.png", exif=_exif(ROTATE_CW))
    photos = FaceImages(tmp_path, [*paths, sideways], torch.zeros(3, 512), image_size=32)
    masks = [photos.load(i)[1] for i in range(3)]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[1])
    assert masks[1][0, 10, 2] == 1 and masks[1][0, 10, 30] == 0


def test_detector_mask_of_an_exif_rotated_photo_is_drawn_upright(tmp_path):
    photos = FaceImages(tmp_path, _phone_and_twin(tmp_path), torch.zeros(2, 512), image_size=32)
    assert attach_detector_masks(photos, BoxAnalyzer, tmp_path / "boxes.json") == 2
    phone, twin = photos.load(0)[1], photos.load(1)[1]
    assert torch.equal(phone, twin) and 0 < float(twin.mean()) < 1


def _write_photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _upright_photo().save(path)
    return path


def _truncated_png(path: Path) -> None:
    """A mask whose header reads fine but whose pixel data is cut off (an interrupted copy)."""
    _upright_mask().save(path)
    path.write_bytes(path.read_bytes()[:60])


def test_unreadable_mask_files_are_found_at_startup_and_fall_back(tmp_path, caplog):
    root = tmp_path / "faces"
    good, garbage, cut = (_write_photo(root / name) for name in ("good.png", "garbage.png", "cut.png"))
    _upright_mask().save(root / "good_mask.png")
    (root / "garbage_mask.png").write_bytes(b"oops")
    _truncated_png(root / "cut_mask.png")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        photos = load_face_images(root, 32, tmp_path / "ids.safetensors", BoxAnalyzer, tmp_path / "no_face.txt")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "garbage_mask.png" in warned and "cut_mask.png" in warned and "good_mask.png" not in warned
    assert sorted(p.name for p in photos.paths) == ["cut.png", "garbage.png", "good.png"]  # no photo is dropped
    by_name = {p.name: i for i, p in enumerate(photos.paths)}
    assert photos.mask_files == {by_name["good.png"]: root / "good_mask.png"}
    assert float(photos.load(by_name["garbage.png"])[1].mean()) == 1.0  # stage 1: the whole photo counts
    assert float(photos.load(by_name["cut.png"])[1].mean()) == 1.0
    assert 0 < float(photos.load(by_name["good.png"])[1].mean()) < 1
    assert attach_detector_masks(photos, BoxAnalyzer, tmp_path / "boxes.json") == 2  # stage 2: a detector ellipse
    assert 0 < float(photos.load(by_name["garbage.png"])[1].mean()) < 1


def test_masks_of_another_shape_name_or_type_are_not_misused(tmp_path, caplog):
    """A mask is used only where its pixels line up with its photo's; any ``*_mask.*`` is never a photo."""
    root = tmp_path / "faces"
    for name in ("square.png", "scaled.png", "upper.png", "lossy.png"):
        _write_photo(root / name)  # 40 wide, 60 tall
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(root / "square_mask.png")  # a parser's fixed 64x64
    _upright_mask().resize((80, 120)).save(root / "scaled_mask.png")  # only scaled: fine
    _upright_mask().save(root / "upper_MASK.PNG")  # another case: still its mask
    _upright_mask().convert("RGB").save(root / "lossy_mask.jpg")  # JPEG noise would turn background into face
    _phone_and_twin(root / "phone")
    _upright_mask().transpose(Image.Transpose.ROTATE_90).save(root / "phone" / "phone_mask.png")  # pre-EXIF-turn
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        photos = load_face_images(root, 32, tmp_path / "ids.safetensors", BoxAnalyzer, tmp_path / "no_face.txt")
    assert sorted(p.name for p in photos.paths) == ["lossy.png", "phone.jpg", "scaled.png", "square.png", "twin.png",
                                                    "upper.png"]
    assert sorted(path.name for path in photos.mask_files.values()) == ["scaled_mask.png", "upper_MASK.PNG"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "square_mask.png: it is 64x64 upright and its photo 40x60, another shape" in warned
    assert "phone_mask.png: it is 60x40 upright and its photo 40x60" in warned
    assert "lossy_mask.jpg is not a PNG" in warned
    by_name = {p.name: i for i, p in enumerate(photos.paths)}
    assert torch.equal(photos.load(by_name["scaled.png"])[1], photos.load(by_name["upper.png"])[1])


def test_a_mask_two_photos_could_own_is_used_for_neither(tmp_path, caplog):
    """``c.png`` and ``c.jpg`` would both read ``c_mask.png``: which photo it was made for cannot be known."""
    root = tmp_path / "faces"
    for name in ("c.png", "C.jpg", "solo.png"):
        _write_photo(root / name)
    _upright_mask().save(root / "c_mask.png")
    _upright_mask().save(root / "solo_mask.png")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        photos = load_face_images(root, 32, tmp_path / "ids.safetensors", BoxAnalyzer, tmp_path / "no_face.txt")
    assert sorted(p.name for p in photos.paths) == ["C.jpg", "c.png", "solo.png"]  # no photo is dropped
    assert [path.name for path in photos.mask_files.values()] == ["solo_mask.png"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "c_mask.png would fit C.jpg and c.png alike" in warned[0]


def test_class_words_are_read_at_the_start_bom_and_all(tmp_path):
    """Read once, when the photos load: a class.txt that is not UTF-8 stops the start, not step 50 000."""
    root = tmp_path / "faces"
    paths = [_write_photo(root / "ann" / "1.png"), _write_photo(root / "bob" / "1.png")]
    (root / "ann" / "class.txt").write_bytes("\ufeff  old   woman \n".encode("utf-8"))  # Notepad's UTF-8
    (root / "bob" / "class.txt").write_bytes("ni\xf1o\n".encode("cp1252"))
    with pytest.raises(ConfigError, match=r"bob.class\.txt is not UTF-8 text"):
        FaceImages(root, paths, torch.zeros(2, 512), image_size=32)
    (root / "bob" / "class.txt").write_text("niño\n", encoding="utf-8")
    photos = FaceImages(root, paths, torch.zeros(2, 512), image_size=32)
    assert [photos.class_word(0), photos.class_word(1)] == ["old woman", "niño"]
