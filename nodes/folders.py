"""The model folders this pack reads, registered with ComfyUI's ``folder_paths``, and their listings.

Registration runs when ComfyUI imports the pack, which is after ``extra_model_paths.yaml`` was read:
entries that file added for our names are kept and our default ``models/<name>`` is appended.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adaface_core.errors import ModelFileMissingError

ADAFACE_FOLDER = "adaface"
ARC2FACE_FOLDER = "arc2face"
INSIGHTFACE_FOLDER = "insightface"
EMBEDDINGS_FOLDER = "embeddings"

_EXTENSIONS = {ADAFACE_FOLDER: {".safetensors"}, ARC2FACE_FOLDER: set(), INSIGHTFACE_FOLDER: set()}


def register_model_folders() -> None:
    """Adds ``models/adaface`` (inverter files), ``models/arc2face`` and ``models/insightface``."""
    import folder_paths

    for name, extensions in _EXTENSIONS.items():
        default = os.path.join(folder_paths.models_dir, name)
        paths, existing = folder_paths.folder_names_and_paths.get(name, ([], set()))
        paths = list(paths) + ([default] if default not in paths else [])
        folder_paths.folder_names_and_paths[name] = (paths, set(existing) | extensions)


def _roots(name: str) -> list[Path]:
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths(name)]


def _where(name: str, tail: str = "") -> str:
    return " or ".join(str(root / tail) if tail else str(root) for root in _roots(name))


def inverter_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(ADAFACE_FOLDER)


def inverter_path(file_name: str) -> Path:
    """The full path of an inverter file chosen in the dropdown."""
    import folder_paths

    try:
        return Path(folder_paths.get_full_path_or_raise(ADAFACE_FOLDER, file_name))
    except FileNotFoundError:
        raise ModelFileMissingError(
            f"AdaFace inverter {file_name!r} not found: put an inverter file (the converted official release, "
            f"e.g. adaface.safetensors, or a trained adaface_inverter.safetensors) in {_where(ADAFACE_FOLDER)}"
        ) from None


def _is_folder_name(name: str) -> bool:
    """A single folder name, as the dropdowns list them: not a path that could leave the model folder.

    Why: the loader's ``VALIDATE_INPUTS`` takes these inputs over from ComfyUI's options check, so a shared
    workflow or an API call can send any string; an absolute path or ``..`` would read models from elsewhere.
    """
    path = Path(name)
    return path.parts == (name,) and name != ".." and not path.anchor


def _not_a_folder_name(kind: str, name: str, folder: str, tail: str = "") -> ModelFileMissingError:
    return ModelFileMissingError(f"{kind} {name!r} is not a folder name: choose one of the folders in {_where(folder, tail)}")


def _is_arc2face_folder(path: Path) -> bool:
    return (path / "encoder" / "config.json").is_file()


def arc2face_folders() -> list[str]:
    """Folders under ``models/arc2face`` holding Arc2Face's ``encoder/`` (``.`` when the root itself does)."""
    names: set[str] = set()
    for root in _roots(ARC2FACE_FOLDER):
        if _is_arc2face_folder(root):
            names.add(".")
        if root.is_dir():
            names.update(child.name for child in root.iterdir() if child.is_dir() and _is_arc2face_folder(child))
    return sorted(names)


def arc2face_folder(name: str) -> Path:
    """The chosen Arc2Face folder (``.``: the root itself), only ever inside a registered ``arc2face`` folder."""
    if name != "." and not _is_folder_name(name):
        raise _not_a_folder_name("Arc2Face folder", name, ARC2FACE_FOLDER)
    for root in _roots(ARC2FACE_FOLDER):
        candidate = (root / name) if name != "." else root
        if _is_arc2face_folder(candidate):
            return candidate
    raise ModelFileMissingError(
        f"Arc2Face folder {name!r} not found: download FoivosPar/Arc2Face and put its encoder/ and arc2face/ "
        f"folders in {_where(ARC2FACE_FOLDER, name if name != '.' else '<name>')}"
    )


def face_pack_folders() -> list[str]:
    """Pack folders under ``models/insightface/models`` (where insightface-based packs keep them)."""
    names: set[str] = set()
    for root in _roots(INSIGHTFACE_FOLDER):
        packs = root / "models"
        if packs.is_dir():
            names.update(child.name for child in packs.iterdir() if child.is_dir())
    return sorted(names)


def face_pack_folder(name: str) -> Path:
    """The chosen pack folder; the core names the files it lacks, so only a missing folder is reported here."""
    if not _is_folder_name(name):
        raise _not_a_folder_name("face model folder", name, INSIGHTFACE_FOLDER, "models")
    for root in _roots(INSIGHTFACE_FOLDER):
        candidate = root / "models" / name
        if candidate.is_dir():
            return candidate
    raise ModelFileMissingError(
        f"face model folder {name!r} not found: unpack the antelopev2 face models into {_where(INSIGHTFACE_FOLDER, 'models/' + name)}"
    )


def model_files_state(inverter: str | None, arc2face: str | None, face_models: str | None) -> str:
    """Name, size and modification time of every file the loader reads for these choices.

    Why: ComfyUI reuses a node's output while its inputs stay the same, so without this a retrained
    inverter saved under the old name, or ``arcface.onnx`` dropped into the face pack, would go
    unnoticed until ComfyUI restarts. Missing choices count as their own state (the loader's
    validation names them); a name linked from another node (None here) too: a new name there is
    a new input, which makes ComfyUI rerun the loader anyway.
    """
    parts = []
    for find, value, folders_within in ((inverter_path, inverter, ()), (arc2face_folder, arc2face, ("encoder", "arc2face")),
                                         (face_pack_folder, face_models, ("",))):
        if not isinstance(value, str):
            parts.append("linked")
            continue
        try:
            found = find(value)
        except ModelFileMissingError:
            parts.append(f"missing {value}")
            continue
        files = [found] if found.is_file() else sorted(f for sub in folders_within if (found / sub).is_dir()
                                                      for f in (found / sub).iterdir() if f.is_file())
        parts += map(file_state, files)
    return "|".join(parts)


def file_state(path: Path) -> str:
    """A file's name, size and modification time, or that it is absent: what ``IS_CHANGED`` compares."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path}:absent"
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def embeddings_folders() -> list[Path]:
    """ComfyUI's embeddings folders; new embeddings are saved in the first."""
    return _roots(EMBEDDINGS_FOLDER)
