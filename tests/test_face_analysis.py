"""Face analysis: pack-folder layouts with tiny ONNX files, then real photos with real buffalo_s models."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from PIL import Image

from adaface_core.errors import AdaFaceError, ConfigError, ModelFileMissingError, NoFaceError
from adaface_core.face_analysis import FaceAnalyzer, FaceModelLoadError, average_identity
from adaface_core.face_pack import onnx_providers, resolve_face_pack
from adaface_core.image_io import BadImageError, detection_canvas, to_rgb_uint8
from adaface_core.tiny_face_models import tiny_face_photo, write_tiny_face_pack, write_tiny_recognizer
from helpers_faces import require_buffalo_s_pack, require_faces

# ---------------------------------------------------------------- tiny packs: layout and loading


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    return write_tiny_face_pack(tmp_path_factory.mktemp("faces") / "antelopev2")


@pytest.fixture(scope="module")
def tiny_analyzer(tiny_pack) -> FaceAnalyzer:
    return FaceAnalyzer.from_folder(tiny_pack, provider="cpu")


bright_square = tiny_face_photo  # the tiny detector's idea of a face: a bright patch on black


def test_tiny_antelopev2_pack_loads_through_insightface_classes(tiny_analyzer):
    files = tiny_analyzer.files
    assert files.detector.name == "scrfd_10g_bnkps.onnx"
    assert files.recognizer.name == "glintr100.onnx"
    assert type(tiny_analyzer.detector).__name__ in ("SCRFD", "RetinaFace")
    assert isinstance(tiny_analyzer.recognizer, ArcFaceONNX)
    assert tiny_analyzer.providers == ["CPUExecutionProvider"]


def test_arcface_onnx_replaces_glintr100(tmp_path):
    pack = write_tiny_face_pack(tmp_path / "antelopev2", layout="arc2face")
    assert (pack / "glintr100.onnx").is_file()
    analyzer = FaceAnalyzer.from_folder(pack, provider="cpu")
    assert analyzer.files.recognizer.name == "arcface.onnx"
    assert analyzer.recognizer.model_file.endswith("arcface.onnx")


def test_a_packs_fingerprint_tells_its_models_apart_and_survives_a_copy(tmp_path, tiny_pack):
    """What the trainer's face caches record: another recogniser must not pass for this one, a copy must."""
    copy = shutil.copytree(tiny_pack, tmp_path / "elsewhere" / "antelopev2")
    assert resolve_face_pack(copy).fingerprint == resolve_face_pack(tiny_pack).fingerprint
    arc2face = resolve_face_pack(write_tiny_face_pack(tmp_path / "arc" / "antelopev2", layout="arc2face")).fingerprint
    assert "arcface.onnx:" in arc2face and arc2face != resolve_face_pack(tiny_pack).fingerprint


def test_tiny_pack_runs_the_whole_path(tiny_analyzer):
    face = tiny_analyzer.analyze(bright_square(), name="square")
    assert face.normed_embedding.shape == (512,) and face.normed_embedding.dtype == np.float32
    assert abs(np.linalg.norm(face.normed_embedding) - 1.0) < 1e-5
    assert face.aligned.shape == (112, 112, 3) and face.aligned.dtype == np.uint8
    assert face.kps.shape == (5, 2) and face.bbox.shape == (4,) and 0.5 < face.det_score <= 1.0
    assert face.embedding_tensor().shape == (512,)
    faces = tiny_analyzer.detect_all(bright_square())
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True) and areas[0] == pytest.approx(face.area)
    with pytest.raises(NoFaceError, match="no face found in black.png; use a photo where the face is clearly visible"):
        tiny_analyzer.analyze(np.zeros((300, 300, 3), np.uint8), name="black.png")
    assert tiny_analyzer.detect_all(np.zeros((300, 300, 3), np.uint8)) == []


def test_tiny_identity_skips_the_photo_without_a_face(tiny_analyzer):
    black = np.zeros((300, 300, 3), np.uint8)
    result = tiny_analyzer.identity([bright_square(), black, bright_square(400)], names=["a", "b", "c"])
    assert result.skipped_names == ["b"] and result.used_names == ["a", "c"]
    assert result.report().splitlines()[:2] == [
        "2 of 3 photos used (a, c)", "no face found in b, so it was left out; the subject comes from a, c"]
    assert abs(np.linalg.norm(result.embedding) - 1.0) < 1e-5
    with pytest.raises(NoFaceError, match=r"any of the 2 photos \(image 0, image 1\)"):
        tiny_analyzer.identity(np.stack([black, black]))  # a batch, as a ComfyUI IMAGE is


def test_a_sliver_of_an_image_is_a_photo_without_a_face_not_a_crash(tiny_analyzer):
    """1x300 and 300x1 strips (a stray banner in a photo folder) used to crash OpenCV inside the detector."""
    for sliver in (np.full((1, 300, 3), 200, np.uint8), np.full((3000, 3, 3), 200, np.uint8)):
        result = tiny_analyzer.identity([bright_square(), sliver], names=["face", "strip"])
        assert result.skipped_names == ["strip"] and result.used_names == ["face"]


def test_recognizer_dim_and_graph_classification_by_content(tmp_path):
    """Files with unknown names are told apart the way insightface does; extras are ignored."""
    pack = write_tiny_face_pack(tmp_path / "src", layout="buffalo_s", recognizer_dim=256)
    renamed = tmp_path / "mine"
    renamed.mkdir()
    shutil.copy(pack / "scrfd_500m_bnkps.onnx", renamed / "my_detector.onnx")
    shutil.copy(pack / "w600k_mbf.onnx", renamed / "my_recogniser.onnx")
    shutil.copy(pack / "2d106det.onnx", renamed / "landmarks.onnx")
    files = resolve_face_pack(renamed)
    assert (files.detector.name, files.recognizer.name) == ("my_detector.onnx", "my_recogniser.onnx")
    face = FaceAnalyzer.from_folder(renamed, provider="cpu").analyze(bright_square())
    assert face.normed_embedding.shape == (256,)


def test_two_unknown_recognisers_are_ambiguous(tmp_path):
    write_tiny_face_pack(tmp_path, with_extras=False)
    (tmp_path / "glintr100.onnx").rename(tmp_path / "rec_a.onnx")
    write_tiny_recognizer(tmp_path / "rec_b.onnx")
    with pytest.raises(ConfigError, match="several recognition models"):
        resolve_face_pack(tmp_path)


def test_missing_folder_names_folder_and_files(tmp_path):
    missing = tmp_path / "models" / "insightface" / "models" / "antelopev2"
    with pytest.raises(ModelFileMissingError) as info:
        FaceAnalyzer.from_folder(missing)
    message = str(info.value)
    assert str(missing) in message and "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert "downloaded" in message


def test_empty_folder_names_folder_and_files(tmp_path):
    with pytest.raises(ModelFileMissingError) as info:
        resolve_face_pack(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "no .onnx files" in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message and "arcface.onnx" in message


def test_doubly_nested_pack_is_pointed_out(tmp_path):
    outer = tmp_path / "antelopev2"
    write_tiny_face_pack(outer / "antelopev2")
    with pytest.raises(ModelFileMissingError) as info:
        resolve_face_pack(outer)
    assert f"seem to be in {outer / 'antelopev2'}" in str(info.value)
    assert str(outer) in str(info.value)


def test_parent_folder_is_pointed_to_the_pack(tmp_path):
    root = tmp_path / "insightface"
    write_tiny_face_pack(root / "models" / "antelopev2")
    with pytest.raises(ModelFileMissingError, match="seem to be in .*models.antelopev2"):
        resolve_face_pack(root)


def test_pack_without_recogniser_says_which_is_missing(tmp_path):
    write_tiny_face_pack(tmp_path)
    (tmp_path / "glintr100.onnx").unlink()
    with pytest.raises(ModelFileMissingError, match="lacks a face recogniser") as info:
        resolve_face_pack(tmp_path)
    assert "scrfd_10g_bnkps.onnx" in str(info.value)  # lists what it has


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 16923827\n"


def test_damaged_model_file_is_named(tmp_path, tiny_analyzer):
    write_tiny_face_pack(tmp_path, with_extras=False)
    (tmp_path / "glintr100.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(FaceModelLoadError, match="glintr100.onnx") as damaged:
        FaceAnalyzer.from_folder(tmp_path, provider="cpu")
    assert "LFS" not in str(damaged.value)
    (tmp_path / "glintr100.onnx").write_bytes(LFS_POINTER)  # a clone made without git-lfs
    with pytest.raises(FaceModelLoadError, match="glintr100.onnx is a Git LFS pointer, not the model.*git lfs pull"):
        FaceAnalyzer.from_folder(tmp_path, provider="cpu")
    with pytest.raises(ConfigError, match="multiple of 32"):
        FaceAnalyzer(tiny_analyzer.detector, tiny_analyzer.recognizer, det_size=600)


def test_file_instead_of_folder(tiny_pack):
    with pytest.raises(ModelFileMissingError, match="is a file"):
        resolve_face_pack(tiny_pack / "glintr100.onnx")


def test_an_upper_case_onnx_ending_is_named_for_renaming(tmp_path):
    """A pack unzipped on Windows can read GLINTR100.ONNX; insightface's router then takes it for no model."""
    write_tiny_face_pack(tmp_path, with_extras=False)
    (tmp_path / "glintr100.onnx").rename(tmp_path / "GLINTR100.ONNX")
    with pytest.raises(ConfigError, match=r"GLINTR100.ONNX: .*lower-case .onnx; rename it to GLINTR100.onnx"):
        FaceAnalyzer.from_folder(tmp_path, provider="cpu")


def test_provider_choice():
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto", gpu) == gpu
    assert onnx_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert onnx_providers("auto", ["ROCMExecutionProvider", "CPUExecutionProvider"])[0] == "ROCMExecutionProvider"
    mac = ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto", mac) == ["CPUExecutionProvider"]  # SCRFD fails under CoreML at its first photo
    assert onnx_providers("coreml", mac) == mac  # chosen, it is tried
    windows = ["DmlExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto", windows) == ["CPUExecutionProvider"] and onnx_providers("directml", windows) == windows
    assert onnx_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert onnx_providers("CUDA", gpu) == gpu
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        onnx_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="unknown face-analysis provider"):
        onnx_providers("tpu", gpu)


# ---------------------------------------------------------------- image conversion (no models)


def test_image_conversions(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(to_rgb_uint8(rgb), rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(to_rgb_uint8(rgba), rgb)
    rgba[:, :, 3] = 0
    assert not to_rgb_uint8(rgba).any()  # transparent -> black
    grey = rgb[:, :, 0]
    for variant in (grey, grey[:, :, None]):
        assert np.array_equal(to_rgb_uint8(variant), np.repeat(grey[:, :, None], 3, axis=2))
    assert np.array_equal(to_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)
    assert np.array_equal(to_rgb_uint8(rgb.astype(np.float32) / 255.0), rgb)
    assert np.array_equal(to_rgb_uint8(torch.from_numpy(rgb).float()[None] / 255.0), rgb)  # ComfyUI IMAGE
    assert np.array_equal(to_rgb_uint8(np.transpose(rgb, (2, 0, 1))), rgb)  # CxHxW
    assert np.array_equal(to_rgb_uint8(Image.fromarray(grey.astype(np.uint16) * 257)), to_rgb_uint8(grey))  # PIL I;16
    assert np.array_equal(to_rgb_uint8(Image.fromarray(rgba).convert("LA")), np.zeros_like(rgb))
    Image.fromarray(rgb).save(tmp_path / "x.png")
    assert np.array_equal(to_rgb_uint8(tmp_path / "x.png"), rgb)
    with pytest.raises(BadImageError, match="does not exist"):
        to_rgb_uint8(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="is a folder, not an image file"):
        to_rgb_uint8(tmp_path)
    with pytest.raises(BadImageError, match="expected 0..1"):
        to_rgb_uint8(np.full((4, 4, 3), -3.0, np.float32))
    # A brightened or bicubic-upscaled ComfyUI IMAGE overshoots 0..1 a little: clipped, not read as 0..255.
    overshoot = rgb.astype(np.float32) / 255.0 * 1.3 - 0.13
    assert np.array_equal(to_rgb_uint8(overshoot), to_rgb_uint8(np.clip(overshoot, 0.0, 1.0)))
    assert to_rgb_uint8(overshoot).max() == 255
    with pytest.raises(BadImageError, match="batch of 2"):
        to_rgb_uint8(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(BadImageError, match="shape"):
        to_rgb_uint8(np.zeros((8, 8, 5), np.uint8))


def test_no_image_is_silently_misread(tmp_path):
    """Inputs that look fine but mean something else: each is read for what it is, or refused by name."""
    grey = np.random.default_rng(1).integers(0, 200, (40, 50)).astype(np.uint16)  # a dark 16-bit photo
    Image.frombytes("I;16B", (50, 40), grey.astype(">u2").tobytes()).save(tmp_path / "dark.tif")  # big-endian
    for big_endian in (grey.astype(">u2"), tmp_path / "dark.tif"):
        assert np.array_equal(to_rgb_uint8(big_endian), to_rgb_uint8(grey))
        assert to_rgb_uint8(big_endian).max() <= 1  # 199/65535 of full scale, not 199/255
    palette = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P")
    assert np.array_equal(to_rgb_uint8(palette.convert("PA")), np.asarray(palette.convert("RGB")))  # colours, not indices
    signed = np.random.default_rng(3).random((16, 16, 3), dtype=np.float32) * 2 - 1  # diffusers' -1..1 range
    with pytest.raises(BadImageError, match=r"looks like a -1..1 image; map it to 0..1 first \(\(x \+ 1\) / 2\)"):
        to_rgb_uint8(torch.from_numpy(signed)[None])


def test_detection_canvas_maps_back():
    bgr = np.zeros((3000, 1500, 3), np.uint8)
    canvas = detection_canvas(bgr, max_side=640, pad=True)
    assert max(canvas.image.shape[:2]) == 1280  # shrunk to 640, then a 320 px border
    boxes = np.array([[320 + 32, 320 + 64, 320 + 96, 320 + 128, 0.9]], np.float32)
    kps = np.full((1, 5, 2), 320 + 64, np.float32)
    back_boxes, back_kps = canvas.to_original(boxes, kps)
    np.testing.assert_allclose(back_boxes[0], [150, 300, 450, 600], rtol=1e-2)
    np.testing.assert_allclose(back_kps[0, 0], [300, 300], rtol=1e-2)


def test_average_identity_is_unit_mean():
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1] * 3.0
    np.testing.assert_allclose(average_identity([a, b]), np.array([1, 1, 0, 0]) / np.sqrt(2), atol=1e-6)
    with pytest.raises(AdaFaceError):
        average_identity([a, -a])


# ---------------------------------------------------------------- real models, real photos


@pytest.fixture(scope="module")
def faces() -> Path:
    return require_faces()


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory) -> FaceAnalyzer:
    pack = require_buffalo_s_pack(tmp_path_factory.mktemp("packs") / "buffalo_s")
    return FaceAnalyzer.from_folder(pack, provider="cpu")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_johns_tight_crops_all_found_and_told_apart(analyzer, faces):
    """150x150 crops need the automatic border; same person > 0.45, different people < 0.3."""
    paths = sorted((faces / "labeled").glob("John_*/*.jpg"))
    assert len(paths) == 55
    vectors = np.stack([analyzer.analyze(path).normed_embedding for path in paths])
    people = np.array([path.parent.name for path in paths])
    sims = vectors @ vectors.T
    same = (people[:, None] == people[None, :]) & ~np.eye(len(paths), dtype=bool)
    different = people[:, None] != people[None, :]
    logging.getLogger(__name__).info("same min %.3f, different max %.3f", sims[same].min(), sims[different].max())
    assert sims[same].min() > 0.45
    assert sims[different].max() < 0.3


def test_yao_ming_is_picked_out_of_the_team_photo(analyzer, faces):
    yao = analyzer.analyze(faces / "labeled" / "Yao_Ming" / "yaoming.jpg")
    team = analyzer.detect_all(faces / "groups" / "players.jpg")
    assert len(team) >= 20
    sims = sorted((float(face.normed_embedding @ yao.normed_embedding) for face in team), reverse=True)
    assert sims[0] > 0.5
    assert sims[1] < 0.25


def test_ice_block_has_no_face(analyzer, faces):
    with pytest.raises(NoFaceError, match="no face found in ice_block.jpg; use a photo where the face is clearly visible"):
        analyzer.analyze(faces / "no_face" / "ice_block.jpg")


def test_group_photo_gives_the_largest_face_by_true_area(analyzer, faces):
    path = faces / "groups" / "t1.jpg"
    everyone = analyzer.detect_all(path)
    assert len(everyone) == 6
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in everyone]
    assert areas == sorted(areas, reverse=True)
    chosen = analyzer.analyze(path)
    np.testing.assert_allclose(chosen.bbox, everyone[0].bbox)
    assert chosen.area == pytest.approx(max(areas))


def test_several_photos_average_and_a_faceless_one_is_skipped(analyzer, faces):
    obama = sorted((faces / "labeled" / "Barack_Obama").glob("*.jpg"))
    ice = faces / "no_face" / "ice_block.jpg"
    result = analyzer.identity([obama[0], ice, *obama[1:]])
    assert result.skipped_names == ["ice_block.jpg"]
    assert result.used_names == [p.name for p in obama]
    assert abs(np.linalg.norm(result.embedding) - 1.0) < 1e-5
    expected = average_identity([f.normed_embedding for f in result.faces])
    np.testing.assert_allclose(result.embedding, expected, atol=1e-6)
    assert min(cosine(result.embedding, f.normed_embedding) for f in result.faces) > 0.6
    biden = analyzer.analyze(faces / "labeled" / "Joe_Biden" / "biden.jpg")
    assert cosine(result.embedding, biden.normed_embedding) < 0.3
    with pytest.raises(NoFaceError, match="no face found in ice_block.jpg"):
        analyzer.identity([ice])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_stranger_among_one_persons_photos_is_named(analyzer, faces, caplog):
    """A wrong photo in the batch (or a video whose largest face changes hands) would be averaged silently."""
    salley = sorted((faces / "labeled" / "John_Salley").glob("*.jpg"))[:3]
    savage = sorted((faces / "labeled" / "John_Savage").glob("*.jpg"))[0]
    with caplog.at_level(logging.WARNING, logger="adaface_core.face_analysis"):
        assert analyzer.identity(salley).report() == f"3 of 3 photos used ({', '.join(p.name for p in salley)}); nothing to check"
        assert _warnings(caplog) == []
        result = analyzer.identity([*salley, savage])
        (stranger,) = _warnings(caplog)
        assert f"the face in {savage.name} (" in stranger and not any(p.name in stranger for p in salley)
        assert result.notes == [stranger] and result.report().splitlines()[1:] == [stranger]  # what the node shows
        caplog.clear()
        analyzer.identity([salley[0], savage])
        (pair,) = _warnings(caplog)
        assert f"{salley[0].name} and {savage.name} do not look like one person" in pair


def test_a_group_photo_whose_largest_face_is_a_close_call_is_named(analyzer, faces, caplog):
    with caplog.at_level(logging.WARNING, logger="adaface_core.face_analysis"):
        analyzer.identity([faces / "labeled" / "Barack_Obama" / "obama.jpg"])
        assert _warnings(caplog) == []
        analyzer.identity([faces / "groups" / "t1.jpg"])  # six faces of about one size
    assert any("t1.jpg has several faces of about the same size" in w for w in _warnings(caplog))


def test_input_formats_on_a_real_photo(analyzer, faces):
    image = np.array(Image.open(faces / "labeled" / "Grace_Hopper" / "grace_hopper_512x512.jpg").convert("RGB"))
    reference = analyzer.analyze(image).normed_embedding
    alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
    variants = {
        "rgba": (np.concatenate([image, alpha], axis=2), 0.99),
        "uint16": (image.astype(np.uint16) * 257, 0.99),
        "float": (image.astype(np.float32) / 255.0, 0.99),
        "comfy tensor": (torch.from_numpy(image).float()[None] / 255.0, 0.99),
        "pil rgba": (Image.fromarray(image).convert("RGBA"), 0.99),
        "grey 2-D": (np.asarray(Image.fromarray(image).convert("L")), 0.8),
        "grey HxWx1": (np.asarray(Image.fromarray(image).convert("L"))[:, :, None], 0.8),
    }
    for label, (variant, floor) in variants.items():
        assert cosine(analyzer.analyze(variant, name=label).normed_embedding, reference) > floor, label


def test_huge_photo_maps_box_back_to_original_pixels(analyzer, faces):
    image = np.asarray(Image.open(faces / "labeled" / "Grace_Hopper" / "grace_hopper_512x512.jpg").convert("RGB"))
    base = analyzer.analyze(image)
    huge = analyzer.analyze(np.kron(image, np.ones((8, 8, 1), np.uint8)))  # 4096x4096
    np.testing.assert_allclose(huge.bbox, base.bbox * 8, atol=8 * 3)  # within 3 original pixels
    np.testing.assert_allclose(huge.kps, base.kps * 8, atol=8 * 3)
    assert cosine(huge.normed_embedding, base.normed_embedding) > 0.9


def test_a_turned_photo_gives_its_persons_face_in_its_own_pixels(analyzer, faces, caplog):
    """Upside down, SCRFD reads Obama's keypoints as if upright and ArcFace gives a stranger (cosine about
    0); sideways some of John Salley's and John Schneider's photos do the same. Each is read turned back, and
    its box and keypoints are still in the photo's own pixels."""
    photos = [faces / "labeled" / "Barack_Obama" / "obama.jpg", faces / "labeled" / "Joe_Biden" / "biden.jpg",
              faces / "labeled" / "John_Salley" / "000179_02159509.jpg",
              faces / "labeled" / "John_Schneider" / "000288_00925786.jpg"]
    for path in photos:
        image = np.asarray(Image.open(path).convert("RGB"))
        upright = analyzer.analyze(image, name=path.name)
        height, width = image.shape[:2]
        for quarter_turns in (1, 2, 3):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="adaface_core.face_detection"):
                turned = analyzer.analyze(np.ascontiguousarray(np.rot90(image, quarter_turns)), name="turned.jpg")
            assert cosine(turned.normed_embedding, upright.normed_embedding) > 0.8, (path.name, quarter_turns)
            # np.rot90's turn applied to the upright keypoints: where they are in the turned photo
            x, y = upright.kps[:, 0], upright.kps[:, 1]
            expected = {1: (y, width - x), 2: (width - x, height - y), 3: (height - y, x)}[quarter_turns]
            np.testing.assert_allclose(turned.kps, np.stack(expected, axis=1), atol=6)
    assert "turned.jpg is read turned by" in caplog.text


def test_a_turned_tight_crop_is_read_turned_back(analyzer, faces):
    """A crop to Biden's face, turned a quarter: found only with a border, which the turned readings need too."""
    image = np.asarray(Image.open(faces / "labeled" / "Joe_Biden" / "biden.jpg").convert("RGB"))
    upright = analyzer.analyze(image)
    x0, y0, x1, y1 = upright.bbox
    half = 0.65 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    crop = Image.fromarray(image[int(max(cy - half, 0)):int(cy + half), int(max(cx - half, 0)):int(cx + half)])
    turned = np.ascontiguousarray(np.rot90(np.asarray(crop.resize((400, 400), Image.BICUBIC)), 3))
    assert cosine(analyzer.analyze(turned, name="crop.jpg").normed_embedding, upright.normed_embedding) > 0.8


def test_a_bystander_turned_upright_does_not_replace_a_partly_covered_subject(analyzer, faces):
    """Obama with the lower part of his face covered scores low, and a small Grace Hopper lies sideways in a
    corner: turned, hers is the better-scoring face, but it is a much smaller one, so he stays the subject."""
    obama = np.asarray(Image.open(faces / "labeled" / "Barack_Obama" / "obama.jpg").convert("RGB"))
    subject = analyzer.analyze(obama)
    x0, y0, x1, y1 = subject.bbox.astype(int)
    photo = obama.copy()
    photo[int(y1 - 0.4 * (y1 - y0)):y1, x0:x1] = 90
    photo[20:280, 20:280] = np.rot90(np.asarray(Image.fromarray(grace_hopper(faces)).resize((260, 260))), 1)
    found = analyzer.analyze(photo, name="covered.jpg")
    assert found.det_score < 0.75  # doubtful: the turned readings ran
    assert cosine(found.normed_embedding, subject.normed_embedding) > 0.7
    assert cosine(found.normed_embedding, analyzer.analyze(grace_hopper(faces)).normed_embedding) < 0.3


def test_an_upright_photo_is_never_read_turned(analyzer, faces, caplog):
    """Every test portrait and group photo, upright, gives the face a plain detection gives."""
    with caplog.at_level(logging.INFO, logger="adaface_core.face_detection"):
        for path in sorted((faces / "labeled").glob("*/*.jpg")) + sorted((faces / "groups").glob("*.jpg")):
            analyzer.analyze(path)
    assert "is read turned by" not in caplog.text


def grace_hopper(faces: Path) -> np.ndarray:
    return np.asarray(Image.open(faces / "labeled" / "Grace_Hopper" / "grace_hopper_512x512.jpg").convert("RGB"))


def test_a_face_too_small_to_identify_is_refused_not_misread(analyzer, faces):
    """Shrunk to 32 px her face is about 12 px: ArcFace would give somebody else, so it is an error."""
    thumb = np.asarray(Image.fromarray(grace_hopper(faces)).resize((32, 32), Image.BICUBIC))
    with pytest.raises(NoFaceError, match=r"only \d+ pixels across, too small"):
        analyzer.analyze(thumb, name="thumb.png")
    result = analyzer.identity([thumb, grace_hopper(faces)], names=["thumb.png", "full.jpg"])
    assert result.skipped_names == ["thumb.png"] and result.used_names == ["full.jpg"]


def test_a_small_face_in_a_very_large_photo_is_found(analyzer, faces):
    """A 5120x3840 photo with a ~100 px face: shrunk to 640 the face is too small, a larger canvas finds it."""
    image = grace_hopper(faces)
    portrait = np.asarray(Image.fromarray(image).resize((192, 192), Image.BICUBIC))
    canvas = np.full((3840, 5120, 3), 90, np.uint8)
    canvas[1800:1992, 3000:3192] = portrait
    face = analyzer.analyze(canvas, name="wide.jpg")
    assert 3000 <= face.bbox[0] and face.bbox[2] <= 3192 and 1800 <= face.bbox[1] and face.bbox[3] <= 1992
    assert cosine(face.normed_embedding, analyzer.analyze(image).normed_embedding) > 0.7


def test_a_bystander_does_not_take_the_place_of_a_frame_filling_face(analyzer, faces):
    """A close-up fills the frame, which the first try misses, and a small face hangs behind it: the person
    is the close-up, found on a later try, not the one face the first try saw."""
    john = np.asarray(Image.open(sorted((faces / "labeled" / "John_Salley").glob("*.jpg"))[0]).convert("RGB"))
    close_up = np.asarray(Image.fromarray(john).resize((600, 600), Image.BICUBIC))
    obama = np.asarray(Image.open(faces / "labeled" / "Barack_Obama" / "obama.jpg").convert("RGB"))
    poster = np.asarray(Image.fromarray(obama[60:460, 330:660]).resize((60, 73), Image.BICUBIC))
    photo = np.full((600, 800, 3), 128, np.uint8)
    photo[:, :600] = close_up
    photo[250:323, 680:740] = poster
    face = analyzer.analyze(photo, name="selfie.jpg")
    assert face.bbox[2] - face.bbox[0] > 200  # the close-up's box, not the 60 px poster's
    assert cosine(face.normed_embedding, analyzer.analyze(john).normed_embedding) > 0.6
    assert cosine(face.normed_embedding, analyzer.analyze(obama).normed_embedding) < 0.3


def test_a_dark_16_bit_photo_keeps_its_depth(faces):
    dark = (grace_hopper(faces).astype(np.uint16) // 4)  # 16-bit values all <= 255: a very dark 16-bit photo
    rgb = to_rgb_uint8(dark, "dark.png")
    assert rgb.max() <= 1  # 63/65535 of full scale, not 63/255
    assert to_rgb_uint8(dark.astype(np.int64), "ints").max() == 63  # no depth in the dtype: judged by range


def test_an_oversized_file_is_a_clear_error_not_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "poster.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # Pillow refuses > 2x this
    with pytest.raises(BadImageError, match="too large to open safely"):
        to_rgb_uint8(path)
