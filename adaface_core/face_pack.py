"""Finding the two face models in a user's folder, and choosing the onnxruntime providers.

Users unpack insightface packs by hand, and the commonest failures in peer node packs are a folder
nested one level too deep or too shallow (``assert 'detection' in self.models``) and a silent
fallback to CPU. So every failure here names the folder, the files it wanted and, when it can see
them elsewhere, where they are. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import ConfigError, ModelFileMissingError, git_lfs_hint

logger = logging.getLogger(__name__)

# Known file names, best first. Arc2Face's README puts its arcface.onnx beside antelopev2's files
# in place of glintr100.onnx, so it wins when both are there.
DETECTOR_NAMES = (
    "scrfd_10g_bnkps.onnx",
    "det_10g.onnx",
    "scrfd_2.5g_bnkps.onnx",
    "det_2.5g.onnx",
    "scrfd_500m_bnkps.onnx",
    "det_500m.onnx",
)
RECOGNIZER_NAMES = ("arcface.onnx", "glintr100.onnx", "w600k_r50.onnx", "w600k_mbf.onnx")
# Files of the packs that are neither (landmarks, gender/age, face swap): skipped without opening.
OTHER_NAMES = frozenset({"1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "inswapper_128.onnx"})

EXPECTED = "scrfd_10g_bnkps.onnx (the detector) and glintr100.onnx (the recogniser; Arc2Face's arcface.onnx replaces it)"

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
}
AUTO_ORDER = ("CUDAExecutionProvider", "ROCMExecutionProvider")
"""What ``auto`` may pick. Not CoreML, which macOS's onnxruntime offers: insightface's SCRFD detector loads
under it and then fails at its first photo (a static output shape against the inferred one), so a Mac
detects on the CPU unless CoreML is chosen. DirectML only when chosen too: ComfyUI's ``--directml`` is
opt-in, and onnxruntime-directml is a separate build."""


@dataclass(frozen=True)
class FacePackFiles:
    """The two ONNX files face analysis uses, out of a pack folder."""

    folder: Path
    detector: Path
    recognizer: Path

    @property
    def fingerprint(self) -> str:
        """Which models these are, by file name and size (not path or date: a copied pack is the same pack);
        what a cache of their results records, so another pack's results are not taken for theirs."""
        return "|".join(f"{path.name}:{path.stat().st_size}" for path in (self.detector, self.recognizer))


def onnx_providers(choice: str = "auto", available: Optional[Sequence[str]] = None) -> list[str]:
    """The provider list to give onnxruntime, always ending in CPU.

    Explicit so that insightface never chooses on its own, and so that asking for a GPU that this
    onnxruntime build lacks fails loudly instead of silently running on CPU.
    """
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    available = list(available)
    key = str(choice).strip()
    lowered = key.lower()
    if lowered == "auto":
        chosen = next((name for name in AUTO_ORDER if name in available), None)
    elif lowered in PROVIDERS or key in PROVIDERS.values():
        chosen = PROVIDERS.get(lowered, key)
        if chosen not in available:
            raise ConfigError(
                f"onnxruntime provider {chosen} was asked for, but this onnxruntime only offers "
                f"{', '.join(available) or 'nothing'}. Install the matching build (onnxruntime-gpu for CUDA, "
                "onnxruntime-directml for DirectML; install it after insightface, which pulls the CPU build) or "
                "choose the auto or CPU provider."
            )
    else:
        raise ConfigError(f"unknown face-analysis provider {choice!r}; use one of auto, {', '.join(PROVIDERS)}")
    if chosen is None or chosen == "CPUExecutionProvider":
        return ["CPUExecutionProvider"]
    return [chosen, "CPUExecutionProvider"]


def onnx_role(path: Path) -> Optional[str]:
    """'detection', 'recognition' or None, by the same graph rules insightface's model router uses.

    Detector: five or more outputs. Then, in the router's order: 192 px input is landmarks, 96 px is
    gender/age, two inputs at 128 px is the face swapper; any other square input of 112+ px (a
    multiple of 16) is a recogniser.
    """
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # a damaged or non-ONNX file: not ours to use, say why in the log
        logger.warning("cannot read %s as ONNX (%s); ignoring it.%s", path, error, git_lfs_hint(path))
        return None
    if len(graph.output) >= 5:
        return "detection"
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if not inputs:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] is None or dims[2] != dims[3]:
        return None
    size = dims[2]
    if size in (192, 96) or (len(inputs) == 2 and size == 128):
        return None
    return "recognition" if size >= 112 and size % 16 == 0 else None


def _pick(candidates: list[Path], preferred: Sequence[str], role: str, folder: Path) -> Path:
    """The best-named candidate; several unknown ones are ambiguous."""
    for name in preferred:
        for path in candidates:
            if path.name.lower() == name:
                return path
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ConfigError(f"face model folder {folder} holds several {role} models ({names}); keep only one")
    return candidates[0]


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".onnx")


def _looks_like_pack(folder: Path) -> bool:
    names = {p.name.lower() for p in _onnx_files(folder)}
    return bool(names & set(DETECTOR_NAMES)) and bool(names & set(RECOGNIZER_NAMES))


def find_nested_packs(root: Path, max_depth: int = 3, max_dirs: int = 500) -> list[Path]:
    """Folders under ``root`` (not ``root`` itself) that hold a detector and a recogniser by name."""
    found: list[Path] = []
    visited = 0
    root_depth = len(root.parts)
    for current, dirs, _files in os.walk(root):
        path = Path(current)
        depth = len(path.parts) - root_depth
        dirs.sort()
        if depth >= max_depth:
            dirs[:] = []
        visited += 1
        if visited > max_dirs:
            break
        if depth > 0 and _looks_like_pack(path):
            found.append(path)
    return found


def _hint(folder: Path) -> str:
    """Where the pack seems to be, judged from nested or sibling folders."""
    search_root = folder if folder.is_dir() else folder.parent
    if not search_root.is_dir():
        return ""
    nested = [p for p in find_nested_packs(search_root) if p != folder]
    if not nested:
        return ""
    listed = "; ".join(str(p) for p in nested[:3])
    return (
        f" The face models seem to be in {listed}: point to that folder instead "
        "(unpacking antelopev2.zip inside an antelopev2 folder nests it twice)."
    )


def resolve_face_pack(folder: Union[str, Path]) -> FacePackFiles:
    """Find the detector and recogniser in ``folder``, or raise an error that says how to fix it."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise ModelFileMissingError(
            f"{folder} is a file; give the folder that holds the face models ({folder.parent}), "
            f"which must contain {EXPECTED}."
        )
    if not folder.is_dir():
        raise ModelFileMissingError(
            f"face model folder {folder} does not exist. Put the antelopev2 pack there, so that it "
            f"contains {EXPECTED}. Nothing is downloaded automatically.{_hint(folder)}"
        )
    detectors: list[Path] = []
    recognizers: list[Path] = []
    files = _onnx_files(folder)
    for path in files:
        name = path.name.lower()
        if name in OTHER_NAMES:
            continue
        role = "detection" if name in DETECTOR_NAMES else "recognition" if name in RECOGNIZER_NAMES else onnx_role(path)
        if role == "detection":
            detectors.append(path)
        elif role == "recognition":
            recognizers.append(path)
    missing = []
    if not detectors:
        missing.append("a face detector (scrfd_10g_bnkps.onnx)")
    if not recognizers:
        missing.append("a face recogniser (glintr100.onnx, or Arc2Face's arcface.onnx)")
    if missing:
        present = ", ".join(p.name for p in files) if files else "no .onnx files"
        raise ModelFileMissingError(
            f"face model folder {folder} lacks {' and '.join(missing)}; it has {present}. "
            f"Expected {EXPECTED} directly inside {folder}.{_hint(folder)}"
        )
    pack = FacePackFiles(
        folder=folder,
        detector=_pick(detectors, DETECTOR_NAMES, "detector", folder),
        recognizer=_pick(recognizers, RECOGNIZER_NAMES, "recognition", folder),
    )
    for path in (pack.detector, pack.recognizer):
        if path.suffix != ".onnx":  # insightface's model router takes a file by its lower-case ending only
            raise ConfigError(f"{path}: insightface reads a face model only under a name ending in lower-case .onnx; "
                              f"rename it to {path.stem}.onnx")
    logger.debug("face pack %s: detector %s, recogniser %s", folder, pack.detector.name, pack.recognizer.name)
    return pack
