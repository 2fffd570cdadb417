"""A restricted reader for ``torch.save`` zip checkpoints that never imports or runs pickled code.

The official AdaFace release pickles whole ``nn.Module`` objects; torch's full unpickler (``weights_only``
off) would import their classes and let the file call anything. This reader resolves every global the
pickle names itself: a few harmless builders (tensors, dtypes, containers) are real; classes under
known model-library prefixes become inert :class:`StandIn` records of the state the pickle sets;
everything else is refused with :class:`UnsafePickleError` before it can be called.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from .errors import CheckpointError, ModelFileMissingError, UnsafePickleError, git_lfs_hint

logger = logging.getLogger(__name__)

# Classes and functions under these modules are recorded, never imported or called. ``ftfy``: the
# pickled CLIPTokenizer of transformers 4.x holds ``ftfy.fix_text`` wherever ftfy was installed.
INERT_PREFIXES = (
    "adaface", "ldm", "transformers", "tokenizers", "diffusers", "torch.nn.modules",
    "regex", "re", "omegaconf", "einops", "numpy", "pathlib", "enum", "ftfy",
)
_MISSING = object()


class StandIn:
    """Inert record of a pickled object: its class path, constructor args and state, nothing run."""

    class_path = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        self = object.__new__(cls)
        self.__dict__.update(_args=args, _kwargs=kwargs, _state=None, _items=[], _mapping={})
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Calls (REDUCE) are recorded by ``__new__``; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def append(self, item: Any) -> None:
        self._items.append(item)

    def extend(self, items: Any) -> None:
        self._items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._mapping[key] = value

    def __repr__(self) -> str:
        return f"<stand-in {self.class_path}>"

    @property
    def state(self) -> dict[str, Any]:
        """The recorded attribute dict (``(dict, slots)`` states merged; non-dict states as ``{}``)."""
        state = self._state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return state if isinstance(state, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        """An ``nn.Module``-style attribute: parameter, buffer, submodule or plain attribute."""
        state = self.state
        for bucket in ("_parameters", "_buffers", "_modules"):
            values = state.get(bucket)
            if isinstance(values, dict) and name in values:
                return values[name]
        if name in state:
            return state[name]
        if name in self._mapping:
            return self._mapping[name]
        return default

    def has(self, name: str) -> bool:
        return self.get(name, _MISSING) is not _MISSING

    def lookup(self, dotted: str, default: Any = None) -> Any:
        """``get`` along a dotted path (``"text_model.encoder.layers.0"``); ``default`` if any step is missing."""
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, StandIn):
                return default
            node = node.get(part, _MISSING)
            if node is _MISSING:
                return default
        return node

    def children(self) -> list[tuple[str, Any]]:
        """Submodules in registration order (a ModuleList's are named ``"0"``, ``"1"``, ...)."""
        modules = self.state.get("_modules")
        return list(modules.items()) if isinstance(modules, dict) else []

    def named_tensors(
        self, prefix: str = "", buffers: bool = True, _seen: Optional[set[int]] = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter (and buffer) below this module, named as ``state_dict`` would (cycles cut)."""
        seen = _seen if _seen is not None else set()
        seen.add(id(self))
        buckets = ("_parameters", "_buffers") if buffers else ("_parameters",)
        for bucket in buckets:
            values = self.state.get(bucket)
            for name, value in (values.items() if isinstance(values, dict) else ()):
                if isinstance(value, torch.Tensor):
                    yield prefix + name, value
        for name, child in self.children():
            if isinstance(child, StandIn) and id(child) not in seen:
                yield from child.named_tensors(f"{prefix}{name}.", buffers, seen)


def is_standin(obj: Any, class_name: Optional[str] = None) -> bool:
    """True for a stand-in, optionally of a class whose path ends with ``class_name``."""
    return isinstance(obj, StandIn) and (class_name is None or obj.class_path.rsplit(".", 1)[-1] == class_name)


_STANDIN_TYPES: dict[str, type] = {}


def standin_type(path: str) -> type:
    """One StandIn subclass per pickled class path, so ``isinstance``-free checks read ``class_path``."""
    if path not in _STANDIN_TYPES:
        _STANDIN_TYPES[path] = type(path.rsplit(".", 1)[-1], (StandIn,), {"class_path": path, "__module__": __name__})
    return _STANDIN_TYPES[path]


class _StorageType:
    """What a pickled ``torch.HalfStorage`` (etc.) resolves to: only its element type."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _as_tensor(storage: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise CheckpointError(f"a tensor record points at {type(storage).__name__}, not at a stored array")
    return storage


def _rebuild_tensor(
    storage: Any, offset: int, size: tuple, stride: tuple, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """A view of the stored bytes; ``as_strided`` refuses any size/stride/offset reaching past them."""
    flat = _as_tensor(storage)
    if dtype is not None and dtype != flat.dtype:
        flat = flat.view(torch.uint8).view(dtype)
    try:
        return flat.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"a tensor record does not fit its stored data: {exc}") from exc


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> torch.Tensor:
    return _rebuild_tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: bool = False, hooks: Any = None, state: Any = None) -> nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"a parameter record holds {type(data).__name__}, not a tensor")
    return nn.Parameter(data, requires_grad=False)


class _TypeMarker:
    """Stands for ``torch.Tensor`` / ``nn.Parameter`` as a type argument: not callable, not constructible."""

    def __init__(self, name: str):
        self.name = name


_PARAMETER, _TENSOR = _TypeMarker("Parameter"), _TypeMarker("Tensor")


def _rebuild_from_type_v2(func: Callable, new_type: Any, args: tuple, state: Any) -> Any:
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise UnsafePickleError(f"_rebuild_from_type_v2 with builder {func!r} is refused")
    result = func(*args)
    return _rebuild_parameter(result) if new_type is _PARAMETER else result


def _codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol 2 writes ``bytes`` as ``_codecs.encode(str, "latin1")``; no other codec is looked up."""
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is refused")
    return text.encode(encoding, errors)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1 object records: only stand-ins (and plain ``object``) are created."""
    if not (isinstance(cls, type) and issubclass(cls, StandIn)) or base is not object:
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r} on {base!r} is refused")
    return cls.__new__(cls)


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch._tensor", "Tensor"): _TENSOR,
    ("torch", "Tensor"): _TENSOR,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("builtins", n): getattr(builtins, n)
       for n in ("set", "frozenset", "slice", "bytearray", "complex", "list", "dict", "tuple", "object")},
    **{(m, n): _StorageType(d) for n, d in _STORAGE_DTYPES.items() for m in ("torch", "torch.storage")},
    **{("torch", n): getattr(torch, n) for n in (
        "float16", "float32", "float64", "bfloat16", "half", "float", "double", "int64", "int32", "int16",
        "int8", "uint8", "bool", "long", "int", "short")},
}


def _is_name(key: Any) -> bool:
    return isinstance(key, str) and key.isidentifier()


class RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its opcode table can be narrowed
    """Resolves globals from the allow-list or as inert stand-ins; storages come from ``load_storage``.

    BUILD (set an object's state) is honoured on stand-ins (and as plain attributes on an
    OrderedDict), so no real object's ``__setstate__`` ever runs.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self, file: io.BufferedIOBase, load_storage: Callable[[str, torch.dtype, int], torch.Tensor], source: str
    ):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if any(module == p or module.startswith(p + ".") for p in INERT_PREFIXES) and "__" not in name:
            return standin_type(f"{module}.{name}")
        raise UnsafePickleError(
            f"{self._source}: the pickle asks for {module}.{name}, which the restricted reader refuses "
            "(only tensors, containers and inert model records are read; nothing is imported or run)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise CheckpointError(f"{self._source}: unknown persistent record {pid!r:.80}")
        kind, storage_type, key, _location, numel = pid
        kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
        if kind != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"{self._source}: unsupported storage record {pid!r:.80}")
        return self._load_storage(str(key), storage_type.dtype, numel)

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, StandIn):
            target.__setstate__(state)
        elif type(target) is collections.OrderedDict and isinstance(state, dict) and all(map(_is_name, state)):
            target.__dict__.update(state)  # a state_dict's ``_metadata`` attribute
        elif state:
            raise UnsafePickleError(
                f"{self._source}: the pickle sets state on a {type(target).__name__}, which is refused"
            )

    dispatch[pickle.BUILD[0]] = load_build


def load_torch_zip(path: Union[str, Path]) -> Any:
    """The object in a ``torch.save`` zip file, with model objects as :class:`StandIn` records."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileMissingError(f"{path} is a folder: give the checkpoint file in it")
    if not path.is_file():
        raise ModelFileMissingError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80":
            raise CheckpointError(f"{path.name} is a legacy (torch < 1.6) pickle; only torch zip files are read")
        if path.suffix.lower() == ".safetensors":
            raise CheckpointError(f"{path.name} is a safetensors file, not an official .pt release: it needs no conversion "
                                  "if it is an AdaFace inverter (put it in ComfyUI/models/adaface)")
        raise CheckpointError(f"{path.name} is not a torch zip checkpoint (it may be truncated or corrupt).{git_lfs_hint(path)}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = sorted((n for n in names if n.split("/")[-1] == "data.pkl"), key=lambda n: n.count("/"))
            if not pickles:
                raise CheckpointError(f"{path.name} is a zip file without a data.pkl record: not a torch checkpoint")
            prefix = pickles[0][: -len("data.pkl")]
            order = "little"
            if prefix + "byteorder" in names:
                order = archive.read(prefix + "byteorder").decode().strip()
            if order != "little":
                raise CheckpointError(f"{path.name} was written {order}-endian; only little-endian files are read")
            cache: dict[str, torch.Tensor] = {}

            def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
                if key not in cache:
                    raw = bytearray(archive.read(f"{prefix}data/{key}"))
                    itemsize = torch.empty((), dtype=dtype).element_size()
                    if len(raw) < numel * itemsize:
                        raise CheckpointError(
                            f"{path.name}: storage {key} has {len(raw)} bytes, needs {numel * itemsize}"
                        )
                    data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                    cache[key] = data[: numel * itemsize].view(dtype)
                return cache[key]

            with archive.open(pickles[0]) as stream:
                result = RestrictedUnpickler(io.BufferedReader(stream), load_storage, path.name).load()
            logger.debug("read %s safely: %d tensor storages", path.name, len(cache))
            return result
    except (UnsafePickleError, CheckpointError):
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, RuntimeError, OSError, MemoryError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc
