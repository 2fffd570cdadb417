"""The nodes of other packs that the example workflows use, as their frontends save them.

The shipped workflows can only be checked against the real node definitions of ComfyUI core,
ComfyUI-AnimateDiff-Evolved (Gen2 nodes) and ComfyUI-VideoHelperSuite if those definitions are
written down: a renamed input, a missing widget value or a combo value the pack no longer offers
makes the node turn red, or fail validation, when a user drags the file in. Names, types, ranges and
options below were read from Comfy-Org/ComfyUI (0.3.64, a125cd8), Kosinkadink/ComfyUI-AnimateDiff-Evolved
(d8d163c) and Kosinkadink/ComfyUI-VideoHelperSuite (4ee72c0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

INT_MAX_64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Widget:
    """One entry of ``widgets_values``.

    ``kind`` is INT, FLOAT, BOOLEAN, STRING, COMBO (one of ``options``) or FILE (a dropdown listing the
    user's own files: any non-empty string is a valid value in a shipped workflow).
    """

    name: str
    kind: str
    options: tuple = ()
    min: Optional[float] = None
    max: Optional[float] = None


@dataclass(frozen=True)
class ForeignNode:
    """A node type of another pack: its connection inputs, outputs and widgets, in slot order."""

    pack: str
    inputs: dict[str, str] = field(default_factory=dict)  # name -> type, required and optional
    required: tuple[str, ...] = ()  # connection inputs that must be linked for the node to run
    outputs: tuple[tuple[str, str], ...] = ()  # (name, type)
    widgets: tuple[Widget, ...] = ()
    widgets_as_dict: bool = False  # VideoHelperSuite saves {widget name: value} instead of a list
    format_widgets: dict[str, tuple[Widget, ...]] = field(default_factory=dict)  # VHS: extra widgets per format
    ui_state_keys: tuple[str, ...] = ()  # dict entries that hold frontend state, not widget values


CORE = "ComfyUI"
ADE = "ComfyUI-AnimateDiff-Evolved"
ANY = "*"
"""How the frontend saves the type of an input that takes any type (the link keeps the type it carries)."""
VHS = "ComfyUI-VideoHelperSuite"

# The seed widget's companion that the frontend adds and saves right after it.
CONTROL_AFTER_GENERATE = Widget("control_after_generate", "COMBO", ("fixed", "increment", "decrement", "randomize"))

SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2",
)
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal")
BETA_SCHEDULES = (
    "autoselect", "use existing", "sqrt_linear (AnimateDiff)", "linear (AnimateDiff-SDXL)", "linear (HotshotXL/default)",
    "avg(sqrt_linear,linear)", "lcm avg(sqrt_linear,linear)", "lcm", "lcm[100_ots]", "lcm >> sqrt_linear",
    "sqrt", "cosine", "squaredcos_cap_v2",
)
STATIC_FUSE_METHODS = (
    "pyramid", "relative", "flat", "overlap-linear", "🔬delayed reverse sawtooth", "🔬pyramid-sigma",
    "🔬pyramid-sigma inverse", "🔬gauss-sigma", "🔬gauss-sigma inverse", "🔬random",
)
# The formats VideoHelperSuite offers without extra files, with the widgets each adds after "format".
VIDEO_FORMATS = {
    "image/gif": (),
    "image/webp": (Widget("lossless", "BOOLEAN"),),
    "video/h264-mp4": (
        Widget("pix_fmt", "COMBO", ("yuv420p", "yuv420p10le")),
        Widget("crf", "INT", min=0, max=100),
        Widget("save_metadata", "BOOLEAN"),
        Widget("trim_to_audio", "BOOLEAN"),
    ),
}

FOREIGN_NODES: dict[str, ForeignNode] = {
    "CheckpointLoaderSimple": ForeignNode(
        CORE, outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")), widgets=(Widget("ckpt_name", "FILE"),)
    ),
    "VAELoader": ForeignNode(CORE, outputs=(("VAE", "VAE"),), widgets=(Widget("vae_name", "FILE"),)),
    "LoadImage": ForeignNode(
        CORE,
        outputs=(("IMAGE", "IMAGE"), ("MASK", "MASK")),
        widgets=(Widget("image", "FILE"), Widget("upload", "COMBO", ("image",))),  # the upload button's value
    ),
    "CLIPTextEncode": ForeignNode(
        CORE, inputs={"clip": "CLIP"}, required=("clip",), outputs=(("CONDITIONING", "CONDITIONING"),),
        widgets=(Widget("text", "STRING"),),
    ),
    "EmptyLatentImage": ForeignNode(
        CORE,
        outputs=(("LATENT", "LATENT"),),
        widgets=(Widget("width", "INT", min=16, max=16384), Widget("height", "INT", min=16, max=16384),
                 Widget("batch_size", "INT", min=1, max=4096)),
    ),
    "KSampler": ForeignNode(
        CORE,
        inputs={"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
        required=("model", "positive", "negative", "latent_image"),
        outputs=(("LATENT", "LATENT"),),
        widgets=(
            Widget("seed", "INT", min=0, max=INT_MAX_64),
            CONTROL_AFTER_GENERATE,
            Widget("steps", "INT", min=1, max=10000),
            Widget("cfg", "FLOAT", min=0.0, max=100.0),
            Widget("sampler_name", "COMBO", SAMPLERS),
            Widget("scheduler", "COMBO", SCHEDULERS),
            Widget("denoise", "FLOAT", min=0.0, max=1.0),
        ),
    ),
    "VAEDecode": ForeignNode(
        CORE, inputs={"samples": "LATENT", "vae": "VAE"}, required=("samples", "vae"), outputs=(("IMAGE", "IMAGE"),)
    ),
    "SaveImage": ForeignNode(CORE, inputs={"images": "IMAGE"}, required=("images",), widgets=(Widget("filename_prefix", "STRING"),)),
    "PreviewImage": ForeignNode(CORE, inputs={"images": "IMAGE"}, required=("images",)),
    "PreviewAny": ForeignNode(CORE, inputs={"source": ANY}, required=("source",)),  # shows text; no saved widget
    "ADE_LoadAnimateDiffModel": ForeignNode(
        ADE, inputs={"ad_settings": "AD_SETTINGS"}, outputs=(("MOTION_MODEL", "MOTION_MODEL_ADE"),),
        widgets=(Widget("model_name", "FILE"),),
    ),
    "ADE_ApplyAnimateDiffModelSimple": ForeignNode(
        ADE,
        inputs={"motion_model": "MOTION_MODEL_ADE", "motion_lora": "MOTION_LORA", "scale_multival": "MULTIVAL",
                "effect_multival": "MULTIVAL", "ad_keyframes": "AD_KEYFRAMES", "per_block": "PER_BLOCK"},
        required=("motion_model",),
        outputs=(("M_MODELS", "M_MODELS"),),
    ),
    "ADE_UseEvolvedSampling": ForeignNode(
        ADE,
        inputs={"model": "MODEL", "m_models": "M_MODELS", "context_options": "CONTEXT_OPTIONS", "sample_settings": "SAMPLE_SETTINGS"},
        required=("model",),
        outputs=(("MODEL", "MODEL"),),
        widgets=(Widget("beta_schedule", "COMBO", BETA_SCHEDULES),),
    ),
    "ADE_StandardStaticContextOptions": ForeignNode(
        ADE,
        inputs={"prev_context": "CONTEXT_OPTIONS", "view_opts": "VIEW_OPTS"},
        outputs=(("CONTEXT_OPTS", "CONTEXT_OPTIONS"),),
        widgets=(
            Widget("context_length", "INT", min=1, max=128),
            Widget("context_overlap", "INT", min=0, max=128),
            Widget("fuse_method", "COMBO", STATIC_FUSE_METHODS),
            Widget("use_on_equal_length", "BOOLEAN"),
            Widget("start_percent", "FLOAT", min=0.0, max=1.0),
            Widget("guarantee_steps", "INT", min=0, max=2**53 - 1),
        ),
    ),
    "VHS_VideoCombine": ForeignNode(
        VHS,
        inputs={"images": "IMAGE", "audio": "AUDIO", "meta_batch": "VHS_BatchManager", "vae": "VAE"},
        required=("images",),
        outputs=(("Filenames", "VHS_FILENAMES"),),
        widgets=(
            Widget("frame_rate", "FLOAT", min=1),
            Widget("loop_count", "INT", min=0, max=100),
            Widget("filename_prefix", "STRING"),
            Widget("format", "COMBO", tuple(VIDEO_FORMATS)),
            Widget("pingpong", "BOOLEAN"),
            Widget("save_output", "BOOLEAN"),
        ),
        widgets_as_dict=True,
        format_widgets=VIDEO_FORMATS,
        ui_state_keys=("videopreview",),
    ),
}


def expected_widgets(node_type: str, values) -> tuple[Widget, ...]:
    """The widgets a saved node of this type carries; for VHS, those of the saved format too."""
    spec = FOREIGN_NODES[node_type]
    if not spec.format_widgets:
        return spec.widgets
    names = [w.name for w in spec.widgets]
    extra = spec.format_widgets.get(values.get("format"), ()) if isinstance(values, dict) else ()
    at = names.index("format") + 1
    return spec.widgets[:at] + tuple(extra) + spec.widgets[at:]
