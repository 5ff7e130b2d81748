"""Unpickling that runs no code: the two pickles a checkpoint holds, read with an allow-list of plain data classes.

A checkpoint folder may come from elsewhere, and a pickle can call any function it names while it is read. Two
pickles in a checkpoint are not the recipe's own `torch.load(weights_only=True)` files: DCP's `.metadata` (where
each tensor's bytes lie), which torch's `FileSystemReader` unpickles without restriction, and TransformerEngine's FP8
delayed-scaling state inside the per-rank files, which TE unpickles without restriction once
NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1. Here each is read by an unpickler that rebuilds only the classes such a
file legitimately holds: data classes and enums of the modules that write them, tensors (whose storage is read
with `torch.load(weights_only=True)`), dtypes, sizes and paths. Any other global is refused, before it is called,
with an error naming the file and the global.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from errors import RecipeError

TE_UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"

# Modules whose data classes and enums a DCP `.metadata` file holds (Metadata, TensorStorageMetadata, ...).
DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
# TransformerEngine's recipes (DelayedScaling, Format, MMParams, ...): what its FP8 state pickles besides tensors.
TE_RECIPE_MODULE = "transformer_engine.common.recipe"
DCP_METADATA = ".metadata"  # what DCP writes with a process group (the recipe always has one)
PATH_CLASSES = frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"})


class UnsafePickleError(RecipeError, pickle.UnpicklingError):
    """A pickle in a checkpoint names something other than plain data: it is not read."""


def _storage_from_bytes(data: bytes) -> Any:
    """What `torch.storage._load_from_bytes` does (a pickled tensor's storage), without running code from `data`."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _plain_class(module: str, name: str) -> Any | None:
    """A data class or enum (rebuilt from its fields, no constructor logic) of `module`, else None."""
    value = getattr(importlib.import_module(module), name, None)
    if not isinstance(value, type):
        return None
    plain = dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)
    return value if plain or (issubclass(value, tuple) and hasattr(value, "_fields")) else None  # or a namedtuple


def _torch_global(module: str, name: str) -> Any | None:
    """The torch values pickles of tensors and their metadata name: dtypes, sizes, layouts, tensors."""
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, torch.dtype) or value is torch.Size else None
    if (module, name) == ("torch.serialization", "_get_layout"):  # a lookup of torch.strided & co. by name
        return torch.serialization._get_layout
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):  # a view of a storage: no code
        return torch._utils._rebuild_tensor_v2
    if (module, name) == ("torch.storage", "_load_from_bytes"):
        return _storage_from_bytes
    return None


def _common_global(module: str, name: str) -> Any | None:
    if module == "pathlib" and name in PATH_CLASSES:
        return getattr(importlib.import_module("pathlib"), name)
    if (module, name) == ("collections", "OrderedDict"):
        return importlib.import_module("collections").OrderedDict
    if module == "builtins" and name in ("set", "frozenset"):
        return {"set": set, "frozenset": frozenset}[name]
    return _torch_global(module, name)


def _dcp_global(module: str, name: str) -> Any | None:
    return _plain_class(module, name) if module in DCP_MODULES else _common_global(module, name)


def _te_global(module: str, name: str) -> Any | None:
    return _plain_class(module, name) if module == TE_RECIPE_MODULE else _common_global(module, name)


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, allowed: Callable[[str, str], Any | None], source: str) -> None:
        super().__init__(file)
        self.allowed, self.source = allowed, source

    def find_class(self, module: str, name: str) -> Any:
        value = self.allowed(module, name)
        if value is None:
            raise UnsafePickleError(
                f"{self.source} names {module}.{name}, which a checkpoint does not hold: it was not read (it may "
                "run code). Use a checkpoint this recipe wrote, and do not resume from folders of unknown origin"
            )
        return value


def load_dcp_metadata(path: Path) -> Any:
    """A DCP checkpoint's `.metadata`, rebuilt from plain data classes only."""
    with open(path, "rb") as handle:
        return _AllowListUnpickler(handle, _dcp_global, str(path)).load()


def te_extra_state(state: torch.Tensor, source: str) -> torch.Tensor:
    """TE's pickled FP8 state of one module, decoded with the allow-list and pickled again from what was rebuilt.

    TE unpickles only the returned bytes, written here from objects this process built, so nothing the file names
    beyond the allow-list is ever called. An empty tensor (a stateless recipe) passes as it is.
    """
    if state.numel() == 0:
        return state
    decoded = _AllowListUnpickler(io.BytesIO(state.numpy().tobytes()), _te_global, source).load()
    return torch.frombuffer(bytearray(pickle.dumps(decoded)), dtype=torch.uint8)


@contextmanager
def te_pickle_allowed() -> Any:
    """Let TE unpickle FP8 state for the duration (it refuses without NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1).

    Only for bytes `te_extra_state` produced: they hold nothing but the allowed classes.
    """
    previous = os.environ.get(TE_UNSAFE_PICKLE_ENV)
    os.environ[TE_UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TE_UNSAFE_PICKLE_ENV]
        else:
            os.environ[TE_UNSAFE_PICKLE_ENV] = previous


def safe_storage_reader(checkpoint_id: str) -> Any:
    """A DCP `FileSystemReader` for `checkpoint_id` whose `.metadata` was read here, with the allow-list.

    The metadata is read at once, so a forged file is refused by the caller before DCP starts loading (DCP would
    report it as one rank's failure inside a traceback dump); tensors are then read as torch reads them.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = load_dcp_metadata(Path(checkpoint_id) / DCP_METADATA)

    class AllowListFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:  # what torch's reader sets after reading
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return AllowListFileSystemReader(checkpoint_id)
