"""Arc2Face encoder, prompt inverter and the checkpoint format, on tiny models in users' layouts."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaface_core.arc2face import Arc2FaceEncoder
from adaface_core.checkpoint import atomic_write_text, load_inverter, save_inverter
from adaface_core.errors import CheckpointError, ConfigError, ModelFileMissingError
from adaface_core.inverter import reference_template_ids
from adaface_core.textual_inversion import embedding_file_name, load_textual_inversion, save_textual_inversion
from adaface_core.tokenizer import load_clip_tokenizer


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return Arc2FaceEncoder.from_folder(tiny_models.encoder, load_clip_tokenizer(tiny_models.tokenizer)).eval()


def unit_vectors(n, dim=64, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_reference_template_matches_the_real_tokenizer(tiny_models):
    tokenizer = load_clip_tokenizer(tiny_models.tokenizer)
    expected = tokenizer("photo of a " + ", " * 18, padding="max_length", max_length=77)["input_ids"]
    assert reference_template_ids(16) == expected


def test_arc2face_encoder_puts_the_id_vector_at_the_id_token(encoder):
    assert encoder.id_position == 4 and encoder.prompt_ids[:7].tolist() == [49406, 1125, 539, 320, 1014, 2533, 49407]
    with torch.no_grad():
        out = encoder(unit_vectors(2))
        again = encoder(unit_vectors(2))
        other = encoder(unit_vectors(2, seed=1))
    assert out.prompt_embeds.shape == (2, 77, 64) and out.id_tokens.shape == (2, 16, 64)
    torch.testing.assert_close(out.id_tokens, out.prompt_embeds[:, 4:20])
    torch.testing.assert_close(out.prompt_embeds, again.prompt_embeds)
    # Positions before the id token see nothing of it (causal encoder); the id tokens do.
    torch.testing.assert_close(out.prompt_embeds[:, :4], other.prompt_embeds[:, :4])
    assert not torch.allclose(out.id_tokens, other.id_tokens)


def test_id_tokens_equal_the_reference_22_token_prompt(encoder):
    """The reference pads the ID prompt to 22 tokens; causality makes 77 give the same 16 tokens."""
    vectors = unit_vectors(1)
    with torch.no_grad():
        embeds = encoder.clip.token_embeds(encoder.prompt_ids[:22]).unsqueeze(0).clone()
        embeds[0, 4] = F.pad(vectors[0], (0, 0))
        short = encoder.clip(token_embeds=embeds).last_hidden_state[:, 4:20]
        torch.testing.assert_close(encoder(vectors).id_tokens, short, atol=1e-5, rtol=1e-5)


def test_too_wide_id_vector_is_refused(encoder):
    with pytest.raises(ConfigError, match="512-d ID vectors do not fit"):
        encoder(unit_vectors(1, dim=512))


def test_missing_encoder_folder_names_it(tmp_path, tiny_models):
    with pytest.raises(ModelFileMissingError, match="arc2face_missing"):
        Arc2FaceEncoder.from_folder(tmp_path / "arc2face_missing", load_clip_tokenizer(tiny_models.tokenizer))


def test_inverter_output_shape_and_id_guidance(tiny_models, encoder):
    inverter = load_inverter(tiny_models.inverter)
    with torch.no_grad():
        tokens = inverter(encoder(unit_vectors(3)).id_tokens)
        half = inverter(encoder(unit_vectors(3)).id_tokens, id_guidance_scale=0.5)
    assert tokens.shape == (3, 16, 64)
    torch.testing.assert_close(half, 0.5 * tokens + 0.5 * inverter.pad_embeddings())


def test_hidden_state_mix_follows_the_reference_formula(tiny_models, encoder):
    inverter = load_inverter(tiny_models.inverter)
    id_tokens = encoder(unit_vectors(1)).id_tokens.detach()
    with torch.no_grad():
        inverter.hidden_state_layer_weights.copy_(torch.tensor([0.0, 0.0, 1.0]))
        embeds = inverter.clip.token_embeds(inverter.template_ids).unsqueeze(0).clone()
        embeds[:, 4:20] = id_tokens
        last_layer = inverter.clip(token_embeds=embeds).last_hidden_state[:, 4:20]
        torch.testing.assert_close(inverter(id_tokens), last_layer, atol=1e-5, rtol=1e-5)


def test_expansion_roundtrips_through_a_checkpoint(tmp_path, tiny_models, encoder):
    inverter = load_inverter(tiny_models.inverter)
    id_tokens = encoder(unit_vectors(2)).id_tokens.detach()
    with torch.no_grad():
        before = inverter(id_tokens)
        inverter.expand([4, 2, 1], perturb_std=0.0, step=10)
        torch.testing.assert_close(inverter(id_tokens), before, atol=1e-5, rtol=1e-5)
        inverter.expand([2, 2, 1], perturb_std=0.1, generator=torch.Generator().manual_seed(0), step=20)
        expanded = inverter(id_tokens)
    assert inverter.config.attention_multipliers == [8, 4, 1]
    path = save_inverter(inverter, tmp_path / "expanded.safetensors")
    reloaded = load_inverter(path)
    assert reloaded.config.attention_multipliers == [8, 4, 1]
    assert [h["step"] for h in reloaded.config.expansion_history] == [10, 20]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(id_tokens), expanded)
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatched_checkpoint_names_the_tensor(tmp_path, tiny_models):
    with safe_open(str(tiny_models.inverter), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["config"])
    config["attention_multipliers"] = [2, 1, 1]  # claims an expansion the weights do not have
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata | {"config": json.dumps(config)})
    with pytest.raises(CheckpointError, match=r"clip.encoder.layers.0.self_attn.k_proj.weight: file has \(64, 64\), model expects \(128, 64\)"):
        load_inverter(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "content, message",
    [(b"not a safetensors file at all", "not a readable safetensors file"), (None, "not an AdaFace inverter checkpoint"),
     (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1000\n", "x.safetensors is a Git LFS pointer")],
)
def test_corrupt_or_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    if content is None:
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_inverter(path)


def test_pickled_checkpoint_points_to_the_converter(tmp_path):
    path = tmp_path / "official.pt"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="python -m adaface_core.convert official.pt official.safetensors"):
        load_inverter(path)
    # A trainer checkpoint folder (step_N/) holds its state as a pickle beside the inverter: no conversion needed.
    (tmp_path / "inverter.safetensors").write_bytes(b"")
    (tmp_path / "trainer_state.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is not an inverter: give the inverter.safetensors beside it"):
        load_inverter(tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="python -m adaface_core.convert official.pt"):  # a release beside it
        load_inverter(path)


def test_textual_inversion_file_has_both_keys_and_loads_in_diffusers(tmp_path, tiny_models):
    tokens = torch.randn(16, 64)
    path = save_textual_inversion(tokens, tmp_path / embedding_file_name("alice"))
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "emb_params"}
    loaded = load_textual_inversion(path)
    torch.testing.assert_close(loaded, tokens)
    if Path("/proc/self/maps").is_file():  # a copy, not a view of the file's mapping, which Windows could not replace
        assert str(path) not in Path("/proc/self/maps").read_text()
    with pytest.raises(ConfigError):
        embedding_file_name("../escape")
    assert embedding_file_name("alice.SAFETENSORS") == "alice.safetensors"
    with pytest.raises(ConfigError, match=r"written as NAME.safetensors, so give the name without it \('alice'\)"):
        embedding_file_name("alice.pt")
    with pytest.raises(ConfigError, match="not all finite"):
        save_textual_inversion(torch.full((16, 64), float("nan")), tmp_path / "black.safetensors")
    assert not (tmp_path / "black.safetensors").exists()
    for device in ("con", "NUL.v2", "Com1", "lpt9.safetensors"):
        with pytest.raises(ConfigError, match="device name on Windows"):
            embedding_file_name(device)
    assert embedding_file_name("console") == "console.safetensors" and embedding_file_name("com10") == "com10.safetensors"
    # diffusers' own loader reads it as 16 new tokens (the documented way for multi-key files).
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
    from transformers import CLIPTextModel

    tokenizer = load_clip_tokenizer(tiny_models.tokenizer)
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_models.sd15 / "text_encoder"), local_files_only=True)
    class Loader(TextualInversionLoaderMixin):  # the pipeline attributes the mixin reads
        hf_device_map = None
        components: dict = {}

    loader = Loader()
    vectors = load_file(str(path))["clip_l"]
    loader.load_textual_inversion(vectors, token="<alice>", tokenizer=tokenizer, text_encoder=text_encoder)
    ids = tokenizer(loader.maybe_convert_prompt("a photo of <alice>", tokenizer), add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + 16
    torch.testing.assert_close(text_encoder.get_input_embeddings().weight[ids[3:]], tokens)


def test_id_guidance_blends_towards_the_pad_tokens_input_embedding(tiny_models):
    """The reference's ID guidance pulls towards CLIP's pad token (49407) at positions 4..19, token + position."""
    inverter = load_inverter(tiny_models.inverter)
    embeds = inverter.clip.embeddings
    expected = embeds.token_embedding.weight[49407][None] + embeds.position_embedding.weight[4:20]
    torch.testing.assert_close(inverter.pad_embeddings(), expected)


def _rewrite_metadata(source, target, **changes):
    with safe_open(str(source), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["config"])
    config.update(changes.pop("config", {}))
    save_file(tensors, str(target), metadata=metadata | {"config": json.dumps(config)} | changes)
    return target


@pytest.mark.parametrize("changes, message", [
    ({"config": {"id_encoder": "consistentid"}}, "'consistentid' ID encoder"),
    ({"config": {"attention_multipliers": [1, 1]}}, "malformed configuration"),
    ({"config": {"clip": {"hidden_size": 64}, "unknown_field": 1}}, "malformed configuration"),
    ({"format_version": "7"}, "format version '7'"),
    # Each of these loaded, then failed at the first encode with an index or size error.
    ({"config": {"token_offset": -3}}, "token_offset must be >= 1"),
    ({"config": {"pad_token_id": 99999}}, r"must lie in the CLIP vocabulary \(0..49407\), got 267..99999"),
    ({"config": {"template_ids": [49406] + [267] * 79}}, "the template has 80 tokens, the CLIP text model 77 positions"),
    # These raised ZeroDivisionError / AttributeError, or loaded and failed at the first encode.
    ({"config": {"clip": {"num_attention_heads": 0}}}, r"whole numbers from 1 up: num_attention_heads=0"),
    ({"config": {"clip": {"num_attention_heads": 4.0}}}, r"num_attention_heads=4.0"),
    ({"config": {"clip": None}}, "a CLIP config must be a JSON object, got NoneType"),
    ({"config": {"clip": {"layer_norm_eps": "x"}}}, "layer_norm_eps must be a small positive number"),
])
def test_a_checkpoint_with_a_foreign_or_broken_configuration_is_named(tmp_path, tiny_models, changes, message):
    path = _rewrite_metadata(tiny_models.inverter, tmp_path / "odd.safetensors", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_inverter(path)


def _rewrite_tensor(source, target, key, change):
    with safe_open(str(source), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    change(tensors[key])
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize("key, change, message", [
    ("clip.encoder.layers.0.mlp.fc1.weight", lambda t: t.view(-1)[7:9].fill_(float("nan")), "NaN or infinite weights"),
    ("hidden_state_layer_weights", lambda t: t.copy_(torch.tensor([1.0, -1.0, 0.0])), "sum to 0"),
])
def test_weights_that_can_only_give_nan_tokens_are_refused(tmp_path, tiny_models, key, change, message):
    """A diverged run's save, or layer weights the mix divides by to 0: the subject would be NaN, the images black."""
    path = _rewrite_tensor(tiny_models.inverter, tmp_path / "nan.safetensors", key, change)
    with pytest.raises(CheckpointError, match=message):
        load_inverter(path)


def test_a_configuration_larger_than_the_weights_is_refused_before_allocating(tmp_path, tiny_models):
    """A config claiming a huge model is checked on the meta device: no gigabytes are allocated to find out."""
    path = _rewrite_metadata(tiny_models.inverter, tmp_path / "huge.safetensors",
                             config={"attention_multipliers": [4096, 1, 1]})
    with pytest.raises(CheckpointError, match=r"k_proj.weight: file has \(64, 64\), model expects \(262144, 64\)"):
        load_inverter(path)


def test_code_in_the_encoders_pytorch_model_bin_is_refused_and_never_run(tmp_path, tiny_models):
    """Arc2Face's ``encoder/`` ships a pickle (``pytorch_model.bin``): it is read as plain tensors only."""
    import builtins
    import shutil

    from helpers_pickles import Evil

    folder = shutil.copytree(tiny_models.encoder, tmp_path / "encoder")
    assert (folder / "pytorch_model.bin").is_file()
    marker = tmp_path / "pwned"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(state | {"payload": Evil(builtins.open, str(marker), "w")}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin holds more than plain tensors.*: it asks for io.open$") as refused:
        Arc2FaceEncoder.from_folder(folder, load_clip_tokenizer(tiny_models.tokenizer))
    assert "weights_only" not in str(refused.value)  # torch's own text suggests weights_only=False
    assert not marker.exists()
    # a clone without git-lfs: no code asked for, so not called unsafe, and the real cause is named
    (folder / "pytorch_model.bin").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\n")
    with pytest.raises(CheckpointError, match="not a torch checkpoint.*pytorch_model.bin is a Git LFS pointer") as pointer:
        Arc2FaceEncoder.from_folder(folder, load_clip_tokenizer(tiny_models.tokenizer))
    assert "weights_only" not in str(pointer.value)
    torch.save(state, folder / "pytorch_model.bin", pickle_protocol=4)  # tensors only, but unread by the safe loader
    with pytest.raises(CheckpointError, match="pickle protocol 4 or later.*re-save its tensors as .safetensors"):
        Arc2FaceEncoder.from_folder(folder, load_clip_tokenizer(tiny_models.tokenizer))


def test_a_cut_off_encoder_download_is_named_and_extra_entries_are_ignored(tmp_path, tiny_models, encoder, monkeypatch):
    """An interrupted download leaves an empty or short ``pytorch_model.bin``; torch's own words for it are an
    empty EOFError or "Invalid argument". A training script's file can carry a step count beside the tensors."""
    import shutil

    folder = shutil.copytree(tiny_models.encoder, tmp_path / "encoder")
    weights = folder / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    data = weights.read_bytes()
    tokenizer = load_clip_tokenizer(tiny_models.tokenizer)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is empty \(0 bytes\).*Download it again"):
        Arc2FaceEncoder.from_folder(folder, tokenizer)
    for size in (10_000, len(data) // 2):
        weights.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"pytorch_model.bin: truncated or corrupt \(.+\): download it again"):
            Arc2FaceEncoder.from_folder(folder, tokenizer)
    torch.save({key.removeprefix("text_model."): value for key, value in state.items()} | {"epoch": 3}, weights)
    loaded = Arc2FaceEncoder.from_folder(folder, tokenizer)
    for (name, mine), (_, theirs) in zip(loaded.state_dict().items(), encoder.state_dict().items()):
        assert torch.equal(mine, theirs), name
    def unreadable(*args, **kwargs):  # a file of another user on a shared server (chmod cannot stop root here)
        raise PermissionError(13, "Permission denied", str(weights))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", unreadable)
        with pytest.raises(CheckpointError, match="Permission denied") as denied:
            Arc2FaceEncoder.from_folder(folder, tokenizer)
    assert "download it again" not in str(denied.value)
    torch.save({"model": state, "epoch": 3}, weights)  # a training script's nesting: named, not "no weights found"
    with pytest.raises(CheckpointError, match=r"holds no tensors at its top level \(keys: model, epoch\)"):
        Arc2FaceEncoder.from_folder(folder, tokenizer)


def test_a_corrupt_encoder_config_names_the_file(tmp_path, tiny_models):
    import shutil

    folder = shutil.copytree(tiny_models.encoder, tmp_path / "encoder")
    (folder / "config.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"encoder[/\\]config.json is not a valid CLIP text config.json"):
        Arc2FaceEncoder.from_folder(folder, load_clip_tokenizer(tiny_models.tokenizer))
    # Arc2Face's download holds arc2face/ (a UNet) beside encoder/: the easy mix-up is named
    unet = json.loads((tiny_models.sd15 / "unet" / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps(unet), encoding="utf-8")
    with pytest.raises(CheckpointError, match="config of a diffusers UNet2DConditionModel.*give its encoder/ folder"):
        Arc2FaceEncoder.from_folder(folder, load_clip_tokenizer(tiny_models.tokenizer))


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_saved_files_get_the_usual_permissions_not_private_ones(tmp_path, tiny_models):
    """A ComfyUI or trainer running as another user (Docker, a shared server) must be able to read them."""
    previous = os.umask(0o022)
    try:
        path = save_inverter(load_inverter(tiny_models.inverter), tmp_path / "inverter.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["inverter.safetensors"]  # no temporary file left
    finally:
        os.umask(previous)


def test_a_text_file_is_replaced_whole_or_not_at_all(tmp_path):
    """The trainer's loss logs and face-box cache: a failed write keeps the old file and leaves no temporary one."""
    path = atomic_write_text(tmp_path / "losses.csv", "step,loss\r\n1,0.5\r\n")
    assert path.read_bytes() == b"step,loss\r\n1,0.5\r\n"  # line ends as the csv module wrote them, on any OS
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "step,loss\r\n2,\ud800\r\n")
    assert path.read_bytes() == b"step,loss\r\n1,0.5\r\n"
    assert [p.name for p in tmp_path.iterdir()] == ["losses.csv"]
