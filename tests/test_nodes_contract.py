"""What ComfyUI and the workflow files rely on: mappings, display names, widget order, documentation."""

from __future__ import annotations

import shutil

import pytest

from comfy_env import comfy_env

DISPLAY_NAMES = {
    "AdaFaceLoader": "Load AdaFace",
    "AdaFaceFaceEmbed": "Face → ID Embedding",
    "AdaFaceInjectSubject": "Inject Subject Tokens into CLIP conditioning",
    "AdaFaceTeacherSampler": "Arc2Face Teacher Sampler",
    "AdaFaceSaveEmbedding": "Save AdaFace Embedding",
    "AdaFaceMixSubjects": "Mix Subject Embeddings",
}

# Inputs in widget order (required, then optional): the saved workflows' widgets_values follow it.
INPUTS = {
    "AdaFaceLoader": (["inverter", "arc2face", "face_models", "provider"], []),
    "AdaFaceFaceEmbed": (["adaface", "image"], []),
    "AdaFaceInjectSubject": (
        ["clip", "subject", "text", "placeholder", "id_strength", "start_percent", "end_percent", "append_if_missing"],
        ["subject_2", "placeholder_2"],
    ),
    "AdaFaceTeacherSampler": (["adaface", "subject", "seed", "steps", "cfg", "width", "height", "batch_size"], []),
    "AdaFaceSaveEmbedding": (["subject", "name", "id_strength", "overwrite"], []),
    "AdaFaceMixSubjects": (["subject_a", "subject_b", "weight"], []),
}
OUTPUTS = {
    "AdaFaceLoader": (("ADAFACE",), ("adaface",)),
    "AdaFaceFaceEmbed": (("ADAFACE_SUBJECT", "IMAGE", "STRING"), ("subject", "face_crops", "report")),
    "AdaFaceInjectSubject": (("CONDITIONING",), ("conditioning",)),
    "AdaFaceTeacherSampler": (("LATENT",), ("latent",)),
    "AdaFaceSaveEmbedding": (("STRING",), ("prompt_word",)),
    "AdaFaceMixSubjects": (("ADAFACE_SUBJECT",), ("subject",)),
}


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    with comfy_env(tmp_path_factory.mktemp("comfy") / "ComfyUI", tiny_models.tokenizer) as env:
        yield env


def test_pack_exports_both_mappings_with_the_spec_display_names(env):
    assert set(env.pack.NODE_CLASS_MAPPINGS) == set(DISPLAY_NAMES)
    assert env.pack.NODE_DISPLAY_NAME_MAPPINGS == DISPLAY_NAMES


@pytest.mark.parametrize("name", sorted(DISPLAY_NAMES))
def test_every_node_is_documented_and_shaped_as_the_spec_says(env, name):
    node = env.pack.NODE_CLASS_MAPPINGS[name]
    assert node.CATEGORY == "AdaFace"
    assert len(node.DESCRIPTION) > 40
    assert (node.RETURN_TYPES, node.RETURN_NAMES) == OUTPUTS[name]
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES) and all(node.OUTPUT_TOOLTIPS)
    assert callable(getattr(node(), node.FUNCTION))
    inputs = node.INPUT_TYPES()
    required, optional = INPUTS[name]
    assert list(inputs["required"]) == required and list(inputs.get("optional", {})) == optional
    for spec in [*inputs["required"].values(), *inputs.get("optional", {}).values()]:
        assert spec[1]["tooltip"]


def test_defaults_match_the_spec(env):
    inject = env.pack.NODE_CLASS_MAPPINGS["AdaFaceInjectSubject"].INPUT_TYPES()
    assert inject["required"]["text"][1].items() >= {"multiline": True, "default": "a photo of z"}.items()
    assert inject["required"]["id_strength"][1].items() >= {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05}.items()
    assert inject["optional"]["placeholder_2"][1]["default"] == "y"
    teacher = env.pack.NODE_CLASS_MAPPINGS["AdaFaceTeacherSampler"].INPUT_TYPES()["required"]
    assert teacher["seed"][1]["control_after_generate"] is True
    assert [teacher[k][1]["default"] for k in ("steps", "cfg", "width", "height", "batch_size")] == [25, 3.0, 512, 512, 1]
    assert env.pack.NODE_CLASS_MAPPINGS["AdaFaceSaveEmbedding"].OUTPUT_NODE is True


def test_tokenizer_comes_from_beside_the_encoder_else_from_comfyui(env, tiny_models, tmp_path):
    loader = env.module("nodes.loader")
    arc2face = tmp_path / "arc2face_models"
    (arc2face / "encoder").mkdir(parents=True)
    assert loader.tokenizer_folder(arc2face) == env.root / "comfy" / "sd1_tokenizer"
    shutil.copytree(tiny_models.tokenizer, arc2face / "tokenizer")
    assert loader.tokenizer_folder(arc2face) == arc2face / "tokenizer"
