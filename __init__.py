"""ComfyUI-AdaFace: ComfyUI loads this folder as a package and reads the two node mappings.

The model folders (models/adaface, models/arc2face, models/insightface) are registered here, once,
when ComfyUI imports the pack. Outside ComfyUI (pytest imports this file because the repository
root is a package) there is no ``folder_paths`` module, and the pack exports no nodes.
"""

try:
    import folder_paths  # noqa: F401 - ComfyUI's own module, always imported before custom nodes
except ModuleNotFoundError as missing:
    if missing.name != "folder_paths":
        raise
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.folders import register_model_folders

    register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
