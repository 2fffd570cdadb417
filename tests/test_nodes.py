"""The ComfyUI nodes, run through the pack as ComfyUI loads it, on tiny models in the users' folder layouts."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from adaface_core.tiny_face_models import write_tiny_face_pack
from adaface_core.tokenizer import load_clip_tokenizer
from adaface_core.weights import load_clip_text_folder
from comfy_env import comfy_env
from comfy_standin import StandInClip

INVERTER = "tiny_inverter.safetensors"
ARC2FACE = "arc2face_models"
FACES = "antelopev2"


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    with comfy_env(tmp_path_factory.mktemp("comfy") / "ComfyUI", tiny_models.tokenizer) as env:
        models = env.models
        (models / "adaface").mkdir()
        shutil.copy(tiny_models.inverter, models / "adaface" / INVERTER)
        shutil.copytree(tiny_models.arc2face, models / "arc2face" / ARC2FACE)
        # The tiny encoder is 64 wide, so the tiny recogniser's vectors are too (ArcFace's 512 fit 768).
        write_tiny_face_pack(models / "insightface" / "models" / FACES, recognizer_dim=64)
        (models / "embeddings").mkdir()
        assert not (models / "arc2face" / ARC2FACE / "tokenizer").exists()  # so ComfyUI's sd1_tokenizer is used
        yield env


@pytest.fixture(scope="module")
def adaface(env):
    return env.node("AdaFaceLoader").load(INVERTER, ARC2FACE, FACES, "CPU")[0]


@pytest.fixture(scope="module")
def clip(tiny_models):
    return StandInClip(load_clip_tokenizer(tiny_models.tokenizer), load_clip_text_folder(tiny_models.sd15 / "text_encoder"))


def photo(corner: int = 80, colour=(0.9, 0.7, 0.6), size: int = 320) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] holding what the tiny detector takes for a face (a bright square)."""
    image = torch.zeros(1, size, size, 3)
    image[0, corner : corner + 160, corner : corner + 160] = torch.tensor(colour)
    return image


@pytest.fixture(scope="module")
def subject(env, adaface):
    return env.node("AdaFaceFaceEmbed").embed([adaface], [photo()])[0]


def word_subject(env, clip, word: str):
    """A subject whose tokens are the input embedding of a real word (so injecting it must equal the word)."""
    ids = clip.tokenizer(word, add_special_tokens=False)["input_ids"]
    tokens = clip.text_model.embeddings.token_embedding.weight[ids].detach().clone()
    SubjectEmbedding = env.core("subject", "SubjectEmbedding")
    return SubjectEmbedding(tokens=tokens, pad_embeds=torch.zeros_like(tokens), id_vector=torch.ones(64) / 8.0, sources=(word,))


def inject(env, clip, subject, text="a photo of z", **options):
    args = {"placeholder": "z", "id_strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "append_if_missing": False} | options
    return env.node("AdaFaceInjectSubject").inject(clip, subject, text, **args)[0]


# ------------------------------------------------------------------ loading and model folders


def test_loader_lists_the_models_in_comfyui_folders(env):
    required = env.pack.NODE_CLASS_MAPPINGS["AdaFaceLoader"].INPUT_TYPES()["required"]
    assert required["inverter"][0] == [INVERTER]
    assert required["arc2face"][0] == [ARC2FACE]
    assert required["face_models"][0] == [FACES]
    assert required["provider"][0] == ["auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML"]


def test_loader_builds_the_bundle_through_model_management(env, adaface):
    assert adaface.subjects.faces.providers == ["CPUExecutionProvider"]
    assert adaface.patcher.load_device == torch.device("cpu")
    assert adaface.arc2face_folder == env.models / "arc2face" / ARC2FACE
    # the patcher holds exactly the encoder and inverter modules the SubjectEncoder uses
    assert adaface.patcher.model["encoder"] is adaface.subjects.encoder
    assert adaface.patcher.model["inverter"] is adaface.subjects.inverter


@pytest.mark.parametrize(
    "inputs, where",
    [
        (("missing.safetensors", ARC2FACE, FACES), "adaface"),
        ((INVERTER, "not_there", FACES), "arc2face"),
        ((INVERTER, ARC2FACE, "buffalo_l"), "insightface"),
    ],
)
def test_missing_model_names_the_folder_to_put_it_in(env, inputs, where):
    with pytest.raises(env.core("errors", "ModelFileMissingError")) as error:
        env.node("AdaFaceLoader").load(*inputs, "auto")
    assert str(env.models / where) in str(error.value)
    # ComfyUI validates a queued workflow before running it: the same message, instead of "not in list".
    loader = env.pack.NODE_CLASS_MAPPINGS["AdaFaceLoader"]
    assert loader.VALIDATE_INPUTS(*inputs) == str(error.value)
    assert loader.VALIDATE_INPUTS(INVERTER, ARC2FACE, FACES) is True


@pytest.mark.parametrize("field", ["arc2face", "face_models"])
def test_loader_reads_models_only_from_comfyui_folders(env, tmp_path, field):
    """A shared workflow or an API call can send any string: a path out of the model folders is refused,
    even where a complete model folder sits at the other end (copied there from the real one)."""
    real = {"arc2face": env.models / "arc2face" / ARC2FACE, "face_models": env.models / "insightface" / "models" / FACES}[field]
    elsewhere = tmp_path / "elsewhere" / real.name
    shutil.copytree(real, elsewhere)
    climbing = os.path.relpath(elsewhere, real.parent)
    loader = env.pack.NODE_CLASS_MAPPINGS["AdaFaceLoader"]
    chosen = {"inverter": INVERTER, "arc2face": ARC2FACE, "face_models": FACES}
    for outside in (str(elsewhere), climbing):
        inputs = chosen | {field: outside}
        message = loader.VALIDATE_INPUTS(**inputs)
        assert isinstance(message, str) and "is not a folder name" in message and str(real.parent) in message
        with pytest.raises(env.core("errors", "ModelFileMissingError"), match="is not a folder name"):
            env.node("AdaFaceLoader").load(**inputs, provider="auto")


def test_validation_names_every_missing_model_at_once(env):
    """ComfyUI puts the message under each input it validates: one run shows all that is missing."""
    loader = env.pack.NODE_CLASS_MAPPINGS["AdaFaceLoader"]
    message = loader.VALIDATE_INPUTS("missing.safetensors", ARC2FACE, "buffalo_l")
    assert isinstance(message, str) and "missing.safetensors" in message and "buffalo_l" in message
    assert str(env.models / "adaface") in message and str(env.models / "insightface") in message
    assert ARC2FACE not in message  # the one that is there is not reported


def test_loader_reruns_when_a_model_file_is_replaced_under_its_name(env):
    """ComfyUI reuses the loader's output while IS_CHANGED stays the same: a new file must change it."""
    loader = env.pack.NODE_CLASS_MAPPINGS["AdaFaceLoader"]
    before = loader.IS_CHANGED(INVERTER, ARC2FACE, FACES, "auto")
    assert loader.IS_CHANGED(INVERTER, ARC2FACE, FACES, "auto") == before
    faces = env.models / "insightface" / "models" / FACES
    for replaced in (env.models / "adaface" / INVERTER, next(faces.glob("*.onnx")),
                     env.models / "arc2face" / ARC2FACE / "encoder" / "pytorch_model.bin"):
        stat = replaced.stat()
        os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        after = loader.IS_CHANGED(INVERTER, ARC2FACE, FACES, "auto")
        assert after != before, replaced
        before = after
    assert "missing" in loader.IS_CHANGED("missing.safetensors", ARC2FACE, FACES, "auto")


@pytest.mark.parametrize("field", ["inverter", "arc2face", "face_models"])
def test_a_model_name_from_a_link_passes_validation_and_keeps_the_cached_models(env, field):
    """A name linked from another node reaches validation and IS_CHANGED as None (ComfyUI has no value yet):
    it must not fail the prompt, nor make every queue reload the models; the name is checked when the node runs."""
    loader = env.pack.NODE_CLASS_MAPPINGS["AdaFaceLoader"]
    linked = {"inverter": INVERTER, "arc2face": ARC2FACE, "face_models": FACES} | {field: None}
    assert loader.VALIDATE_INPUTS(**linked) is True
    state = loader.IS_CHANGED(**linked, provider="auto")
    assert isinstance(state, str) and state == loader.IS_CHANGED(**linked, provider="auto")
    other = next(name for name in linked if name != field)  # the widgets beside the link are still checked
    missing = {"inverter": "missing.safetensors", "arc2face": "not_there", "face_models": "buffalo_l"}[other]
    assert missing in loader.VALIDATE_INPUTS(**(linked | {other: missing}))


def test_auto_face_provider_follows_comfyuis_device(env):
    onnx_provider = env.module("nodes.loader").onnx_provider
    assert onnx_provider("auto", torch.device("cpu")) == "cpu"  # python main.py --cpu
    assert onnx_provider("auto", torch.device("cuda", 0)) == "auto"
    assert onnx_provider("CUDA", torch.device("cpu")) == "cuda"  # an explicit choice is kept


def test_a_gpu_comfyui_with_cpu_face_analysis_is_told_why(env):
    """A reinstall can put onnxruntime's CPU build over onnxruntime-gpu: faces still work, so say it."""
    warning = env.module("nodes.loader").cpu_fallback_warning
    cpu_only = ["CPUExecutionProvider"]
    assert "install onnxruntime-gpu" in warning("auto", torch.device("cuda", 0), cpu_only)
    assert warning("auto", torch.device("cpu"), cpu_only) is None  # python main.py --cpu
    assert warning("CPU", torch.device("cuda", 0), cpu_only) is None  # the user's own choice
    assert warning("auto", torch.device("cuda", 0), ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    assert warning("auto", torch.device("mps"), cpu_only) is None  # a Mac's auto is the CPU on purpose
    assert "choose DirectML" in warning("auto", torch.device("privateuseone", 0), cpu_only)  # --directml


def test_registration_keeps_extra_model_paths_entries(tiny_models, tmp_path):
    extra = str(tmp_path / "shared" / "adaface")

    def extra_model_paths(folder_paths):  # what extra_model_paths.yaml does before custom nodes load
        folder_paths.add_model_folder_path("adaface", extra)

    with comfy_env(tmp_path / "ComfyUI", tiny_models.tokenizer, before_pack=extra_model_paths) as env:
        paths, extensions = env.folder_paths.folder_names_and_paths["adaface"]
        assert paths == [extra, str(env.models / "adaface")]
        assert ".safetensors" in extensions
        for name in ("arc2face", "insightface"):
            assert env.folder_paths.get_folder_paths(name) == [str(env.models / name)]


# ------------------------------------------------------------------ face -> subject


def test_face_embed_gives_a_subject_and_the_aligned_rgb_crop(env, adaface):
    subject, crops, _ = env.node("AdaFaceFaceEmbed").embed([adaface], [photo()])
    assert subject.tokens.shape == (16, 64) and torch.isfinite(subject.tokens).all()
    assert subject.sources == ("image 1",)
    assert crops.shape == (1, 112, 112, 3) and crops.dtype == torch.float32
    face = adaface.subjects.faces.analyze((photo()[0].numpy() * 255).round().astype(np.uint8))
    torch.testing.assert_close(crops[0], torch.from_numpy(face.aligned).float() / 255)  # RGB, not BGR
    assert adaface.patcher in env.module("comfy.model_management").current_loaded_models


def test_same_photos_are_analysed_once(env, adaface, monkeypatch):
    calls = []
    analyse = adaface.subjects.faces.identity
    monkeypatch.setattr(adaface.subjects.faces, "identity", lambda *a, **k: calls.append(1) or analyse(*a, **k))
    node = env.node("AdaFaceFaceEmbed")
    first = node.embed([adaface], [photo(corner=40)])[0]
    loads = []
    management = env.module("comfy.model_management")
    monkeypatch.setattr(management, "load_models_gpu", lambda models, **options: loads.append(options))
    second = node.embed([adaface], [photo(corner=40)])[0]
    assert len(calls) == 1 and torch.equal(first.tokens, second.tokens)
    assert loads == []  # a cache hit moves no model onto the GPU
    node.embed([adaface], [photo(corner=100)])
    assert len(calls) == 2


def test_photo_without_face_is_skipped_with_a_warning_the_artist_can_read(env, adaface, caplog):
    """The console is not where an artist looks: the report output says it too, on every run of the same photos."""
    batch = torch.cat([photo(), torch.zeros(1, 320, 320, 3)])
    for _ in range(2):  # the second run is a cache hit
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            subject, crops, report = env.node("AdaFaceFaceEmbed").embed([adaface], [batch])
        assert subject.sources == ("image 1",) and crops.shape[0] == 1
        skipped = [r.getMessage() for r in caplog.records if "image 2" in r.getMessage()]
        assert len(skipped) == 1 and report.splitlines()[:2] == ["1 of 2 photos used (image 1)", skipped[0]]


def test_a_list_of_photos_of_different_sizes_is_one_subject(env, adaface):
    """ComfyUI hands a list (RebatchImages, a load-from-folder node) to an INPUT_IS_LIST node whole: the photos
    are averaged into one subject, each at its own size, as a batch of the same photos would be."""
    assert env.pack.NODE_CLASS_MAPPINGS["AdaFaceFaceEmbed"].INPUT_IS_LIST
    small, large = photo(corner=60, size=320), photo(corner=120, size=400)
    subject, crops, _ = env.node("AdaFaceFaceEmbed").embed([adaface], [small, large])
    assert subject.sources == ("image 1", "image 2") and crops.shape[0] == 2
    faces = adaface.subjects.faces
    expected = faces.identity([(p[0].numpy() * 255).round().astype(np.uint8) for p in (small, large)]).embedding
    torch.testing.assert_close(subject.id_vector, torch.from_numpy(expected))


def test_a_long_photo_batch_shows_progress_and_stops_on_cancel(env, adaface):
    """A video's frames as reference photos take minutes on a CPU: the bar moves per photo, and the server's
    progress hook (which raises once Cancel was pressed) gets its chance between photos."""
    management, utils = env.module("comfy.model_management"), env.module("comfy.utils")
    seen = []

    def server_hook(value, total, preview, node_id=None):  # what ComfyUI's main.py installs
        seen.append((value, total))
        management.throw_exception_if_processing_interrupted()
        if value == 2:
            management.interrupt_current_processing()  # the artist presses Cancel during photo 3

    batch = torch.cat([photo(corner=c) for c in (30, 50, 70, 90, 110)])
    utils.set_progress_bar_global_hook(server_hook)
    try:
        with pytest.raises(management.InterruptProcessingException):
            env.node("AdaFaceFaceEmbed").embed([adaface], [batch])
    finally:
        utils.set_progress_bar_global_hook(None)
    assert seen == [(1, 5), (2, 5), (3, 5)]


def test_no_face_at_all_tells_the_artist_what_to_do(env, adaface):
    with pytest.raises(env.core("errors", "NoFaceError"), match="no face found in image 1; use a photo where the face"):
        env.node("AdaFaceFaceEmbed").embed([adaface], [torch.zeros(1, 256, 256, 3)])


# ------------------------------------------------------------------ injection into CONDITIONING


def test_injection_changes_the_conditioning_from_the_placeholder_on(env, clip, subject):
    conditioning = inject(env, clip, subject)
    cond = conditioning[0][0]
    plain = clip.encode_from_tokens(clip.tokenize("a photo of z"))
    assert len(conditioning) == 1 and cond.shape == (1, 77, 64)
    assert "start_percent" not in conditioning[0][1]
    # causal CLIP: start, "a", "photo", "of" are untouched; the subject's 16 positions and after change
    torch.testing.assert_close(cond[:, :4], plain[:, :4])
    assert not torch.allclose(cond[:, 4:20], plain[:, 4:20], atol=1e-4)


def test_a_words_embedding_as_subject_equals_writing_the_word(env, clip):
    cond = inject(env, clip, word_subject(env, clip, "dog"), "a photo of z in the forest")[0][0]
    expected = clip.encode_from_tokens(clip.tokenize("a photo of dog in the forest"))
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_a_prompt_the_subject_pushes_past_a_chunk_is_packed_as_comfyui_packs_the_same_words(env, clip):
    """58 words and 16 subject tokens leave one place in the first chunk: ComfyUI would move the short
    weighted group whole into the second chunk, and so does the injection."""
    phrase = "dog cat red blue green big small old new tall short dark light warm cold soft"
    subject = word_subject(env, clip, phrase)
    assert subject.tokens.shape[0] == 16
    cond = inject(env, clip, subject, " ".join(["red"] * 58) + " z (blue eyes:1.2)")[0][0]
    expected = clip.encode_from_tokens(clip.tokenize(" ".join(["red"] * 58) + f" {phrase} (blue eyes:1.2)"))
    assert cond.shape[1] == 154
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_second_subject_goes_to_the_second_placeholder(env, clip):
    dog, cat = word_subject(env, clip, "dog"), word_subject(env, clip, "cat")
    cond = inject(env, clip, dog, "z and y on a sofa", subject_2=cat, placeholder_2="y")[0][0]
    expected = clip.encode_from_tokens(clip.tokenize("dog and cat on a sofa"))
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_a_placeholder_inside_another_word_is_left_alone(env, clip):
    """'schwarz' ends in the token of 'z' and 'y2k' starts with the token of 'y': neither is a placeholder."""
    dog, cat = word_subject(env, clip, "dog"), word_subject(env, clip, "cat")
    cond = inject(env, clip, dog, "z, in a schwarz coat, and (Y:1.2) in y2k style", subject_2=cat, placeholder_2="y")[0][0]
    expected = clip.encode_from_tokens(clip.tokenize("dog, in a schwarz coat, and (cat:1.2) in y2k style"))
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_id_strength_moves_the_tokens_toward_padding(env, clip, subject):
    SubjectEmbedding = env.core("subject", "SubjectEmbedding")
    padding = SubjectEmbedding(subject.pad_embeds, subject.pad_embeds, subject.id_vector)
    torch.testing.assert_close(inject(env, clip, subject, id_strength=0.0)[0][0], inject(env, clip, padding)[0][0])


def test_start_and_end_percent_are_recorded(env, clip, subject):
    conditioning = inject(env, clip, subject, start_percent=0.2, end_percent=0.8)
    assert conditioning[0][1]["start_percent"] == 0.2 and conditioning[0][1]["end_percent"] == 0.8
    assert "pooled_output" in conditioning[0][1]


def test_an_empty_timestep_range_is_refused(env, clip, subject):
    with pytest.raises(env.core("errors", "ConfigError"), match="must be below end_percent"):
        inject(env, clip, subject, start_percent=0.6, end_percent=0.6)


def test_missing_placeholder_is_a_clear_error_unless_appending(env, clip):
    dog = word_subject(env, clip, "dog")
    with pytest.raises(env.core("errors", "PlaceholderError"), match="'a photo of z in the forest'"):
        inject(env, clip, dog, "a photo of a man")
    cond = inject(env, clip, dog, "a photo of a man", append_if_missing=True)[0][0]
    torch.testing.assert_close(cond, clip.encode_from_tokens(clip.tokenize("a photo of a man dog")), atol=1e-5, rtol=1e-5)


def test_only_sd15_clips_of_the_subject_width_are_accepted(env, clip, subject):
    class SdxlClip:
        def tokenize(self, text, return_word_ids=False):
            return {"g": clip.tokenize(text)["l"], "l": clip.tokenize(text)["l"]}

    UnsupportedClipError = env.module("nodes.errors").UnsupportedClipError
    with pytest.raises(UnsupportedClipError, match="SD1.5 models only"):
        inject(env, SdxlClip(), subject)
    SubjectEmbedding = env.core("subject", "SubjectEmbedding")
    narrow = SubjectEmbedding(torch.zeros(4, 32), torch.zeros(4, 32), torch.ones(32))
    with pytest.raises(UnsupportedClipError, match="32 wide but this CLIP is 64 wide"):
        inject(env, clip, narrow)


# ------------------------------------------------------------------ save and mix


def test_saved_embedding_loads_back_and_is_not_overwritten_by_accident(env, subject):
    node = env.node("AdaFaceSaveEmbedding")
    out = node.save(subject, "alice", 1.0, False)
    assert out == ("embedding:alice",)
    path = env.models / "embeddings" / "alice.safetensors"
    load = env.core("textual_inversion", "load_textual_inversion")
    torch.testing.assert_close(load(path), subject.tokens)
    with pytest.raises(env.module("nodes.errors").EmbeddingExistsError, match="overwrite"):
        node.save(subject, "alice", 0.5, False)
    torch.testing.assert_close(load(path), subject.tokens)
    node.save(subject, "alice", 0.5, True)
    torch.testing.assert_close(load(path), subject.scaled_tokens(0.5))


def test_a_saved_embedding_queued_again_is_kept_and_written_again_once_deleted(env, subject):
    """ComfyUI reruns the node when IS_CHANGED changes: a deleted file must make it save again, and the rerun
    its own save causes must neither fail (overwrite off) nor rewrite the file (which would rerun it forever)."""
    Save = env.pack.NODE_CLASS_MAPPINGS["AdaFaceSaveEmbedding"]
    node, path = env.node("AdaFaceSaveEmbedding"), env.models / "embeddings" / "dora.safetensors"
    before = Save.IS_CHANGED(None, "dora", 1.0, False)  # the subject is linked: None before the run
    assert node.save(subject, "dora", 1.0, False) == ("embedding:dora",)
    saved = Save.IS_CHANGED(None, "dora", 1.0, False)
    assert saved != before
    assert node.save(subject, "dora", 1.0, False) == ("embedding:dora",)  # the rerun: same subject, no clash
    assert Save.IS_CHANGED(None, "dora", 1.0, False) == saved  # not rewritten, so the next queue is cached
    path.unlink()
    assert Save.IS_CHANGED(None, "dora", 1.0, False) != saved
    node.save(subject, "dora", 1.0, False)
    torch.testing.assert_close(env.core("textual_inversion", "load_textual_inversion")(path), subject.tokens)
    with pytest.raises(env.core("errors", "ConfigError"), match="is 300 characters long; 200 at most"):
        node.save(subject, "a" * 300, 1.0, False)
    assert Save.IS_CHANGED(None, "a" * 300, 1.0, False) == "a" * 300


def test_a_name_embedding_NAME_would_share_with_another_file_is_refused(env, subject):
    """ComfyUI's embedding:NAME looks in every embeddings folder and subfolder, in an order left to chance, for
    NAME, NAME.safetensors, NAME.pt and NAME.bin: a second file so named would make the prompt word load
    either person from one run to the next."""
    node = env.node("AdaFaceSaveEmbedding")
    root = env.models / "embeddings"
    (root / "civitai").mkdir(parents=True, exist_ok=True)
    (root / "civitai" / "bob.safetensors").write_bytes(b"someone else")
    (root / "carol.pt").write_bytes(b"an older embedding")
    for name, other in (("bob", "civitai"), ("carol", "carol.pt")):
        for overwrite in (False, True):
            with pytest.raises(env.module("nodes.errors").EmbeddingExistsError, match=f"embedding:{name} already names .*{other}"):
                node.save(subject, name, 1.0, overwrite)
    assert not (root / "bob.safetensors").exists() and not (root / "carol.safetensors").exists()
    assert node.save(subject, "bobby", 1.0, False) == ("embedding:bobby",)
    # The same folder reached twice (an A1111 folder linked in, a link loop) is one file, and no endless walk.
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "civitai" / "back").symlink_to(root, target_is_directory=True)
    assert node.save(subject, "bobby", 0.5, True) == ("embedding:bobby",)


def test_mix_at_zero_and_one_gives_the_endpoints(env, adaface, subject):
    other = env.node("AdaFaceFaceEmbed").embed([adaface], [photo(corner=20, colour=(1.0, 0.8, 0.5))])[0]
    node = env.node("AdaFaceMixSubjects")
    assert not torch.allclose(other.tokens, subject.tokens)
    torch.testing.assert_close(node.mix(subject, other, 0.0)[0].tokens, subject.tokens)
    torch.testing.assert_close(node.mix(subject, other, 1.0)[0].tokens, other.tokens)
    half = node.mix(subject, other, 0.5)[0]
    torch.testing.assert_close(half.tokens, (subject.tokens + other.tokens) / 2)


# ------------------------------------------------------------------ teacher sampler


def test_teacher_sampler_gives_a_deterministic_latent_and_reports_progress(env, adaface, subject):
    utils = env.module("comfy.utils")
    updates = []
    utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        node = env.node("AdaFaceTeacherSampler")
        first = node.sample(adaface, subject, 7, 3, 3.0, 64, 96, 2)[0]["samples"]
        assert updates == [(1, 3), (2, 3), (3, 3)]
        second = node.sample(adaface, subject, 7, 3, 3.0, 64, 96, 2)[0]["samples"]
        other_seed = node.sample(adaface, subject, 8, 3, 3.0, 64, 96, 2)[0]["samples"]
    finally:
        utils.set_progress_bar_global_hook(None)
    assert first.shape == (2, 4, 12, 8) and torch.isfinite(first).all()
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, other_seed)


def test_teacher_sampler_stops_when_comfyui_is_interrupted(env, adaface, subject):
    """ComfyUI's samplers never check for interrupts: the server's progress hook does, at each step."""
    management, utils = env.module("comfy.model_management"), env.module("comfy.utils")
    steps = []

    def server_hook(value, total, preview, node_id=None):  # what ComfyUI's main.py installs
        steps.append(value)
        management.throw_exception_if_processing_interrupted()
        if value == 1:
            management.interrupt_current_processing()  # the artist presses Cancel during step 2

    utils.set_progress_bar_global_hook(server_hook)
    try:
        with pytest.raises(management.InterruptProcessingException):
            env.node("AdaFaceTeacherSampler").sample(adaface, subject, 0, 5, 3.0, 64, 64, 1)
    finally:
        utils.set_progress_bar_global_hook(None)
    assert steps == [1, 2]


def test_teacher_without_the_arc2face_unet_says_where_to_put_it(env, adaface, subject, tmp_path):
    without_unet = type(adaface)(subjects=adaface.subjects, patcher=adaface.patcher, arc2face_folder=tmp_path / "Arc2Face")
    with pytest.raises(env.core("errors", "ModelFileMissingError"), match="arc2face/ folder") as error:
        env.node("AdaFaceTeacherSampler").sample(without_unet, subject, 0, 2, 3.0, 64, 64, 1)
    assert str(tmp_path / "Arc2Face") in str(error.value)
