"""SD1.5 as one LDM-layout single file: loads like the diffusers folder it was made from, trains, fails clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from adaface_core.clip_text import ClipTextConfig
from adaface_core.errors import CheckpointError, ModelFileMissingError
from adaface_core.tiny_single_file import ldm_unet, ldm_vae, write_config_folder, write_single_file_from_folder
from trainer.config import config_from_dict
from trainer.models import build_models
from trainer.run import main
from trainer.single_file import SHIPPED_CONFIGS

ATOL = 1e-5


@pytest.fixture(scope="module")
def single_file(tiny_models, tmp_path_factory):
    """The session's tiny diffusers SD1.5 folder, converted to one LDM safetensors file + its configs."""
    root = tmp_path_factory.mktemp("single_file")
    checkpoint = write_single_file_from_folder(tiny_models.sd15, root / "tiny-sd15.safetensors")
    configs = write_config_folder(tiny_models.sd15, root / "configs")
    return {"sd15": str(checkpoint), "tokenizer": str(tiny_models.tokenizer), "sd15_configs": str(configs)}


def models_config(tiny_models, **models) -> dict:
    return {"models": {"arc2face": str(tiny_models.arc2face), **models}}


def build(values: dict):
    return build_models(config_from_dict(values), torch.device("cpu"), need_teacher=False)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    assert torch.allclose(a, b, atol=ATOL, rtol=0), f"{what}: max diff {(a - b).abs().max().item()}"


def test_the_single_file_gives_the_outputs_of_the_folder_it_was_made_from(tiny_models, single_file):
    from_file = build(models_config(tiny_models, **single_file))
    from_folder = build(models_config(tiny_models, sd15=str(tiny_models.sd15)))
    gen = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "photo of a z person in the forest"]
    assert torch.equal(from_file.prompt_ids(prompts), from_folder.prompt_ids(prompts))
    with torch.no_grad():
        context = from_folder.encode_prompts(prompts)
        assert_close(from_file.encode_prompts(prompts), context, "text encoder")
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        t = torch.tensor([10, 900])
        assert_close(from_file.unet(latents, t, context).sample, from_folder.unet(latents, t, context).sample, "UNet")
        pixels = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
        encoded = from_folder.encode_images(pixels)
        assert_close(from_file.encode_images(pixels), encoded, "VAE encoder")
        assert_close(from_file.vae.decode(encoded).sample, from_folder.vae.decode(encoded).sample, "VAE decoder")
    assert from_file.vae.config.scaling_factor == from_folder.vae.config.scaling_factor
    assert torch.equal(from_file.scheduler.alphas_cumprod, from_folder.scheduler.alphas_cumprod)


def test_stage_one_trains_from_the_single_file(tiny_models, single_file, tmp_path):
    values = models_config(tiny_models, **single_file)
    values |= {
        "data": {"image_size": 32, "random_id_prob": 1.0},
        "run": {"output": str(tmp_path / "out"), "seed": 3, "save_every": 2, "log_every": 1, "device": "cpu",
                "tensorboard": False},
        "face": {"max_steps": 2, "optim": {"optimizer": "adamw", "lr": 2e-3, "batch_size": 2, "grad_accum": 1},
                 "loss": {"chain_steps": 2}, "expansion": {"enabled": False}},
    }
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    result = main(["--config", str(config_path), "--no-progress"])
    (stage,) = result.stages
    assert stage.steps == 2 and stage.final_checkpoint.is_file()
    assert all(math.isfinite(loss) for loss in stage.losses)


def test_a_single_file_without_a_tokenizer_names_what_to_put_where(tiny_models, single_file, tmp_path):
    values = {"models": {"sd15": single_file["sd15"], "arc2face": str(tmp_path / "no_arc2face")}}
    with pytest.raises(ModelFileMissingError) as caught:
        config_from_dict(values).validate()
    message = str(caught.value)
    assert "models.tokenizer" in message and "comfy/sd1_tokenizer" in message
    assert "models.arc2face encoder" in message  # every missing path in the one error
    with pytest.raises(ModelFileMissingError, match="models.tokenizer"):
        build(models_config(tiny_models, sd15=single_file["sd15"]))


def test_missing_single_file_and_configs_are_named_at_once(tmp_path):
    values = {"models": {"sd15": str(tmp_path / "v1-5.safetensors"), "tokenizer": str(tmp_path / "tok"),
                         "sd15_configs": str(tmp_path / "configs")}}
    with pytest.raises(ModelFileMissingError) as caught:
        config_from_dict(values).validate()
    message = str(caught.value)
    for expected in ("models.sd15 (single-file", "models.tokenizer: ", "models.sd15_configs unet",
                     "models.sd15_configs vae", "models.sd15_configs text_encoder"):
        assert expected in message, expected


def test_a_folder_keeps_its_own_tokenizer_unless_one_is_named(tiny_models, tmp_path):
    folder = config_from_dict({"models": {"sd15": str(tiny_models.sd15)}}).required_paths()
    assert ("models.sd15 tokenizer", tiny_models.tokenizer / "vocab.json") in folder
    named = config_from_dict({"models": {"sd15": str(tiny_models.sd15), "tokenizer": str(tmp_path)}}).required_paths()
    assert ("models.tokenizer", tmp_path / "vocab.json") in named


def _variant(single_file: dict, path: Path, edit) -> dict:
    """The tiny single file with its tensors changed by ``edit``, saved as ``path``."""
    state = load_file(single_file["sd15"])
    edit(state)
    save_file(state, str(path))
    return dict(single_file, sd15=str(path))


def test_files_that_are_not_sd15_ldm_checkpoints_are_refused_by_name(tiny_models, single_file, tmp_path):
    def sdxl(state):
        state["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(4)

    with pytest.raises(CheckpointError, match="not an SD1.5 single-file.*SDXL"):
        build(models_config(tiny_models, **_variant(single_file, tmp_path / "sdxl.safetensors", sdxl)))

    diffusers_unet = tiny_models.sd15 / "unet" / "diffusion_pytorch_model.safetensors"
    flat = dict(single_file, sd15=str(tmp_path / "unet.safetensors"))
    save_file(load_file(str(diffusers_unet)), flat["sd15"])
    with pytest.raises(CheckpointError, match=r"no model\.diffusion_model\.\*.*diffusers-layout UNet"):
        build(models_config(tiny_models, **flat))


def test_a_file_with_a_missing_or_extra_tensor_is_refused(tiny_models, single_file, tmp_path):
    def drop_one(state):
        del state["model.diffusion_model.out.2.weight"]

    with pytest.raises(CheckpointError, match=r"UNet, in diffusers' names.*missing 1 tensors.*conv_out\.weight"):
        build(models_config(tiny_models, **_variant(single_file, tmp_path / "partial.safetensors", drop_one)))

    def add_one(state):
        state["first_stage_model.encoder.extra.weight"] = torch.ones(3)

    with pytest.raises(CheckpointError, match=r"1 VAE tensors have no place.*encoder\.extra\.weight"):
        build(models_config(tiny_models, **_variant(single_file, tmp_path / "extra.safetensors", add_one)))


class NotATensor:
    """Anything but tensors in a .ckpt pickle must be refused, not constructed."""


def test_a_ckpt_loads_with_weights_only_and_code_in_it_is_refused(tiny_models, single_file, tmp_path):
    state = load_file(single_file["sd15"])
    ckpt = tmp_path / "tiny.ckpt"
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelout2weight": torch.zeros(1)}
    torch.save({"state_dict": state | ema, "global_step": 1}, ckpt)  # the EMA copy is ignored
    from_ckpt = build(models_config(tiny_models, **dict(single_file, sd15=str(ckpt))))
    assert torch.equal(from_ckpt.unet.conv_in.weight, state["model.diffusion_model.input_blocks.0.0.weight"])
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "payload": NotATensor()}, evil)
    with pytest.raises(CheckpointError, match="(?s)evil.ckpt holds more than plain tensors.*could run code.*NotATensor.*safetensors release"):
        build(models_config(tiny_models, **dict(single_file, sd15=str(evil))))


def test_the_shipped_configs_are_sd15s():
    """The configs a user's file loads with: SD1.5's UNet (859.5M), VAE (83.7M) and CLIP-L text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    text = json.loads((SHIPPED_CONFIGS / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    assert ClipTextConfig.from_dict(text) == ClipTextConfig()
    sizes = {}
    for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(str(SHIPPED_CONFIGS / name), local_files_only=True))
        sizes[name] = sum(p.numel() for p in model.parameters())
    assert sizes == {"unet": 859_520_964, "vae": 83_653_863}


def test_the_ldm_layout_round_trips_through_diffusers_converter_at_full_size():
    """The test writer's mapping at SD1.5's real shapes (2 layers per block), on the meta device: diffusers'
    converter turns it back into exactly the model's tensors, so the shipped configs and layout agree."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for cls, name, to_ldm, convert, count in (
        (UNet2DConditionModel, "unet", ldm_unet, convert_ldm_unet_checkpoint, 686),
        (AutoencoderKL, "vae", ldm_vae, convert_ldm_vae_checkpoint, 248),
    ):
        config = cls.load_config(str(SHIPPED_CONFIGS / name), local_files_only=True)
        with torch.device("meta"):
            state = cls.from_config(config).state_dict()
        ldm = to_ldm(state, config)
        assert len(ldm) == count  # as many tensors as in v1-5-pruned-emaonly.safetensors
        back = convert(ldm, config)
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}
