"""Read PyTorch ``pytorch_model*.bin`` checkpoints into numpy without torch.

Why not ``torch.load``?  A ``.bin`` checkpoint is a pickle, and unpickling
runs whatever callables the file names, so loading an untrusted checkpoint
with plain ``pickle`` (or old ``torch.load``) is arbitrary code execution.
This module parses the zip-based format torch writes by default since 1.6,
and the legacy format before it (see :class:`_LegacyFile`), with a restricted
unpickler that only resolves a short allow-list of globals to inert
stand-ins defined here; nothing from torch or any other module is ever
imported or called.  Tensor bytes are not read while unpickling: each
tensor becomes a :class:`LazyTensor` that reads exactly its own byte range
when ``load()`` is called, so peak memory stays near the largest tensor.

Layout of a zip archive (``<archive>`` is an arbitrary folder name)::

    <archive>/data.pkl          pickled state dict; storages are persistent ids
    <archive>/data/<key>        raw storage bytes (stored, not compressed)
    <archive>/byteorder         "little" / "big" (absent in old files: little)
    <archive>/version, .format_version, .storage_alignment, ...

What torch 2.x pickles for a state dict (protocol 2): the globals
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` (plus
``_rebuild_parameter`` for ``nn.Parameter`` values), legacy storage type names
such as ``torch.FloatStorage`` / ``torch.BFloat16Storage`` inside the
persistent id ``('storage', storage_type, key, location, numel)``, and for
dtypes without a legacy storage class (float8, uint16, ...)
``torch._utils._rebuild_tensor_v3`` with ``torch.storage.UntypedStorage``
and a dtype global such as ``torch.float8_e4m3fn``.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import threading
import zipfile
from typing import Any, Iterator

import ml_dtypes
import numpy as np

__all__ = [
    "TorchCheckpointError",
    "UnsafePickleError",
    "LazyTensor",
    "TorchCheckpoint",
    "open_torch_checkpoint",
]


class TorchCheckpointError(ValueError):
    """A file could not be read as a PyTorch state dict."""


class UnsafePickleError(TorchCheckpointError):
    """The pickle names a global outside the allow-list (possible code execution)."""


# --------------------------------------------------------------------------
# Inert stand-ins the restricted unpickler hands out instead of real globals.
# All are __slots__ objects whose __setstate__ refuses, so a hostile BUILD
# opcode cannot mutate them (or, through them, this module).
# --------------------------------------------------------------------------


class _Inert:
    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TorchCheckpointError(
            f"pickle tried to set state on {type(self).__name__} (not a state dict)"
        )


class _StorageType(_Inert):
    """Marker for ``torch.FloatStorage`` etc.; only used inside persistent ids."""

    __slots__ = ("name", "dtype", "untyped")

    def __init__(self, name: str, dtype: np.dtype, untyped: bool = False):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "untyped", untyped)

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _TorchDtype(_Inert):
    """Marker for ``torch.float32``-style dtype globals."""

    __slots__ = ("name", "np_dtype")

    def __init__(self, name: str, np_dtype: np.dtype | None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "np_dtype", np_dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _SafeCallable(_Inert):
    """Wraps one of our own functions so REDUCE can call it, and nothing else."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn: Any):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<safe stand-in for {self.qualname}>"


class _PickledDict(collections.OrderedDict):
    """Stand-in for ``collections.OrderedDict``.

    ``nn.Module.state_dict()`` pickles a ``_metadata`` attribute via BUILD; it
    is kept here as plain data and otherwise ignored.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise TorchCheckpointError("unexpected OrderedDict state in pickle")
        self.pickle_state = state


def _np(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name))


_BF16 = _np("bfloat16")

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": _BF16,
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": _np("float8_e4m3fn"),
    "float8_e5m2": _np("float8_e5m2"),
    "float8_e4m3fnuz": _np("float8_e4m3fnuz"),
    "float8_e5m2fnuz": _np("float8_e5m2fnuz"),
}


class _StorageRef(_Inert):
    """One ``data/<key>`` member as named by a persistent id."""

    __slots__ = ("archive", "key", "dtype", "numel", "untyped")

    def __init__(self, archive: "_Source", key: str, dtype: np.dtype, numel: int, untyped: bool):
        for k, v in (("archive", archive), ("key", key), ("dtype", dtype), ("numel", numel), ("untyped", untyped)):
            object.__setattr__(self, k, v)

    @property
    def nbytes(self) -> int:
        # Untyped storages count bytes; typed ones count elements.
        return self.numel if self.untyped else self.numel * self.dtype.itemsize


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        type(v) is int and v >= 0 for v in value
    ):
        raise TorchCheckpointError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _make_lazy(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None,
               metadata: Any) -> "LazyTensor":
    if not isinstance(storage, _StorageRef):
        raise TorchCheckpointError(f"tensor storage is not a storage reference: {storage!r}")
    if type(offset) is not int or offset < 0:
        raise TorchCheckpointError(f"bad tensor storage offset {offset!r}")
    size = _check_int_tuple(size, "size")
    stride = _check_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise TorchCheckpointError(f"tensor size {size} and stride {stride} differ in rank")
    if metadata and any(bool(v) for v in dict(metadata).values()):
        # conj / neg bits would need post-processing we do not implement.
        raise TorchCheckpointError(f"tensors with metadata {metadata!r} are not supported")
    if dtype is None:
        dtype = storage.dtype
    return LazyTensor(storage, offset, size, stride, dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_lazy(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _make_lazy(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchDtype) or dtype.np_dtype is None:
        raise TorchCheckpointError(f"unsupported tensor dtype {dtype!r}")
    return _make_lazy(storage, storage_offset, size, stride, dtype.np_dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, LazyTensor):
        raise TorchCheckpointError(f"nn.Parameter data is not a tensor: {type(data).__name__}")
    return data


def _torch_size(dims=()):
    return _check_int_tuple(tuple(dims), "size")


def _torch_device(*args):
    return _TorchDevice(*args)


class _TorchDevice(str):
    """Stand-in for ``torch.device``: just the device string."""

    __slots__ = ()

    def __new__(cls, kind: Any, index: Any = None):
        if not isinstance(kind, str) or (index is not None and type(index) is not int):
            raise TorchCheckpointError(f"bad torch.device arguments {kind!r}, {index!r}")
        return str.__new__(cls, kind if index is None else f"{kind}:{index}")

    def __setstate__(self, state: Any) -> None:
        raise TorchCheckpointError("pickle tried to set state on torch.device")


def _build_allowlist() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _SafeCallable("collections.OrderedDict", _PickledDict),
        ("torch", "Size"): _SafeCallable("torch.Size", _torch_size),
        ("torch", "device"): _SafeCallable("torch.device", _torch_device),
    }
    for mod in ("torch._utils", "torch._tensor", "torch.tensor"):
        for name, fn in (
            ("_rebuild_tensor", _rebuild_tensor),
            ("_rebuild_tensor_v2", _rebuild_tensor_v2),
            ("_rebuild_tensor_v3", _rebuild_tensor_v3),
            ("_rebuild_parameter", _rebuild_parameter),
            ("_rebuild_parameter_with_state", _rebuild_parameter),
        ):
            if mod == "torch._utils" or name.startswith("_rebuild_tensor"):
                allowed[(mod, name)] = _SafeCallable(f"{mod}.{name}", fn)
    for name, dt in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dt)
    for mod in ("torch", "torch.storage"):
        allowed[(mod, "UntypedStorage")] = _StorageType("UntypedStorage", np.dtype(np.uint8), untyped=True)
    for name, dt in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dt)
    return allowed


_ALLOWED = _build_allowlist()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals, to our own stand-ins."""

    def __init__(self, file: Any, archive: "_Source"):
        super().__init__(file)
        self._archive = archive
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._archive.path}: refusing to load global '{module}.{name}' "
                "(only tensor data is allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) != self._archive.pid_length:
            raise TorchCheckpointError(f"unexpected persistent id {pid!r}")
        typename, storage_type, key, _location, numel, *view = pid
        if view and view[0] is not None:  # legacy view_metadata: storage views, not written since torch 1.x
            raise TorchCheckpointError(f"storage views are not supported (persistent id {pid!r})")
        if isinstance(typename, bytes):
            typename = typename.decode("ascii")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if typename != "storage" or not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"unexpected persistent id {pid!r}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise TorchCheckpointError(f"unexpected persistent id {pid!r}")
        ref = self.storages.get(key)
        if ref is None:
            ref = _StorageRef(self._archive, key, storage_type.dtype, numel, storage_type.untyped)
            self._archive.check_storage(ref)
            self.storages[key] = ref
        elif ref.dtype != storage_type.dtype or ref.numel != numel:
            raise TorchCheckpointError(f"storage {key!r} is referenced with inconsistent types/sizes")
        return ref


# --------------------------------------------------------------------------
# Archive access
# --------------------------------------------------------------------------

# The first pickle of a legacy torch.save file, and the version pickled after it.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def _open_source(path: str | os.PathLike) -> "_Source":
    """The zip archive or legacy file at ``path``, told apart by their first bytes as torch.load does."""
    path = os.fspath(path)
    fh = open(path, "rb")
    try:
        head = fh.read(4)
        fh.seek(0)
        if head.startswith(b"PK"):
            return _Archive(path, fh)
        if head.startswith(b"\x80"):  # a pickle PROTO opcode: the legacy format
            return _LegacyFile(path, fh)
        raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                                   "legacy torch.save file; empty, truncated or corrupt?)")
    except BaseException:
        fh.close()
        raise


class _Source:
    """An open checkpoint file shared by all its LazyTensors: one handle, one lock, positioned reads.

    Subclasses say where each storage's bytes are (``check_storage``, ``read_member_range``) and
    unpickle the state dict (``load_object``)."""

    byteorder = "little"
    pid_length = 5  # fields of a storage's persistent id
    pickle_name = "data.pkl"

    def __init__(self, path: str, fh: io.BufferedReader):
        self.path = path
        self._lock = threading.Lock()
        self._fh: io.BufferedReader | None = fh
        self._stat = os.fstat(fh.fileno())

    @property
    def closed(self) -> bool:
        return self._fh is None

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __del__(self) -> None:
        # LazyTensors keep the file alive; close the handle with the last one.
        if getattr(self, "_fh", None) is not None:
            self.close()

    def _readinto_at(self, offset: int, out: memoryview) -> None:
        self._fh.seek(offset)
        _read_exact(self._fh, out, self.path, "file")

    def _check_open(self) -> None:
        if self._fh is None:
            raise TorchCheckpointError(f"{self.path}: checkpoint is closed")


class _Archive(_Source):
    """A zip archive (torch >= 1.6): storages are members, read in place when stored uncompressed."""

    def __init__(self, path: str, fh: io.BufferedReader):
        super().__init__(path, fh)
        self._data_start: dict[str, int] = {}
        try:
            self._zip = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, EOFError, OSError, struct.error, ValueError) as e:
            raise TorchCheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from None
        self.prefix = self._find_prefix()
        self.byteorder = self._read_byteorder()
        self.infos = {i.filename: i for i in self._zip.infolist()}

    def _find_prefix(self) -> str:
        names = self._zip.namelist()
        candidates = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not candidates:
            raise TorchCheckpointError(
                f"{self.path}: zip archive has no '<archive>/data.pkl' member; not a torch.save checkpoint"
            )
        if len(candidates) > 1:
            raise TorchCheckpointError(f"{self.path}: several data.pkl members ({candidates}); ambiguous archive")
        prefix = candidates[0]
        if f"{prefix}/constants.pkl" in names:
            raise TorchCheckpointError(
                f"{self.path}: this is a TorchScript archive (torch.jit.save), not a state dict checkpoint"
            )
        return prefix

    def _read_byteorder(self) -> str:
        name = f"{self.prefix}/byteorder"
        if name not in self._zip.namelist():
            return "little"  # torch's own default for files without the record
        try:
            order = self._zip.read(name).decode("ascii", "replace").strip()
        except (zipfile.BadZipFile, EOFError, OSError, struct.error) as e:
            raise TorchCheckpointError(f"{self.path}: cannot read the byteorder record ({e})") from None
        if order not in ("little", "big"):
            raise TorchCheckpointError(f"{self.path}: unknown byteorder record {order!r}")
        return order

    def load_object(self) -> Any:
        try:
            data = self._zip.read(f"{self.prefix}/data.pkl")
        except (zipfile.BadZipFile, EOFError, OSError, struct.error) as e:
            raise TorchCheckpointError(f"{self.path}: cannot read data.pkl ({e})") from None
        return _RestrictedUnpickler(io.BytesIO(data), self).load()

    def check_storage(self, ref: _StorageRef) -> None:
        info = self.infos.get(self.member(ref.key))
        if info is None:
            raise TorchCheckpointError(f"{self.path}: storage member {self.member(ref.key)!r} is missing")
        if info.file_size < ref.nbytes:
            raise TorchCheckpointError(
                f"{self.path}: storage {self.member(ref.key)!r} has {info.file_size} bytes, "
                f"expected {ref.nbytes}"
            )

    def member(self, key: str) -> str:
        return f"{self.prefix}/data/{key}"

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_zip", None) is not None:
                self._zip.close()
                self._zip = None
        super().close()

    def read_member_range(self, key: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, start+len(out))`` of storage ``key``."""
        name = self.member(key)
        info = self.infos[name]
        if start + len(out) > info.file_size:
            raise TorchCheckpointError(f"{self.path}: read past the end of {name!r}")
        with self._lock:
            self._check_open()
            if info.compress_type == zipfile.ZIP_STORED:
                self._readinto_at(self._stored_data_start(info) + start, out)
            else:  # not written by torch, but cheap to tolerate
                with self._zip.open(info) as f:
                    f.seek(start)
                    _read_exact(f, out, self.path, name)

    def _stored_data_start(self, info: zipfile.ZipInfo) -> int:
        start = self._data_start.get(info.filename)
        if start is None:
            header = bytearray(_LOCAL_HEADER.size)
            self._readinto_at(info.header_offset, memoryview(header))
            fields = _LOCAL_HEADER.unpack(bytes(header))
            if fields[0] != b"PK\x03\x04":
                raise TorchCheckpointError(f"{self.path}: bad local header for {info.filename!r}")
            name_len, extra_len = fields[-2], fields[-1]
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if start + info.file_size > self._stat.st_size:
                raise TorchCheckpointError(f"{self.path}: {info.filename!r} extends past end of file (truncated?)")
            self._data_start[info.filename] = start
        return start


class _LegacyFile(_Source):
    """A legacy file (``torch.save(..., _use_new_zipfile_serialization=False)``): pickles of the magic
    number, the protocol version and a sys_info dict; the state dict pickle, whose persistent ids are
    ``('storage', storage_type, key, location, numel, view_metadata)``; a pickled list of storage keys;
    then per key, in that order, an 8-byte little-endian element count and the raw little-endian bytes.

    The storages are laid out back to back, so their offsets follow from the counts: opening reads
    the pickles and one 8-byte count per storage, and a tensor's ``load()`` reads only its own bytes,
    exactly as for a zip archive. Every pickle goes through the same restricted unpickler.
    """

    pid_length = 6
    pickle_name = "the pickled state dict"

    def __init__(self, path: str, fh: io.BufferedReader):
        super().__init__(path, fh)
        self._start: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}

    def _unpickle(self, what: str, expected: Any = None) -> Any:
        value = _RestrictedUnpickler(self._fh, self).load()
        if expected is not None and value != expected:
            raise TorchCheckpointError(f"{self.path}: not a torch.save file ({what} is {value!r}, "
                                       f"expected {expected!r})")
        return value

    def load_object(self) -> Any:
        self._unpickle("the magic number", _LEGACY_MAGIC_NUMBER)
        self._unpickle("the legacy protocol version", _LEGACY_PROTOCOL_VERSION)
        if not isinstance(self._unpickle("sys_info"), dict):
            raise TorchCheckpointError(f"{self.path}: legacy torch.save file without its sys_info dict")
        unpickler = _RestrictedUnpickler(self._fh, self)
        obj = unpickler.load()
        keys = self._unpickle("the storage key list")
        self._locate(keys, unpickler.storages, self._fh.tell())
        return obj

    def _locate(self, keys: Any, storages: dict[str, _StorageRef], offset: int) -> None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchCheckpointError(f"{self.path}: the storage key list is not a list of strings")
        missing = sorted(set(storages) - set(keys))
        if missing:
            raise TorchCheckpointError(f"{self.path}: storage {missing[0]!r} is referenced but not stored")
        count = bytearray(8)
        for key in keys:
            ref = storages.get(key)
            if ref is None:
                raise TorchCheckpointError(f"{self.path}: stored storage {key!r} is not referenced by any tensor")
            if offset + 8 + ref.nbytes > self._stat.st_size:
                raise TorchCheckpointError(f"{self.path}: storage {key!r} extends past the end of the file "
                                           "(truncated?)")
            self._readinto_at(offset, memoryview(count))
            (numel,) = struct.unpack("<q", count)
            if numel != ref.numel:
                raise TorchCheckpointError(f"{self.path}: storage {key!r} holds {numel} elements, "
                                           f"its tensors expect {ref.numel}")
            self._start[key], self._nbytes[key] = offset + 8, ref.nbytes
            offset += 8 + ref.nbytes

    def check_storage(self, ref: _StorageRef) -> None:
        pass  # the storages' offsets are known only after the key list that follows the state dict

    def read_member_range(self, key: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, start+len(out))`` of storage ``key``."""
        if start + len(out) > self._nbytes[key]:
            raise TorchCheckpointError(f"{self.path}: read past the end of storage {key!r}")
        with self._lock:
            self._check_open()
            self._readinto_at(self._start[key] + start, out)


def _read_exact(f: Any, out: memoryview, path: str, what: str) -> None:
    view = out.cast("B") if out.format != "B" else out
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise TorchCheckpointError(f"{path}: unexpected end of {what} (truncated?)")
        got += n


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


class LazyTensor(_Inert):
    """A tensor in a checkpoint whose bytes are read only by :meth:`load`."""

    __slots__ = ("_storage", "storage_offset", "shape", "stride", "dtype")

    def __init__(self, storage: _StorageRef, storage_offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 dtype: np.dtype):
        object.__setattr__(self, "_storage", storage)
        object.__setattr__(self, "storage_offset", storage_offset)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "stride", tuple(stride))
        object.__setattr__(self, "dtype", np.dtype(dtype))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def storage_key(self) -> str:
        return self._storage.key

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, storage={self._storage.key!r})"

    def load(self) -> np.ndarray:
        """Read this tensor's bytes (only them) and return a C-contiguous array."""
        itemsize = self.dtype.itemsize
        if self.numel == 0:
            return np.zeros(self.shape, self.dtype)
        # Elements spanned by this view, counted from storage_offset.
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        start = self.storage_offset * itemsize
        if start + span * itemsize > self._storage.nbytes:
            raise TorchCheckpointError(
                f"{self._storage.archive.path}: tensor in storage {self._storage.key!r} "
                "extends past the end of its storage"
            )
        flat = np.empty(span, self.dtype)
        self._storage.archive.read_member_range(self._storage.key, start, memoryview(flat.view(np.uint8)))
        if self._storage.archive.byteorder != sys.byteorder and itemsize > 1:
            unit = itemsize // 2 if self.dtype.kind == "c" else itemsize
            flat.view(f"u{unit}").byteswap(inplace=True)
        contiguous_strides = []
        acc = 1
        for n in reversed(self.shape):
            contiguous_strides.append(acc)
            acc *= n
        if span == self.numel and all(
            n == 1 or s == c for n, s, c in zip(self.shape, self.stride, reversed(contiguous_strides))
        ):
            return flat.reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=[s * itemsize for s in self.stride], writeable=False
        )
        return np.ascontiguousarray(view)


class TorchCheckpoint:
    """An open ``torch.save`` zip checkpoint; ``.tensors`` maps names to LazyTensors.

    The file stays open until :meth:`close` (or the ``with`` block ends) so
    that each ``LazyTensor.load()`` only seeks and reads its own bytes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._archive = _open_source(self.path)
        try:
            self.tensors: dict[str, LazyTensor] = self._parse()
        except BaseException:
            self._archive.close()
            raise

    def _parse(self) -> dict[str, LazyTensor]:
        try:
            obj = self._archive.load_object()
        except TorchCheckpointError as e:
            if str(e).startswith(self.path):
                raise
            raise type(e)(f"{self.path}: {e}") from None
        except Exception as e:  # malformed pickle, wrong stand-in arguments, ...
            raise TorchCheckpointError(
                f"{self.path}: cannot unpickle {self._archive.pickle_name} ({type(e).__name__}: {e})") from None
        return _as_state_dict(obj, self.path)

    def __getitem__(self, name: str) -> LazyTensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        self._archive.close()

    @property
    def closed(self) -> bool:
        return self._archive.closed

    def __enter__(self) -> "TorchCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



def _as_state_dict(obj: Any, path: str) -> dict[str, LazyTensor]:
    if not isinstance(obj, dict):
        raise TorchCheckpointError(f"{path}: top-level object is a {type(obj).__name__}, not a state dict")
    if len(obj) == 1:
        (key, value), = obj.items()
        if key in ("state_dict", "model") and isinstance(value, dict):
            obj = value
    out: dict[str, LazyTensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TorchCheckpointError(f"{path}: state dict key {key!r} is not a string")
        if isinstance(value, dict):
            raise TorchCheckpointError(
                f"{path}: state dict entry {key!r} is a nested dict; only flat state dicts "
                "(optionally wrapped as the single key 'state_dict' or 'model') are supported"
            )
        if not isinstance(value, LazyTensor):
            raise TorchCheckpointError(
                f"{path}: state dict entry {key!r} is not a tensor (got {_describe(value)})"
            )
        out[key] = value
    return out


def _describe(value: Any) -> str:
    if isinstance(value, (_Inert, _TorchDevice)):
        return repr(value)
    return type(value).__name__


def open_torch_checkpoint(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Parse a checkpoint and return its tensors, in file order.

    The file stays open for as long as any returned LazyTensor is alive; use
    :class:`TorchCheckpoint` as a context manager to control that explicitly.
    """
    return TorchCheckpoint(path).tensors
