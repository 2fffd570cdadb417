"""Converting the official AdaFace release: read without running it, mapped onto PromptInverter.

The fake releases are built from stand-in classes at the official module paths (``adaface.*`` as
files of a temporary package, ``transformers.*`` as temporary ``sys.modules`` entries), written with
``torch.save``, and then made unimportable, so the converter runs as on a user's machine that has
no reference code. The stand-ins' ``forward`` re-implements the reference arithmetic
(``CLIPAttentionMKV`` and ``inverse_img_prompt_embs``), which the converted inverter must match.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import importlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaface_core.checkpoint import load_inverter
from adaface_core.clip_text import ClipTextConfig
from adaface_core.convert import convert_official_checkpoint, main
from adaface_core.errors import CheckpointError, ConfigError, ModelFileMissingError, UnsafePickleError, WriteError
from adaface_core.inverter import InverterConfig, PromptInverter, reference_template_ids
from adaface_core.safe_unpickle import is_standin, load_torch_zip
from helpers_pickles import Evil

HIDDEN, LAYERS, HEADS, FFN, VOCAB = 64, 2, 4, 128, 49408
MULTIPLIERS = [1, 2]
LAYER_WEIGHTS = [[0.9], [1.3], [2.2]]
_CLIP = "transformers.models.clip"
REPO = Path(__file__).resolve().parents[1]

# ---- transformers 4.x stand-ins, named by their real module paths while the release is written ----


def _home(module: str):
    def wrap(cls):
        cls.__module__ = module
        return cls

    return wrap


@_home(f"{_CLIP}.configuration_clip")
class CLIPTextConfig:
    def __init__(self, **values):
        self.__dict__.update(values)


def fix_text(text):
    return text


fix_text.__module__ = "ftfy"  # transformers 4.x's CLIPTokenizer keeps ftfy.fix_text where ftfy is installed


@_home(f"{_CLIP}.tokenization_clip")
class CLIPTokenizer:
    def __init__(self):
        self.encoder = {"photo</w>": 1125, "of</w>": 539, "a</w>": 320, ",</w>": 267}
        self.fix_text = fix_text  # pickled as a reference to the function ftfy.fix_text
        self.bpe_ranks = {("p", "h"): 0}
        self.pat = re.compile(r"<\|startoftext\|>|\w+", re.IGNORECASE)  # pickled as a call to re._compile
        self.model_max_length = 77


@_home("transformers.activations")
class QuickGELUActivation(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@_home(f"{_CLIP}.modeling_clip")
class CLIPAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.embed_dim, self.num_heads = config, config.hidden_size, config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, nn.Linear(self.embed_dim, self.embed_dim))


@_home(f"{_CLIP}.modeling_clip")
class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation_fn = QuickGELUActivation()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


@_home(f"{_CLIP}.modeling_clip")
class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size)


@_home(f"{_CLIP}.modeling_clip")
class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


@_home(f"{_CLIP}.modeling_clip")
class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))


@_home(f"{_CLIP}.modeling_clip")
class CLIPTextTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.eos_token_id = config, 2
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)


_FAKE_LIBRARIES = {
    f"{_CLIP}.configuration_clip": [CLIPTextConfig],
    f"{_CLIP}.tokenization_clip": [CLIPTokenizer],
    f"{_CLIP}.modeling_clip": [
        CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPEncoder, CLIPTextEmbeddings, CLIPTextTransformer
    ],
    "transformers.activations": [QuickGELUActivation],
    "ftfy": [fix_text],
}

# ---- the adaface package, as files (reference arithmetic, our own code) ----

_ARC2FACE_MODELS = '''
import torch
from torch import nn


def mkv_attention(attn, x, mask, m):
    """Reference CLIPAttentionMKV: the m key/value copies of a token sit next to each other on the key axis."""
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = (attn.q_proj(x) * attn.scale).view(b, t, h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, -1, h, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, -1, h, d).transpose(1, 2)
    w = (q @ k.transpose(-1, -2)).view(b, h, t, t, m) + mask.unsqueeze(-1)
    out = w.view(b, h, t, t * m).softmax(-1) @ v
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


class CLIPAttentionMKV(nn.Module):
    def __init__(self, config, multiplier=2):
        super().__init__()
        self.config, self.embed_dim, self.num_heads = config, config.hidden_size, config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale, self.dropout, self.multiplier = self.head_dim ** -0.5, 0.0, multiplier
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim * multiplier)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim * multiplier)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)


class CLIPTextModelWrapper(nn.Module):
    def __init__(self, config, text_model):
        super().__init__()
        self.config, self.text_model = config, text_model

    def forward(self, token_embs, layer_weights):
        tm, t = self.text_model, token_embs.shape[1]
        x = token_embs + tm.embeddings.position_embedding.weight[:t]
        mask = torch.full((t, t), float("-inf")).triu(1)
        states = [x]
        for layer in tm.encoder.layers:
            attn = layer.self_attn
            x = x + mkv_attention(attn, layer.layer_norm1(x), mask, getattr(attn, "multiplier", 1))
            x = x + layer.mlp(layer.layer_norm2(x))
            states.append(x)
        w = (layer_weights / layer_weights.sum(dim=0, keepdim=True)).unsqueeze(1).unsqueeze(1)
        return tm.final_layer_norm((torch.stack(states[-len(w):]) * w).sum(0))
'''

_SUBJ_BASIS_GENERATOR = '''
import torch
from torch import nn


class SubjBasisGenerator(nn.Module):
    def __init__(self, prompt2token_proj, num_id_vecs, multipliers, layer_weights, tokenizer):
        super().__init__()
        self.N_ID, self.N_SFX, self.num_out_embs = num_id_vecs, 0, num_id_vecs
        self.placeholder_is_bg, self.dtype = False, torch.float16
        self.prompt2token_proj = prompt2token_proj
        self.obj_proj_in = nn.Sequential(nn.Linear(8, 16, bias=False))
        self.layerwise_proj = nn.Identity()
        self.hidden_state_layer_weights = nn.Parameter(layer_weights)
        self.prompt2token_proj_attention_multipliers = list(multipliers)
        self.tokenizer, self.static_img_suffix_embs = tokenizer, None
        emb = prompt2token_proj.text_model.embeddings
        pad = torch.full((emb.position_embedding.num_embeddings,), 49407)
        self.pad_embeddings = (emb.token_embedding(pad) + emb.position_embedding.weight).detach()

    def forward(self, id_tokens, template_ids):
        """Reference inverse_img_prompt_embs, 'core' output."""
        n = self.N_ID
        embs = self.prompt2token_proj.text_model.embeddings.token_embedding(template_ids)
        embs = embs.unsqueeze(0).repeat(len(id_tokens), 1, 1)
        embs[:, 4:4 + n] = id_tokens
        return self.prompt2token_proj(embs, self.hidden_state_layer_weights)[:, 4:4 + n]
'''


@contextlib.contextmanager
def official_modules(root: Path):
    """``adaface.*``, ``transformers.*`` and ``ftfy`` importable under the official paths, then forgotten again."""
    package = root / "adaface"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "arc2face_models.py").write_text(textwrap.dedent(_ARC2FACE_MODELS))
    (package / "subj_basis_generator.py").write_text(textwrap.dedent(_SUBJ_BASIS_GENERATOR))
    names = ["transformers", "transformers.models", _CLIP, *_FAKE_LIBRARIES]
    saved = {name: sys.modules.get(name) for name in names}
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        for name in names:
            module = sys.modules[name] = types.ModuleType(name)
            for cls in _FAKE_LIBRARIES.get(name, []):
                setattr(module, cls.__name__, cls)
        yield
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "adaface" or n.startswith("adaface.")]:
            del sys.modules[name]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        importlib.invalidate_caches()


def build_generator(num_tokens=16, seed=0, heads=HEADS, with_config=True, stored_multipliers=None):
    """A SubjBasisGenerator as the release pickles it: fp16 CLIP, one expanded layer, trained layer weights."""
    from adaface.arc2face_models import CLIPAttentionMKV, CLIPTextModelWrapper
    from adaface.subj_basis_generator import SubjBasisGenerator

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                            num_attention_heads=heads, max_position_embeddings=77, layer_norm_eps=1e-5,
                            hidden_act="quick_gelu", attention_dropout=0.0)
    text_model = CLIPTextTransformer(config)
    for layer, m in zip(text_model.encoder.layers, MULTIPLIERS):
        if m > 1:
            layer.self_attn = CLIPAttentionMKV(config, m)
    with torch.no_grad():  # distinct random values everywhere: every copy of an expanded layer differs
        for name, p in text_model.named_parameters():
            mean = 1.0 if "norm" in name and "weight" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.05 if "embedding" in name else 0.2) + mean)
    if not with_config:
        text_model.config = None
    proj = CLIPTextModelWrapper(config if with_config else None, text_model).half()
    recorded = stored_multipliers or MULTIPLIERS
    return SubjBasisGenerator(proj, num_tokens, recorded, torch.tensor(LAYER_WEIGHTS), CLIPTokenizer())


def reference_output(generator, id_tokens):
    with torch.no_grad():
        return copy.deepcopy(generator).float()(id_tokens, torch.tensor(reference_template_ids(generator.N_ID)))


def direct_inverter(generator, heads=HEADS):
    """A PromptInverter built straight from the live module's weights (no pickle, no converter)."""
    clip = ClipTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=heads)
    inverter = PromptInverter(InverterConfig(clip=clip, attention_multipliers=MULTIPLIERS))
    state = {k: v for k, v in generator.prompt2token_proj.text_model.state_dict().items() if "position_ids" not in k}
    inverter.clip.load_state_dict({k: v.float() for k, v in state.items()})
    inverter.hidden_state_layer_weights.data = generator.hidden_state_layer_weights.detach().reshape(-1).float()
    return inverter.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    id_tokens = torch.randn(2, 16, HIDDEN, generator=torch.Generator().manual_seed(7)) * 0.05
    out = {"root": root, "id_tokens": id_tokens}
    with official_modules(root / "code"):
        arc2face, consistent_id = build_generator(seed=0), build_generator(num_tokens=4, seed=1)
        common = {"placeholder_strings": ["z"], "subject_strings": ["z"], "tokenizer": CLIPTokenizer(),
                  "token2num_vectors": {"z": 16}, "state_dict_sample": nn.Linear(2, 2).state_dict()}
        stale = build_generator(seed=6)
        stale.prompt2token_proj.text_model.encoder.layers[1].self_attn.multiplier = 4  # as after the dedup script
        no_config = build_generator(seed=4, heads=1, with_config=False)
        nested = build_generator(seed=5)
        nested.note = Evil(os.system, f"touch {root / 'pwned_nested'}")
        fp32_big = build_generator(seed=8)
        fp32_big.prompt2token_proj.float()
        nan_weight = build_generator(seed=9)
        with torch.no_grad():
            fp32_big.prompt2token_proj.text_model.encoder.layers[0].mlp.fc1.bias[0] = 1e6  # beyond fp16's 65504
            nan_weight.prompt2token_proj.text_model.final_layer_norm.weight[0] = float("nan")
        generators = {
            "single": {"z": arc2face},
            "joint": nn.ModuleDict({"z": nn.ModuleList([consistent_id, arc2face])}),
            "consistent_only": {"z": build_generator(num_tokens=4, seed=2)},
            "bad_multipliers": {"z": build_generator(seed=3, stored_multipliers=[2, 2])},
            "stale_attribute": {"z": stale},
            "no_config": {"z": no_config},
            "evil_nested": {"z": nested},
            "fp32_big": {"z": fp32_big},
            "nan_weight": {"z": nan_weight},
        }
        for name, content in generators.items():
            torch.save({**common, "string_to_subj_basis_generator_dict": content}, root / f"{name}.pt")
            out[name] = root / f"{name}.pt"
        out["expected"] = reference_output(arc2face, id_tokens)
        out["expected_no_config"] = reference_output(no_config, id_tokens)
        out["direct"] = direct_inverter(arc2face)
    assert importlib.util.find_spec("adaface") is None and "adaface" not in sys.modules
    return out


@pytest.mark.parametrize("kind", ["single", "joint"])
def test_converted_release_matches_the_reference_arithmetic(release, tmp_path, kind, caplog):
    caplog.set_level(logging.INFO)
    report = convert_official_checkpoint(release[kind], tmp_path / "out.safetensors")
    assert "adaface" not in sys.modules  # nothing from the file was imported
    inverter = load_inverter(tmp_path / "out.safetensors")
    assert inverter.config.attention_multipliers == MULTIPLIERS == report.attention_multipliers
    assert inverter.config.clip.num_attention_heads == HEADS and inverter.num_tokens == 16
    assert report.source_dtype == report.output_dtype == "float16"
    torch.testing.assert_close(inverter.hidden_state_layer_weights, torch.tensor([0.9, 1.3, 2.2]), rtol=0, atol=1e-3)
    with torch.no_grad():
        got = inverter(release["id_tokens"])
        direct = release["direct"](release["id_tokens"])
    assert torch.equal(got, direct)  # same weights, same subject tokens as an inverter built in memory
    torch.testing.assert_close(got, release["expected"], atol=2e-4, rtol=1e-4)
    if kind == "joint":
        assert report.generator.startswith("string_to_subj_basis_generator_dict['z'][1]")
        assert any("ConsistentID generator at index 0 (4 ID tokens)" in item for item in report.left_out)
        assert "ConsistentID" in caplog.text
    else:
        assert report.left_out == []


def test_config_is_taken_from_shapes_when_none_is_stored(release, tmp_path):
    report = convert_official_checkpoint(release["no_config"], tmp_path / "out.safetensors", dtype=torch.float32)
    assert report.clip["num_attention_heads"] == 1 and any("no stored CLIP config" in n for n in report.notes)
    inverter = load_inverter(tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("clip.encoder.layers.1.self_attn.k_proj.weight").shape == (2 * HIDDEN, HIDDEN)
        assert handle.get_tensor("clip.final_layer_norm.weight").dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(inverter(release["id_tokens"]), release["expected_no_config"], atol=2e-4, rtol=1e-4)


def test_stand_ins_record_modules_without_importing_them(release):
    data = load_torch_zip(release["joint"])
    generator = data["string_to_subj_basis_generator_dict"].get("z").get("1")
    assert generator.class_path == "adaface.subj_basis_generator.SubjBasisGenerator"
    assert generator.get("N_ID") == 16 and is_standin(generator.get("layerwise_proj"), "Identity")
    attn = generator.lookup("prompt2token_proj.text_model.encoder.layers.1.self_attn")
    assert attn.class_path == "adaface.arc2face_models.CLIPAttentionMKV" and attn.get("multiplier") == 2
    assert is_standin(data["tokenizer"], "CLIPTokenizer") and data["tokenizer"].get("model_max_length") == 77
    assert data["state_dict_sample"]._metadata is not None  # a state_dict's attribute survives
    assert "adaface" not in sys.modules


@pytest.mark.parametrize(
    "name, message",
    [("consistent_only", "takes 4 ID tokens"), ("bad_multipliers", "says [2, 2] but the weight shapes give [1, 2]")],
)
def test_unexpected_generators_are_refused(release, tmp_path, name, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_official_checkpoint(release[name], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_stale_layer_multiplier_attribute_is_only_noted(release, tmp_path):
    report = convert_official_checkpoint(release["stale_attribute"], tmp_path / "out.safetensors")
    assert report.attention_multipliers == MULTIPLIERS
    assert any("records multiplier 4; its weights hold 2 copies" in note for note in report.notes)


def test_missing_subject_lists_the_subjects(release, tmp_path):
    with pytest.raises(CheckpointError, match=r"no generator for subject 'y'.*\['z'\]"):
        convert_official_checkpoint(release["single"], tmp_path / "out.safetensors", subject="y")


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda p: Evil(os.system, f"touch {p}"), f"{os.system.__module__}.system"),
        (lambda p: Evil(builtins.exec, f"open({str(p)!r}, 'w').write('x')"), "builtins.exec"),
        (lambda p: Evil(builtins.open, str(p), "w"), f"{builtins.open.__module__}.open"),
        (lambda p: Evil(builtins.getattr, (), "__class__"), "builtins.getattr"),
        (lambda p: Evil(torch.load, str(p)), "torch.serialization.load"),
    ],
)
def test_malicious_pickles_are_refused_before_running(tmp_path, make, refused):
    marker = tmp_path / "pwned"
    torch.save({"string_to_subj_basis_generator_dict": {}, "payload": make(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=re.escape(refused)):
        convert_official_checkpoint(tmp_path / "evil.pt", tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_the_malicious_file_is_real_and_nested_payloads_are_refused(release, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"payload": Evil(builtins.open, str(marker), "w")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # control: the unsafe loader does run it
    assert marker.exists()
    with pytest.raises(UnsafePickleError, match=re.escape(f"{os.system.__module__}.system")):
        convert_official_checkpoint(release["evil_nested"], tmp_path / "out.safetensors")
    assert not (release["root"] / "pwned_nested").exists()


def test_corrupt_files_give_checkpoint_errors(release, tmp_path):
    data = release["single"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    torch.save({"a": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    flipped = bytearray(data)
    with zipfile.ZipFile(release["single"]) as archive:  # damage the bytes of one stored tensor
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    flipped[start : start + 8] = bytes(8 - i for i in range(8))
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    for name, message in [("truncated", "truncated or corrupt"), ("garbage", "not a torch zip"),
                          ("legacy", "legacy"), ("flipped", "corrupt or truncated")]:
        with pytest.raises(CheckpointError, match=message):
            convert_official_checkpoint(tmp_path / f"{name}.pt", tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError, match="not the dict of an AdaFace release"):
        torch.save([1, 2], tmp_path / "list.pt")
        convert_official_checkpoint(tmp_path / "list.pt", tmp_path / "out.safetensors")
    # The usual slips: the folder, an already converted file, a clone made without git-lfs.
    with pytest.raises(ModelFileMissingError, match="is a folder: give the checkpoint file in it"):
        convert_official_checkpoint(tmp_path, tmp_path / "out.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "done.safetensors"))
    with pytest.raises(CheckpointError, match="is a safetensors file, not an official .pt release: it needs no conversion"):
        convert_official_checkpoint(tmp_path / "done.safetensors", tmp_path / "out.safetensors")
    (tmp_path / "pointer.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\n")
    with pytest.raises(CheckpointError, match="pointer.pt is a Git LFS pointer"):
        convert_official_checkpoint(tmp_path / "pointer.pt", tmp_path / "out.safetensors")


def test_weights_that_would_give_nan_tokens_name_the_release_and_the_cure(release, tmp_path):
    """A value beyond fp16 becomes infinity when cast; a NaN in the release is the release's, not a temp file's."""
    with pytest.raises(CheckpointError, match=r"^fp32_big.pt: encoder.layers.0.mlp.fc1.bias holds values too "
                                              r"large for float16; convert with --dtype fp32$"):
        convert_official_checkpoint(release["fp32_big"], tmp_path / "out.safetensors", dtype=torch.float16)
    convert_official_checkpoint(release["fp32_big"], tmp_path / "out.safetensors")  # kept fp32, it converts
    with pytest.raises(CheckpointError, match=r"^nan_weight.pt string_to_subj_basis_generator_dict\['z'\] holds NaN"):
        convert_official_checkpoint(release["nan_weight"], tmp_path / "nan.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_destination_that_cannot_be_written_is_refused_before_converting(release, tmp_path, read_only_folder):
    (tmp_path / "d.safetensors").mkdir()
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"d.safetensors is a folder: give the file to write in it"):
            convert_official_checkpoint(release["single"], tmp_path / "d.safetensors", overwrite=overwrite)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"file is a file, not a folder"):
        convert_official_checkpoint(release["single"], tmp_path / "file" / "out.safetensors")
    with pytest.raises(WriteError, match=r"^cannot write .*ro[/\\]out.safetensors: Permission denied") as refused:
        convert_official_checkpoint(release["single"], read_only_folder(tmp_path / "ro") / "out.safetensors")
    assert ".tmp" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.safetensors", "file", "ro"]


def test_an_interrupted_conversion_leaves_no_second_inverter_beside_the_first(release, tmp_path, monkeypatch):
    """A staged file is a complete, loadable inverter: left behind, ComfyUI's dropdown would offer it."""
    import adaface_core.convert as convert

    def interrupted(path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "load_inverter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_official_checkpoint(release["single"], tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_cli_in_process(release, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main([str(release["joint"]), str(tmp_path / "out.safetensors"), "--dtype", "fp32"]) == 0
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("clip.embeddings.token_embedding.weight").dtype == torch.float32
        assert handle.metadata()["source_generator"] == "string_to_subj_basis_generator_dict['z'][1]"
    caplog.clear()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "bad.pt is not a torch zip checkpoint" in errors[0]
    assert not (tmp_path / "bad.safetensors").exists()
    assert main([str(release["single"]), str(tmp_path / "out.pt")]) == 2  # a pickle suffix would never load
    # An existing file is kept unless --overwrite; then only a file that reloaded replaces it.
    before = (tmp_path / "out.safetensors").read_bytes()
    assert main([str(release["single"]), str(tmp_path / "out.safetensors")]) == 2
    assert (tmp_path / "out.safetensors").read_bytes() == before
    assert main([str(release["single"]), str(tmp_path / "out.safetensors"), "--overwrite"]) == 0
    assert (tmp_path / "out.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["out.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no staged file left behind


def test_cli_subprocess_exit_code_and_stderr(tmp_path):
    torch.save({"payload": Evil(os.system, "true")}, tmp_path / "evil.pt")
    result = subprocess.run(
        [sys.executable, "-m", "adaface_core.convert", str(tmp_path / "evil.pt"), str(tmp_path / "out.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: conversion failed:") and "system" in lines[0]


def test_cli_names_the_full_path_it_wrote(release, tmp_path, monkeypatch, caplog):
    """A relative destination (``../../models/adaface/...`` from the pack's folder) is reported as the place it
    landed, so a path that missed ComfyUI's models folder shows at once."""
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    assert main([str(release["single"]), "out.safetensors"]) == 0
    assert f"-> {tmp_path.resolve() / 'out.safetensors'}" in caplog.text
