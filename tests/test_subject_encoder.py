"""SubjectEncoder: every photo form face analysis takes, and a photo cache that never hands one picture
another's identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_core.face_analysis import FaceAnalyzer
from adaface_core.image_io import BadImageError
from adaface_core.pipeline import SubjectEncoder
from adaface_core.tiny_face_models import tiny_face_photo


@pytest.fixture(scope="module")
def encoder(tiny_models, face_pack) -> SubjectEncoder:
    return SubjectEncoder.from_paths(tiny_models.inverter, tiny_models.encoder, tiny_models.tokenizer,
                                     faces=FaceAnalyzer.from_folder(face_pack, provider="cpu"))


def test_one_photo_in_any_form_gives_its_subject(encoder, tmp_path, monkeypatch):
    photo = tiny_face_photo()
    expected = encoder.encode_photos([photo])[0]
    Image.fromarray(photo).save(tmp_path / "me.png")
    monkeypatch.setenv("HOME", str(tmp_path))  # '~' is the user's home, as face analysis reads it
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    for form in (photo, str(tmp_path / "me.png"), "~/me.png", torch.from_numpy(photo)[None].float() / 255):
        torch.testing.assert_close(encoder.encode_photos(form)[0].tokens, expected.tokens)
    bf16 = encoder.encode_photos(torch.from_numpy(photo)[None].to(torch.bfloat16) / 255)[0]  # a bf16 IMAGE batch
    assert torch.nn.functional.cosine_similarity(bf16.id_vector, expected.id_vector, dim=0) > 0.99
    with pytest.raises(BadImageError, match="does not exist"):
        encoder.encode_photos("~/not_there.png")


def test_pictures_that_differ_only_in_their_palette_are_two_identities(encoder):
    """A palette image's pixel array holds only indices: the same indices with other colours are another photo."""
    first = Image.fromarray(tiny_face_photo()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    second = first.copy()
    second.putpalette([255 - v for v in first.getpalette()])
    cached = encoder.encode_photos([first])[1].embedding
    other = encoder.encode_photos([second])[1].embedding
    fresh = encoder.faces.identity([second]).embedding
    assert not np.allclose(other, cached) and np.allclose(other, fresh)
