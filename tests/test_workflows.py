"""The example workflows load in ComfyUI as saved: a consistent graph, nodes and widget values that
the pack's own nodes and the other packs' nodes (tests/workflow_catalog.py) accept, wired as documented."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import pytest

from comfy_env import comfy_env
from workflow_catalog import ANY, CONTROL_AFTER_GENERATE, FOREIGN_NODES, Widget, expected_widgets

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
FILES = sorted(WORKFLOWS.glob("*.json"))
SHIPPED = {"adaface_image.json", "adaface_animatediff.json", "arc2face_teacher.json"}
PACK_PREFIX = "AdaFace"
# Dropdowns listing the user's own model files: any name is valid in a shipped file.
FOLDER_COMBOS = {"AdaFaceLoader": {"inverter", "arc2face", "face_models"}}
VALUE_KINDS = {"INT", "FLOAT", "BOOLEAN", "STRING"}


class Workflow:
    """A UI-format workflow with lookups along its links."""

    def __init__(self, path: Path):
        self.name = path.name
        self.data = json.loads(path.read_text(encoding="utf-8"))
        self.nodes = {node["id"]: node for node in self.data["nodes"]}
        self.links = {link[0]: link for link in self.data["links"]}

    def of_type(self, node_type: str) -> list[dict]:
        return [node for node in self.data["nodes"] if node["type"] == node_type]

    def one(self, node_type: str) -> dict:
        found = self.of_type(node_type)
        assert len(found) == 1, f"{self.name}: expected one {node_type}, found {len(found)}"
        return found[0]

    def source(self, node: dict, input_name: str) -> tuple[dict, str]:
        """The node feeding ``input_name`` of ``node`` and the name of the output it comes from."""
        slot = next(i for i in node.get("inputs", []) if i["name"] == input_name)
        assert slot["link"] is not None, f"{self.name}: {node['type']}.{input_name} is not connected"
        _, origin, origin_slot, *_ = self.links[slot["link"]]
        return self.nodes[origin], self.nodes[origin]["outputs"][origin_slot]["name"]


@pytest.fixture(params=FILES, ids=[path.name for path in FILES])
def workflow(request) -> Workflow:
    return Workflow(request.param)


@pytest.fixture(scope="module")
def pack_nodes(tiny_models, tmp_path_factory) -> Iterator[dict]:
    """NODE_CLASS_MAPPINGS of the pack, imported as ComfyUI imports it."""
    with comfy_env(tmp_path_factory.mktemp("workflows") / "ComfyUI", tiny_models.tokenizer) as env:
        yield dict(env.pack.NODE_CLASS_MAPPINGS)


def shipped(name: str) -> Workflow:
    return Workflow(WORKFLOWS / name)


# --- values -------------------------------------------------------------------------------------


def value_problem(widget: Widget, value) -> str | None:
    """Why ``value`` is not one the frontend can hold in this widget, or None."""
    if widget.kind == "FILE":
        return None if isinstance(value, str) and value.strip() else "needs a file name"
    if widget.kind == "COMBO":
        return None if value in widget.options else f"{value!r} is not one of its options"
    if widget.kind == "BOOLEAN":
        return None if isinstance(value, bool) else "needs true/false"
    if widget.kind == "STRING":
        return None if isinstance(value, str) else "needs text"
    numeric = int if widget.kind == "INT" else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        return f"needs a {widget.kind}"
    if widget.min is not None and value < widget.min or widget.max is not None and value > widget.max:
        return f"{value} is outside [{widget.min}, {widget.max}]"
    return None


def widgets_of(node_type: str, node_class) -> tuple[tuple[Widget, ...], dict[str, str], tuple[str, ...]]:
    """From INPUT_TYPES: the widgets in saved order, the connection inputs and the required ones."""
    declared = node_class.INPUT_TYPES()
    widgets, connections, required = [], {}, []
    for section in ("required", "optional"):
        for name, (kind, *rest) in declared.get(section, {}).items():
            options = rest[0] if rest else {}
            if isinstance(kind, (list, tuple)):
                folder = name in FOLDER_COMBOS.get(node_type, ())
                widgets.append(Widget(name, "FILE") if folder else Widget(name, "COMBO", tuple(kind)))
            elif kind in VALUE_KINDS:
                widgets.append(Widget(name, kind, min=options.get("min"), max=options.get("max")))
                if options.get("control_after_generate"):
                    widgets.append(CONTROL_AFTER_GENERATE)
            else:
                connections[name] = kind
                if section == "required":
                    required.append(name)
    return tuple(widgets), connections, tuple(required)


def assert_widget_values(where: str, widgets: tuple[Widget, ...], values) -> None:
    assert isinstance(values, list), f"{where}: widgets_values must be a list"
    assert len(values) == len(widgets), f"{where}: {len(values)} widget values for {[w.name for w in widgets]}"
    problems = [f"{w.name}: {p}" for w, v in zip(widgets, values) if (p := value_problem(w, v))]
    assert not problems, f"{where}: {problems}"


def assert_connections(where: str, node: dict, inputs: dict[str, str], required: tuple[str, ...], outputs) -> None:
    slots = {slot["name"]: slot for slot in node.get("inputs", [])}
    unknown = {name: slot["type"] for name, slot in slots.items() if inputs.get(name) != slot["type"]}
    assert not unknown, f"{where}: inputs not declared with these types: {unknown}"
    unlinked = [name for name in required if slots.get(name, {}).get("link") is None]
    assert not unlinked, f"{where}: required inputs not connected: {unlinked}"
    saved = [(slot["name"], slot["type"]) for slot in node.get("outputs", [])]
    assert saved == list(outputs), f"{where}: outputs {saved}, declared {list(outputs)}"


# --- the graph ----------------------------------------------------------------------------------


def test_the_documented_workflows_are_all_shipped():
    assert SHIPPED <= {path.name for path in FILES}
    readme = (WORKFLOWS / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in (path.name for path in FILES))


def test_is_a_ui_format_workflow_with_unique_ids(workflow):
    data = workflow.data
    assert data["version"] == 0.4 and isinstance(data["links"], list) and isinstance(data["nodes"], list)
    ids = [node["id"] for node in data["nodes"]]
    link_ids = [link[0] for link in data["links"]]
    assert len(ids) == len(set(ids)) and len(link_ids) == len(set(link_ids))
    assert data["last_node_id"] >= max(ids) and data["last_link_id"] >= max(link_ids, default=0)
    for node in data["nodes"]:
        assert {"pos", "size", "flags", "order", "mode", "outputs", "properties", "widgets_values"} <= node.keys(), node["id"]
        assert node["properties"]["Node name for S&R"] == node["type"]
    assert sorted(node["order"] for node in data["nodes"]) == list(range(len(ids)))


def test_every_link_matches_both_of_its_ends(workflow):
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow.data["links"]:
        assert origin in workflow.nodes and target in workflow.nodes, f"link {link_id} ends at a missing node"
        output = workflow.nodes[origin]["outputs"][origin_slot]
        entry = workflow.nodes[target]["inputs"][target_slot]
        assert link_id in (output["links"] or []), f"link {link_id} missing from node {origin}'s output"
        assert entry["link"] == link_id, f"link {link_id} missing from node {target}'s input {entry['name']}"
        assert output["type"] == link_type and entry["type"] in (link_type, ANY), (
            f"link {link_id}: {output['type']} -> {entry['type']} as {link_type}")  # an any-type input keeps "*"
        assert workflow.nodes[origin]["order"] < workflow.nodes[target]["order"], f"link {link_id} runs against the order"


def test_every_connection_refers_to_an_existing_link(workflow):
    for node in workflow.data["nodes"]:
        for slot in node.get("inputs", []):
            if slot["link"] is not None:
                assert workflow.links[slot["link"]][3] == node["id"], f"node {node['id']}.{slot['name']}"
        for index, output in enumerate(node["outputs"]):
            for link_id in output["links"] or []:
                assert workflow.links[link_id][1:3] == [node["id"], index], f"node {node['id']} output {index}"


# --- the nodes ----------------------------------------------------------------------------------


def test_other_packs_nodes_are_known_and_saved_as_their_frontends_save_them(workflow):
    for node in workflow.data["nodes"]:
        if node["type"].startswith(PACK_PREFIX):
            continue
        where = f"{workflow.name} node {node['id']} {node['type']}"
        assert node["type"] in FOREIGN_NODES, f"{where}: not a node of ComfyUI core, AnimateDiff-Evolved or VHS"
        spec = FOREIGN_NODES[node["type"]]
        assert_connections(where, node, spec.inputs, spec.required, spec.outputs)
        widgets = expected_widgets(node["type"], node["widgets_values"])
        if not spec.widgets_as_dict:
            assert_widget_values(where, widgets, node["widgets_values"])
            continue
        values = dict(node["widgets_values"])
        saved = set(values) - set(spec.ui_state_keys)
        assert saved == {w.name for w in widgets}, f"{where}: saved {sorted(saved)}, expected {[w.name for w in widgets]}"
        assert_widget_values(where, widgets, [values[w.name] for w in widgets])


def test_adaface_nodes_match_the_packs_declared_inputs(workflow, pack_nodes):
    for node in workflow.data["nodes"]:
        if not node["type"].startswith(PACK_PREFIX):
            continue
        where = f"{workflow.name} node {node['id']} {node['type']}"
        assert node["type"] in pack_nodes, f"{where}: the pack has no such node"
        node_class = pack_nodes[node["type"]]
        widgets, connections, required = widgets_of(node["type"], node_class)
        assert_connections(where, node, connections, required, zip(node_class.RETURN_NAMES, node_class.RETURN_TYPES))
        assert_widget_values(where, widgets, node["widgets_values"])


def test_the_subject_prompt_holds_its_placeholder(workflow):
    for node in workflow.of_type("AdaFaceInjectSubject"):
        text, placeholder = node["widgets_values"][:2]
        assert placeholder.strip() and placeholder in re.findall(r"\w+", text), f"{workflow.name}: {text!r} lacks {placeholder!r}"


# --- what each workflow is for ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adaface_image.json", "adaface_animatediff.json"])
def test_the_subject_conditions_the_sampler_through_the_checkpoints_own_clip(name):
    flow = shipped(name)
    sampler = flow.one("KSampler")
    positive, _ = flow.source(sampler, "positive")
    assert positive["type"] == "AdaFaceInjectSubject"
    negative, _ = flow.source(sampler, "negative")
    assert negative["type"] == "CLIPTextEncode"
    checkpoint, clip = flow.source(positive, "clip")
    assert (checkpoint["type"], clip) == ("CheckpointLoaderSimple", "CLIP")
    assert flow.source(negative, "clip") == (checkpoint, "CLIP")
    embed, _ = flow.source(positive, "subject")
    assert embed["type"] == "AdaFaceFaceEmbed"
    assert flow.source(embed, "image")[0]["type"] == "LoadImage"
    assert flow.source(embed, "adaface")[0]["type"] == "AdaFaceLoader"
    decode, _ = flow.source(flow.one("SaveImage" if "image" in name else "VHS_VideoCombine"), "images")
    assert flow.source(decode, "samples")[0] is sampler and flow.source(decode, "vae") == (checkpoint, "VAE")


def test_the_image_workflow_samples_the_checkpoint_directly():
    flow = shipped("adaface_image.json")
    sampler = flow.one("KSampler")
    assert flow.source(sampler, "model") == (flow.one("CheckpointLoaderSimple"), "MODEL")
    assert flow.source(sampler, "latent_image")[0]["type"] == "EmptyLatentImage"


def test_the_animation_samples_every_frame_through_animatediff_evolved():
    flow = shipped("adaface_animatediff.json")
    sampler = flow.one("KSampler")
    evolved, _ = flow.source(sampler, "model")
    assert evolved["type"] == "ADE_UseEvolvedSampling"
    assert flow.source(evolved, "model") == (flow.one("CheckpointLoaderSimple"), "MODEL")
    apply, _ = flow.source(evolved, "m_models")
    assert apply["type"] == "ADE_ApplyAnimateDiffModelSimple"
    assert flow.source(apply, "motion_model")[0]["type"] == "ADE_LoadAnimateDiffModel"
    context, _ = flow.source(evolved, "context_options")
    latent, _ = flow.source(sampler, "latent_image")
    frames = latent["widgets_values"][2]
    assert latent["type"] == "EmptyLatentImage" and frames >= context["widgets_values"][0] > 1


def test_the_teacher_draws_the_subject_and_decodes_with_an_sd15_vae():
    flow = shipped("arc2face_teacher.json")
    teacher = flow.one("AdaFaceTeacherSampler")
    embed, _ = flow.source(teacher, "subject")
    loader = flow.one("AdaFaceLoader")
    assert flow.source(teacher, "adaface") == (loader, "adaface") and flow.source(embed, "adaface") == (loader, "adaface")
    assert flow.source(embed, "image")[0]["type"] == "LoadImage"
    decode, _ = flow.source(flow.one("SaveImage"), "images")
    assert flow.source(decode, "samples") == (teacher, "latent")
    assert flow.source(decode, "vae")[1] == "VAE"
