"""`python -m adaface_core.embed`: photos -> an embedding file that works as `embedding:NAME` anywhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_core.embed import main
from adaface_core.face_analysis import FaceAnalyzer
from adaface_core.pipeline import SubjectEncoder
from adaface_core.textual_inversion import load_textual_inversion
from adaface_core.tiny_face_models import tiny_face_photo


def write_photos(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "front.png", folder / "side.jpg", folder / "wall.png"]
    Image.fromarray(tiny_face_photo(320)).save(paths[0])
    Image.fromarray(tiny_face_photo(400, color=(220, 200, 170))).save(paths[1], quality=95)
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(paths[2])  # no face: skipped, not fatal
    return paths


def args(tiny_models, face_pack: Path, out: Path, *photos: Path) -> list[str]:
    return [*map(str, photos), "--inverter", str(tiny_models.inverter), "--arc2face", str(tiny_models.encoder),
            "--tokenizer", str(tiny_models.tokenizer), "--face-models", str(face_pack), "--out", str(out),
            "--provider", "cpu", "--device", "cpu"]


def test_folder_of_photos_becomes_an_embedding_file(tmp_path, tiny_models, face_pack, capsys, caplog):
    write_photos(tmp_path / "alice")
    (tmp_path / "alice" / "IMG_0001.HEIC").write_bytes(b"an iPhone photo")  # Pillow cannot read it: named, not lost
    out = tmp_path / "embeddings" / "alice.safetensors"

    assert main(args(tiny_models, face_pack, out, tmp_path / "alice")) == 0
    assert "not read from" in caplog.text and "IMG_0001.HEIC (HEIC and AVIF" in caplog.text

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompt_word"] == "embedding:alice"
    assert summary["skipped"] == ["wall.png"] and sorted(summary["used"]) == ["front.png", "side.jpg"]
    vectors = load_textual_inversion(out)
    # The file holds exactly what the pipeline gives for the same photos.
    encoder = SubjectEncoder.from_paths(tiny_models.inverter, tiny_models.encoder, tiny_models.tokenizer,
                                        faces=FaceAnalyzer.from_folder(face_pack, provider="cpu"))
    subject, _ = encoder.encode_photos([str(tmp_path / "alice" / n) for n in ("front.png", "side.jpg", "wall.png")])
    assert vectors.shape == (16, tiny_models.spec.hidden_size)
    torch.testing.assert_close(vectors, subject.tokens, rtol=1e-5, atol=1e-5)


def test_existing_file_is_kept_unless_overwrite(tmp_path, tiny_models, face_pack):
    photo = write_photos(tmp_path / "p")[0]
    out = tmp_path / "bob.safetensors"
    out.write_bytes(b"keep me")

    assert main(args(tiny_models, face_pack, out, photo)) == 2
    assert out.read_bytes() == b"keep me"
    assert main(args(tiny_models, face_pack, out, photo) + ["--overwrite"]) == 0
    assert load_textual_inversion(out).shape[0] == 16


def test_bad_inputs_fail_with_one_clear_line(tmp_path, tiny_models, face_pack, caplog):
    black = write_photos(tmp_path / "p")[2]
    out = tmp_path / "x.safetensors"

    assert main(args(tiny_models, face_pack, out, black)) == 2
    assert "no face found in wall.png" in caplog.text and not out.exists()

    caplog.clear()
    missing = args(tiny_models, face_pack, out, black)
    missing[missing.index("--inverter") + 1] = str(tmp_path / "models" / "adaface" / "none.safetensors")
    assert main(missing) == 2
    assert "none.safetensors" in caplog.text

    caplog.clear()
    assert main(args(tiny_models, face_pack, tmp_path / "bad name!.safetensors", black)) == 2
    assert "embedding name" in caplog.text

    # A folder as --out would have written "<folder>.safetensors" beside it, outside the embeddings folder.
    caplog.clear()
    (tmp_path / "embeddings").mkdir()
    assert main(args(tiny_models, face_pack, tmp_path / "embeddings", black)) == 2
    assert "is a folder" in caplog.text and not (tmp_path / "embeddings.safetensors").exists()


def test_an_output_that_cannot_work_is_refused_before_any_model_loads(tmp_path, tiny_models, face_pack, caplog,
                                                                      read_only_folder):
    photo = write_photos(tmp_path / "p")[0]

    def error_for(out, *extra) -> str:
        caplog.clear()
        assert main(args(tiny_models, face_pack, out, photo) + list(extra)) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        return errors[0]

    assert "is a folder" in error_for(f"{tmp_path / 'new'}/")  # would have written new.safetensors beside it
    (tmp_path / "notes").write_text("a file")
    assert "notes is a file, not a folder" in error_for(tmp_path / "notes" / "alice.safetensors")
    (tmp_path / "alice.pt").write_bytes(b"an older embedding")
    assert "embedding:alice would also name" in error_for(tmp_path / "alice.safetensors")
    assert "give the name without it" in error_for(tmp_path / "dave.pt")  # not dave.pt.safetensors
    for strength in ("nan", "inf", "-1", "3"):  # NaN tokens would give black images with no error
        assert "--id-strength must be a number from 0 to 2" in error_for(tmp_path / "x.safetensors", "--id-strength", strength)
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "new.safetensors").exists()
    refused = error_for(read_only_folder(tmp_path / "mounted") / "x.safetensors")
    assert "cannot write" in refused and "x.safetensors: Permission denied" in refused and ".tmp" not in refused
    assert "no permission to make folders in" in error_for(tmp_path / "mounted" / "new" / "x.safetensors")
    assert not (tmp_path / "mounted" / "new").exists()


def test_a_tilde_in_the_output_is_the_home_folder(tmp_path, tiny_models, face_pack, monkeypatch):
    """``--out=~/x`` reaches the program unexpanded (no shell expands it after '='): it must not make a '~' folder."""
    photo = write_photos(tmp_path / "p")[0]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(args(tiny_models, face_pack, Path("~/alice.safetensors"), photo)) == 0
    assert (tmp_path / "home" / "alice.safetensors").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_device_this_machine_lacks_is_one_clear_line(tmp_path, tiny_models, face_pack, caplog, device):
    photo = write_photos(tmp_path / "p")[0]
    assert main(args(tiny_models, face_pack, tmp_path / "x.safetensors", photo) + ["--device", device]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and repr(device) in errors[0]


def test_an_inverter_and_encoder_that_do_not_belong_together_is_one_clear_line(tmp_path, tiny_models, face_pack, caplog):
    from adaface_core.tiny_models import TinySpec, write_inverter_file

    photo = write_photos(tmp_path / "p")[0]
    narrow = write_inverter_file(TinySpec(hidden_size=32), tmp_path / "narrow.safetensors")
    call = args(tiny_models, face_pack, tmp_path / "x.safetensors", photo)
    call[call.index("--inverter") + 1] = str(narrow)
    assert main(call) == 2
    assert "the Arc2Face encoder is 64 wide but the inverter expects 32" in caplog.text


def test_hidden_files_in_a_photo_folder_are_not_photos(tmp_path):
    """macOS leaves ``._name.jpg`` companions on zips and USB sticks; they are not images and must not stop a run."""
    from adaface_core.embed import collect_photos

    Image.fromarray(tiny_face_photo(64)).save(tmp_path / "alice.jpg")
    (tmp_path / "._alice.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert collect_photos([tmp_path]) == [tmp_path / "alice.jpg"]


def test_every_photo_format_pillow_reads_is_collected(tmp_path):
    """Windows browsers save JPEGs as .jfif; a GIF is read by its first frame. None is passed over unnamed."""
    from adaface_core.embed import collect_photos

    for name, kind in (("a.jfif", "JPEG"), ("b.gif", "GIF"), ("c.JPE", "JPEG"), ("d.bmp", "BMP")):
        Image.fromarray(tiny_face_photo(64)).save(tmp_path / name, format=kind)
    assert [p.name for p in collect_photos([tmp_path])] == ["a.jfif", "b.gif", "c.JPE", "d.bmp"]
