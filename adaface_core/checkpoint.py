"""AdaFace inverter checkpoints: one safetensors file whose metadata holds the configuration.

The loader builds the inverter at the stored attention multipliers first (expanded layers have
larger key/value projections), then checks every tensor's shape against that configuration, so a
file loads with no side files and a mismatch is named rather than half-loaded.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import AdaFaceError, CheckpointError, ConfigError, ModelFileMissingError, WriteError, git_lfs_hint
from .inverter import InverterConfig, PromptInverter
from .weights import check_shapes, state_shapes

logger = logging.getLogger(__name__)

FORMAT_NAME = "adaface-inverter"
FORMAT_VERSION = "1"
SUPPORTED_ID_ENCODER = "arc2face"


def _fsync_path(path: Union[str, Path], flags: int) -> None:
    """Best effort: a filesystem that cannot fsync (some network mounts) must not stop the work."""
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Union[str, Path]) -> None:
    """Puts a file's bytes on disk before a rename publishes it (else a power cut can publish an empty file)."""
    _fsync_path(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows flushes writable handles only


def fsync_dir(folder: Union[str, Path]) -> None:
    """Makes a rename in ``folder`` durable; POSIX only (Windows cannot open a folder to fsync it)."""
    if os.name != "nt":
        _fsync_path(folder, os.O_RDONLY)


def _new_file_beside(path: Path) -> Path:
    """A new empty temporary file in ``path``'s folder, with the permissions a plain new file gets.

    Not ``tempfile.mkstemp``: its files are 0600 (as safetensors' own are), and the rename would publish
    that, so a ComfyUI or a trainer running as another user (Docker, a shared server) could not read it.
    """
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:  # a read-only folder or no permission: name the file meant, not the stand-in
            raise write_failed(path, exc) from exc
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def check_writable_destination(path: Union[str, Path]) -> None:
    """Refuses, before any work, a file that could not be written at the end: a folder in its place, a file
    among its parents, or a folder that takes no new file (read-only, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give the file to write in it, e.g. {path / 'NAME.safetensors'}")
    nearest = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), None)
    if nearest is None:
        raise ConfigError(f"cannot write {path}: no such drive or folder")
    if not nearest.is_dir():
        raise ConfigError(f"cannot write {path}: {nearest} is a file, not a folder")
    if nearest == path.parent:
        _new_file_beside(path).unlink()
    elif not os.access(nearest, os.W_OK | os.X_OK):  # the folders are made first: C:\ takes those, not files
        raise WriteError(f"cannot write {path}: no permission to make folders in {nearest}")


def write_failed(path: Path, exc: BaseException) -> WriteError:
    """The error for a failed write, with the free space left: torch and safetensors report a full disk
    as their own RuntimeError / SafetensorError, which names neither the file nor the cause."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), None)
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there" if folder else ""
    except OSError:
        free = ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # without the temporary file's name
    return WriteError(f"cannot write {path}: {reason}{free}")


def save_torch_file(obj: object, path: Path) -> None:
    """``torch.save`` whose failure (a full disk) is a :class:`WriteError` naming the file."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as exc:
        raise write_failed(path, exc) from exc


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Runs ``write`` on a temporary file beside ``path``, flushes it, then renames it over ``path``:
    a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gives a new file here
        try:
            write(tmp)
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise write_failed(path, exc) from exc
        os.chmod(tmp, mode)  # safetensors writes a file of its own, 0600
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Union[str, Path], metadata: dict[str, str]) -> Path:
    """Saves a safetensors file that is either complete or absent, even after a crash mid-write."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """Writes UTF-8 text (line ends as given) that is either complete or absent, even after a crash mid-write."""
    return _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def save_inverter(
    inverter: PromptInverter,
    path: Union[str, Path],
    extra_metadata: Optional[dict[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Saves weights and configuration in one file (atomically); ``dtype`` casts floating tensors."""
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in inverter.state_dict().items()
    }
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": inverter.config.to_json()}
    metadata.update(extra_metadata or {})
    return atomic_save_safetensors(tensors, path, metadata)


def read_metadata(path: Union[str, Path]) -> dict[str, str]:
    path = Path(path)
    if path.is_dir():
        raise ModelFileMissingError(f"{path} is a folder: give the AdaFace inverter .safetensors file in it")
    if not path.is_file():
        raise ModelFileMissingError(f"AdaFace checkpoint not found: {path}")
    if path.name == "trainer_state.pt" or path.name.startswith("rng_rank"):
        raise CheckpointError(f"{path.name} is not an inverter: give the inverter.safetensors beside it "
                              f"({path.parent / 'inverter.safetensors'})")  # a trainer checkpoint's other files
    if path.suffix in (".pt", ".ckpt", ".bin", ".pth"):
        raise CheckpointError(
            f"{path.name} is a pickled checkpoint (the official release format). Convert it once with "
            f"`python -m adaface_core.convert {path.name} {path.stem}.safetensors`; pickles are never loaded directly."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt."
                              f"{git_lfs_hint(path)}") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path.name} is a safetensors file but not an AdaFace inverter checkpoint "
            f"(metadata format={metadata.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} has checkpoint format version {metadata.get('format_version')!r}; "
            f"this version of ComfyUI-AdaFace reads version {FORMAT_VERSION}"
        )
    return metadata


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating tensors holding NaN or infinity."""
    return [key for key, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_weights_usable(inverter: PromptInverter, name: str) -> None:
    """``CheckpointError`` for weights that can only give NaN subject tokens (black images, no error): a tensor
    holding NaN or infinity (a diverged run's save), or hidden-state layer weights summing to 0 (the mix
    divides by their sum)."""
    broken = non_finite_tensors(inverter)
    if broken:
        raise CheckpointError(f"{name} holds NaN or infinite weights ({', '.join(broken[:3])}"
                              f"{' ...' if len(broken) > 3 else ''}): it cannot give a subject; use an earlier checkpoint")
    if float(inverter.hidden_state_layer_weights.detach().sum()) == 0.0:
        raise CheckpointError(f"{name}'s hidden_state_layer_weights sum to 0, which the layer mix divides by")


def load_inverter(
    path: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> PromptInverter:
    """Rebuilds the inverter from the file's configuration and loads its weights, checking every shape."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        config = InverterConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} has a malformed configuration in its metadata: {exc}") from exc
    if config.id_encoder != SUPPORTED_ID_ENCODER:
        raise CheckpointError(
            f"{path.name} is an inverter for the {config.id_encoder!r} ID encoder; this version reads "
            f"{SUPPORTED_ID_ENCODER!r} inverters only"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            # Shapes first, against a model without storage: a mismatched (or hostile) configuration is
            # reported before anything of its size is allocated.
            with torch.device("meta"):
                expected = state_shapes(PromptInverter(config).state_dict())
            check_shapes(expected, found, path.name)
            inverter = PromptInverter(config)
            inverter.load_state_dict({key: handle.get_tensor(key) for key in handle.keys()})
    except AdaFaceError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read tensors from {path}: {exc}") from exc
    check_weights_usable(inverter, path.name)
    logger.info("loaded AdaFace inverter %s (multipliers %s)", path.name, config.attention_multipliers)
    inverter = inverter.to(device)
    if dtype is not None:
        inverter = inverter.to(dtype)
    return inverter.eval()
