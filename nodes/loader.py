"""Load AdaFace: face models, Arc2Face encoder and an inverter from ComfyUI's model folders."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import comfy.model_management as model_management
import comfy.model_patcher
import torch

from ..adaface_core.errors import ModelFileMissingError
from ..adaface_core.face_analysis import FaceAnalyzer
from ..adaface_core.pipeline import SubjectEncoder
from ..adaface_core.tokenizer import find_tokenizer_folder
from . import folders
from .bundle import AdaFaceBundle
from .types import ADAFACE, CATEGORY

logger = logging.getLogger(__name__)

PROVIDERS = {"auto": "auto", "CPU": "cpu", "CUDA": "cuda", "ROCm": "rocm", "CoreML": "coreml", "DirectML": "directml"}


def comfy_tokenizer_folder() -> Path:
    """ComfyUI's own copy of the SD1.5 (CLIP-L) tokenizer, ``comfy/sd1_tokenizer``."""
    spec = importlib.util.find_spec("comfy")  # a namespace package in ComfyUI: no __init__.py, no origin
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissingError("cannot find ComfyUI's comfy package, which holds the SD1 tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "sd1_tokenizer"


def tokenizer_folder(arc2face_folder: Path) -> Path:
    """A ``tokenizer/`` folder next to the Arc2Face encoder when there is one, else ComfyUI's (no download)."""
    try:
        return find_tokenizer_folder(arc2face_folder)
    except ModelFileMissingError:
        return find_tokenizer_folder(comfy_tokenizer_folder())


def onnx_provider(choice: str, torch_device: torch.device) -> str:
    """The face models' onnxruntime provider: ``auto`` follows ComfyUI's device, so ``--cpu`` keeps them on the CPU."""
    if choice == "auto" and torch_device.type == "cpu":
        return "cpu"
    return PROVIDERS.get(choice, choice)


def cpu_fallback_warning(choice: str, torch_device: torch.device, active: list[str]) -> str | None:
    """What to tell a user whose ComfyUI runs on a GPU while ``auto`` left face analysis on the CPU.

    Why: a reinstall of the requirements (ComfyUI-Manager's updates) can put the CPU build of
    onnxruntime over ``onnxruntime-gpu``; faces then still work, only slower, and nothing else says so.
    """
    if choice != "auto" or torch_device.type in ("cpu", "mps") or active[:1] != ["CPUExecutionProvider"]:
        return None  # on a Mac auto means the CPU (face_pack.AUTO_ORDER)
    if torch_device.type == "privateuseone":  # ComfyUI's --directml
        return ("ComfyUI runs on DirectML but face detection runs on the CPU: install onnxruntime-directml after "
                "this pack's requirements and choose DirectML as the provider")
    return (f"ComfyUI runs on {torch_device.type} but face detection runs on the CPU: this onnxruntime offers no GPU "
            "provider. For GPU face analysis install onnxruntime-gpu (CUDA) or onnxruntime-rocm after this pack's "
            "requirements, which pull the CPU build")


class AdaFaceLoader:
    DESCRIPTION = (
        "Loads the AdaFace models: an inverter from models/adaface, Arc2Face's encoder from models/arc2face "
        "and the face detector/recogniser pack from models/insightface/models. Nothing is downloaded."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAFACE,)
    RETURN_NAMES = ("adaface",)
    OUTPUT_TOOLTIPS = ("The loaded AdaFace models, for Face → ID Embedding and the teacher sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "inverter": (folders.inverter_files(), {"tooltip": "AdaFace inverter file (.safetensors) in ComfyUI/models/adaface."}),
                "arc2face": (
                    folders.arc2face_folders(),
                    {"tooltip": "Folder in ComfyUI/models/arc2face holding FoivosPar/Arc2Face's encoder/ (and arc2face/ for the teacher)."},
                ),
                "face_models": (
                    folders.face_pack_folders(),
                    {"tooltip": "Face detector + recogniser pack in ComfyUI/models/insightface/models (antelopev2)."},
                ),
                "provider": (
                    list(PROVIDERS),
                    {"default": "auto", "tooltip": "Where face detection runs (onnxruntime); auto: CUDA or ROCm when ComfyUI runs on a GPU and this onnxruntime offers it, else the CPU. DirectML and CoreML only when chosen."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, inverter: str | None, arc2face: str | None, face_models: str | None) -> bool | str:
        """Says which files are missing and where they go, before the run starts.

        Declaring the three dropdowns here replaces ComfyUI's own check, which would only say
        "value not in list" for a workflow whose models this install does not have yet. ComfyUI shows
        the one message under each of the three inputs, so it names every missing model at once.
        A name linked from another node arrives as None (not known yet); ``load`` checks it when it runs.
        """
        problems = []
        for find, value in ((folders.inverter_path, inverter), (folders.arc2face_folder, arc2face),
                            (folders.face_pack_folder, face_models)):
            if not isinstance(value, str):
                continue
            try:
                find(value)
            except ModelFileMissingError as missing:
                problems.append(str(missing))
        return "; ".join(problems) if problems else True

    @classmethod
    def IS_CHANGED(cls, inverter: str | None, arc2face: str | None, face_models: str | None, provider: str | None) -> str:
        """Reloads when a model file under the chosen names is replaced (same name, new contents)."""
        return folders.model_files_state(inverter, arc2face, face_models)

    def load(self, inverter: str, arc2face: str, face_models: str, provider: str) -> tuple[AdaFaceBundle]:
        inverter_file = folders.inverter_path(inverter)
        arc2face_dir = folders.arc2face_folder(arc2face)
        load_device = model_management.get_torch_device()
        faces = FaceAnalyzer.from_folder(folders.face_pack_folder(face_models), provider=onnx_provider(provider, load_device))
        warning = cpu_fallback_warning(provider, load_device, faces.providers)
        if warning:
            logger.warning(warning)
        offload_device = model_management.unet_offload_device()
        dtype = torch.float16 if model_management.should_use_fp16(load_device) else torch.float32
        subjects = SubjectEncoder.from_paths(
            inverter_file, arc2face_dir / "encoder", tokenizer_folder(arc2face_dir), faces=faces, device=offload_device, dtype=dtype
        )
        modules = torch.nn.ModuleDict({"encoder": subjects.encoder, "inverter": subjects.inverter})
        patcher = comfy.model_patcher.ModelPatcher(modules, load_device=load_device, offload_device=offload_device)
        logger.info("AdaFace loaded: %s, Arc2Face %s, faces %s (%s)", inverter_file.name, arc2face_dir, face_models, dtype)
        return (AdaFaceBundle(subjects=subjects, patcher=patcher, arc2face_folder=arc2face_dir),)
