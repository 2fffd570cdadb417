"""Stand-in for ComfyUI's ``folder_paths``: named model folders under ``models/`` beside this file."""

from __future__ import annotations

import os

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

base_path = os.path.dirname(os.path.realpath(__file__))
models_dir = os.path.join(base_path, "models")

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {
    "checkpoints": ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions),
    "embeddings": ([os.path.join(models_dir, "embeddings")], supported_pt_extensions),
    "diffusion_models": ([os.path.join(models_dir, "unet"), os.path.join(models_dir, "diffusion_models")], supported_pt_extensions),
}


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """What ``extra_model_paths.yaml`` entries go through; a new name gets an empty extension set."""
    if folder_name in folder_names_and_paths:
        paths = folder_names_and_paths[folder_name][0]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            found.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
    return found


def get_filename_list(folder_name: str) -> list[str]:
    """Files (relative paths) in every folder of the name, filtered by its extensions (empty = all)."""
    paths, extensions = folder_names_and_paths[folder_name]
    names: set[str] = set()
    for directory in paths:
        if os.path.isdir(directory):
            names.update(
                f for f in _walk(directory) if not extensions or os.path.splitext(f)[1].lower() in extensions
            )
    return sorted(names)


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for directory in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(directory, filename)
        if os.path.isfile(full_path):
            return full_path
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path
