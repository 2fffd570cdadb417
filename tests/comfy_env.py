"""Loading the pack the way ComfyUI does, inside a temporary ComfyUI-like folder.

``comfy_env`` copies ``tests/standin_comfy`` (the ComfyUI stand-in) to a temporary folder, puts
the SD1 tokenizer in its ``comfy/sd1_tokenizer`` as a ComfyUI install has it, puts that folder first
on ``sys.path``, and imports the repository root as the package ``ComfyUI-AdaFace`` (ComfyUI imports
``custom_nodes/<folder>/__init__.py`` under the folder's name; the repo root is never on the path).
On exit the stand-in and the pack are removed from ``sys.modules`` (an enclosing environment's
modules are put back) and ``sys.path`` is restored.
The pack's core classes are ``ComfyUI-AdaFace.adaface_core.*``: ``env.core(...)`` reaches them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "standin_comfy"
PACK = "ComfyUI-AdaFace"
STANDIN_MODULES = ("folder_paths", "latent_preview", "comfy")


@dataclass
class ComfyEnv:
    root: Path
    folder_paths: ModuleType
    pack: ModuleType

    @property
    def models(self) -> Path:
        return self.root / "models"

    def module(self, name: str) -> ModuleType:
        """A module of the pack or of the stand-in, e.g. ``nodes.folders`` or ``comfy.utils``."""
        full = name if name.split(".")[0] in STANDIN_MODULES else f"{PACK}.{name}"
        return importlib.import_module(full)

    def core(self, module: str, attribute: str):
        return getattr(self.module(f"adaface_core.{module}"), attribute)

    def node(self, name: str):
        return self.pack.NODE_CLASS_MAPPINGS[name]()


def _forget(names: tuple[str, ...]) -> dict[str, ModuleType]:
    """Removes these modules and their submodules from ``sys.modules``; returns what was removed."""
    removed = {}
    for loaded in list(sys.modules):
        if any(loaded == name or loaded.startswith(name + ".") for name in names):
            removed[loaded] = sys.modules.pop(loaded)
    return removed


def load_pack() -> ModuleType:
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def comfy_env(root: Path, tokenizer: Path, before_pack: Optional[Callable[[ModuleType], None]] = None) -> Iterator[ComfyEnv]:
    """A ComfyUI stand-in install at ``root`` (which must not exist yet) with the pack loaded.

    ``before_pack(folder_paths)`` runs before the pack is imported, as ``extra_model_paths.yaml`` does.
    """
    shutil.copytree(STANDIN, root, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    shutil.copytree(tokenizer, root / "comfy" / "sd1_tokenizer")
    (root / "models").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        outer = _forget(STANDIN_MODULES + (PACK,))  # an enclosing environment's, put back on exit
        try:
            folder_paths = importlib.import_module("folder_paths")
            utils = importlib.import_module("comfy.utils")
            if not Path(utils.__file__).resolve().is_relative_to(root.resolve()):
                raise RuntimeError(f"another 'comfy' package shadows the stand-in: {utils.__file__}")
            if before_pack is not None:
                before_pack(folder_paths)
            yield ComfyEnv(root=root, folder_paths=folder_paths, pack=load_pack())
        finally:
            _forget(STANDIN_MODULES + (PACK,))
            sys.modules.update(outer)
