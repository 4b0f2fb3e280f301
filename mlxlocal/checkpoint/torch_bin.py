"""Read PyTorch ``pytorch_model*.bin`` checkpoints without torch and without running the file.

A ``.bin`` checkpoint is a pickle, and a pickle can call any Python function while it loads, so
``torch.load`` on a downloaded file is arbitrary code execution. This reader only understands the
handful of globals that ``torch.save`` uses to describe a dict of tensors; any other global is
refused before it is imported, so nothing from the file ever runs. Tensor bytes are read straight
from the zip entries and rebuilt with numpy, then handed over as ``mx.array``.

Memory is budgeted before it is spent: only stored (uncompressed) zip entries are read, so no
entry can inflate past the file, and all tensors of one file together may take at most
``MAX_EXPANSION`` times the file's size (views of one storage and stride-0 expansions are
materialised, so without a budget a few KB could ask for gigabytes).

Only the zip layout that ``torch.save`` has written since torch 1.6 is supported::

    <archive>/data.pkl        the pickled state dict, tensors as persistent ids
    <archive>/data/<key>      raw storage bytes, one entry per storage
    <archive>/byteorder       "little" or "big" (missing means little)
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from mlxlocal.errors import MlxLocalError

__all__ = ["MAX_EXPANSION", "load_torch_bin", "read_torch_bin_header"]

# What the legacy (pre-1.6, non-zip) torch.save format starts with: pickle protocol 2 + LONG1
# holding torch.serialization.MAGIC_NUMBER.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_SAFE_FIX = "use the model's safetensors weights instead"

# Bytes all tensors of one file may materialise, as a multiple of the file's size. A state dict
# is its storages plus views of them: tied weights (embed_tokens + lm_head) reference one storage
# twice, and T5 shares one embedding four ways (shared, encoder and decoder embed_tokens,
# lm_head); even where that embedding is most of the model, that stays under 4x the file.
MAX_EXPANSION = 4
# ... and at least this much, so tiny files (zip headers, small expanded buffers) always load.
_MIN_BUDGET = 64 << 20


def _q(value: object, limit: int = 60) -> str:
    """Short repr of something taken from the file, safe to put in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _err(path: Path, what: str) -> MlxLocalError:
    """The one error type, as a single printable line whatever the file put in it."""
    text = f"{path}: {what}"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return MlxLocalError(text)


class _StorageType(NamedTuple):
    """Stand-in for ``torch.<X>Storage``: an immutable tag, so the pickle cannot mutate it."""

    name: str
    np_dtype: str  # little-endian numpy dtype of the raw bytes
    mx_dtype: mx.Dtype


class _Marker(NamedTuple):
    """Stand-in for an inert torch class reference (``torch.Tensor``, ``Parameter``)."""

    name: str


# torch.<Name>Storage -> how its bytes are laid out. bfloat16 has no numpy dtype, so it is read as
# uint16 and reinterpreted in MLX; bool is read as uint8 and compared with 0.
_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, np_dtype, mx_dtype)
    for name, np_dtype, mx_dtype in [
        ("FloatStorage", "<f4", mx.float32),
        ("HalfStorage", "<f2", mx.float16),
        ("BFloat16Storage", "<u2", mx.bfloat16),
        ("DoubleStorage", "<f8", mx.float64),
        ("LongStorage", "<i8", mx.int64),
        ("IntStorage", "<i4", mx.int32),
        ("ShortStorage", "<i2", mx.int16),
        ("CharStorage", "i1", mx.int8),
        ("ByteStorage", "u1", mx.uint8),
        ("BoolStorage", "u1", mx.bool_),
    ]
}

_TENSOR_TYPES = {
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("torch.nn", "Parameter"): _Marker("torch.nn.Parameter"),
}


@dataclass
class _Storage:
    """One storage from ``data/<key>``: its element count and, when data is read, a flat
    little-endian-decoded numpy array."""

    key: str
    stype: _StorageType
    numel: int
    flat: np.ndarray | None


@dataclass
class _Tensor:
    """A rebuilt tensor: shape, the MLX dtype it stands for and (when read) contiguous data."""

    shape: tuple[int, ...]
    mx_dtype: mx.Dtype
    data: np.ndarray | None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor state dict needs; refuses the rest.

    The callables it hands out are bound to this instance (fresh per file), and the class
    stand-ins are immutable tuples, so a hostile pickle cannot leave state behind for the next
    load. With `read_data` false it reads no tensor bytes: shapes and dtypes only.
    """

    def __init__(
        self,
        data: bytes,
        zf: zipfile.ZipFile,
        prefix: str,
        path: Path,
        big: bool,
        read_data: bool,
    ):
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._big = big
        self._read_data = read_data
        self._size = path.stat().st_size
        self._budget = max(MAX_EXPANSION * self._size, _MIN_BUDGET)
        self._materialised = 0
        self._stored = 0  # storage bytes referenced so far
        self._storages: dict[str, _Storage] = {}
        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            **_TENSOR_TYPES,
            **{("torch", name): stype for name, stype in _STORAGE_TYPES.items()},
        }

    def _fail(self, what: str) -> MlxLocalError:
        return _err(self._path, what)

    def find_class(self, module: str, name: str) -> Any:
        """Return a stand-in for the few allowed globals; never import anything."""
        found = self._globals.get((module, name))
        if found is not None:
            return found
        qual = f"{module}.{name}"  # file-controlled: keep it short (_err escapes the rest)
        if len(qual) > 100:
            qual = qual[:97] + "..."
        if module == "torch" and name.endswith("Storage"):
            raise self._fail(
                f"holds a tensor stored as {qual}, a dtype mlxlocal does not load; convert the "
                "tensor to float32/float16/bfloat16 in torch and re-save, or use safetensors"
            )
        if module == "torch" or module.startswith("torch."):
            raise self._fail(
                f"refusing to load: the pickle asks for {qual}, which is not a plain tensor "
                "(a whole pickled model or another torch object?); re-save it with "
                "torch.save(model.state_dict(), path) or convert it to safetensors"
            )
        raise self._fail(
            f"refusing to load: the pickle asks for {qual}, which is not a tensor; this file "
            f"may be malicious — {_SAFE_FIX}"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        """Resolve ``('storage', storage_type, key, location, numel)`` to the entry's bytes."""
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not _is_int(pid[4])
            or pid[4] < 0
        ):
            raise self._fail(
                f"data.pkl has a malformed storage reference {_q(pid, 80)}; the file is corrupt "
                f"or was not written by torch.save — {_SAFE_FIX}"
            )
        _, stype, key, _location, numel = pid
        cached = self._storages.get(key)
        if cached is not None:
            if cached.stype != stype or cached.numel < numel:
                raise self._fail(
                    f"storage {_q(key)} is referenced with two different layouts; the file is "
                    f"corrupt — {_SAFE_FIX}"
                )
            return cached
        dtype = np.dtype(stype.np_dtype)
        if self._big:
            dtype = dtype.newbyteorder(">")
        nbytes = numel * dtype.itemsize
        entry = f"{self._prefix}/data/{key}"
        try:
            info = self._zf.getinfo(entry)
        except KeyError:
            raise self._fail(
                f"storage entry {_q(entry)} is missing from the archive; the file is truncated "
                "or corrupt — re-download it"
            ) from None
        if info.file_size < nbytes:
            raise self._fail(
                f"storage entry {_q(entry)} has {info.file_size} bytes but {nbytes} are needed; "
                "the file is truncated or corrupt — re-download it"
            )
        self._stored += nbytes
        if self._stored > self._size:
            # Zip entries whose data overlap could make each read cover the whole file again.
            raise self._fail(
                f"its storages add up to more than the file's {self._size} bytes (overlapping "
                f"zip entries); the file is corrupt or malicious — {_SAFE_FIX}"
            )
        storage = _Storage(key, stype, numel, self._read(info, nbytes, dtype, numel))
        self._storages[key] = storage
        return storage

    def _read(
        self, info: zipfile.ZipInfo, nbytes: int, dtype: np.dtype, numel: int
    ) -> np.ndarray | None:
        """The storage's elements, little-endian; None when only metadata is wanted."""
        if not self._read_data:
            return None
        if info.file_size == nbytes:
            raw = self._zf.read(info)
        else:  # larger than needed: read only what the storage covers
            with self._zf.open(info) as f:
                raw = f.read(nbytes)
        if len(raw) < nbytes:
            raise self._fail(f"storage entry {_q(info.filename)} is truncated — re-download it")
        flat = np.frombuffer(raw, dtype=dtype, count=numel)
        return flat.astype(dtype.newbyteorder("<")) if self._big else flat

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _Tensor:
        """Materialise a (possibly strided, possibly shared) view of a storage, bounds-checked."""
        del requires_grad, backward_hooks, metadata  # autograd bookkeeping, irrelevant here
        if not isinstance(storage, _Storage):
            raise self._fail(f"data.pkl rebuilds a tensor from a non-storage; {_SAFE_FIX}")
        size = tuple(size) if isinstance(size, (tuple, list)) else size
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else stride
        if (
            not _is_int(storage_offset)
            or storage_offset < 0
            or not isinstance(size, tuple)
            or not isinstance(stride, tuple)
            or len(size) != len(stride)
            or not all(_is_int(v) and v >= 0 for v in size + stride)
        ):
            raise self._fail(
                f"data.pkl describes a tensor with invalid offset/size/stride "
                f"({_q(storage_offset, 20)}, {_q(size, 40)}, {_q(stride, 40)}); the file is corrupt"
            )
        if 0 not in size:
            # as_strided does not bounds-check: refuse any view that reaches past the storage.
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= storage.numel:
                raise self._fail(
                    f"a tensor in data.pkl reaches element {last} of storage {_q(storage.key)}, "
                    f"which has {storage.numel}; the file is corrupt or malicious — {_SAFE_FIX}"
                )
        if not self._read_data:
            return _Tensor(size, storage.stype.mx_dtype, None)
        flat = storage.flat
        self._materialised += math.prod(size) * flat.itemsize
        if self._materialised > self._budget:
            # Shared storages and stride-0 views could otherwise make a tiny file allocate
            # without bound: checked before the copy is made.
            raise self._fail(
                f"its tensors expand to more than {self._budget} bytes, over {MAX_EXPANSION}x "
                f"the file's size; the file is corrupt or malicious — {_SAFE_FIX}"
            )
        if 0 in size:
            data = np.zeros(size, dtype=flat.dtype)
        else:
            item = flat.itemsize
            view = np.lib.stride_tricks.as_strided(
                flat[storage_offset:],
                shape=size,
                strides=tuple(s * item for s in stride),
                writeable=False,
            )
            data = view.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        if storage.stype.mx_dtype == mx.bool_:
            data = data != 0
        return _Tensor(size, storage.stype.mx_dtype, data)

    def _rebuild_parameter(
        self, data: Any, requires_grad: Any = False, backward_hooks: Any = None
    ) -> _Tensor:
        """``nn.Parameter`` is just its data here."""
        if not isinstance(data, _Tensor):
            raise self._fail(f"data.pkl wraps a non-tensor in a Parameter; {_SAFE_FIX}")
        return data

    def _rebuild_parameter_with_state(
        self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any
    ) -> _Tensor:
        """A Parameter carrying Python attributes: the attributes are dropped."""
        return self._rebuild_parameter(data)

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> _Tensor:
        """A plain Tensor/Parameter with Python attributes; other subclasses are refused."""
        allowed = (
            self._globals[("torch._utils", "_rebuild_tensor_v2")],
            self._globals[("torch._utils", "_rebuild_parameter")],
        )
        if (
            not any(func is f for f in allowed)
            or not isinstance(new_type, _Marker)
            or not isinstance(args, tuple)
        ):
            raise self._fail(
                f"data.pkl rebuilds a tensor subclass mlxlocal does not support; re-save a plain "
                f"state dict or {_SAFE_FIX}"
            )
        return func(*args)


def _find_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The archive folder that holds data.pkl (torch names it after the saved file)."""
    names = zf.namelist()
    candidates = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl")]
    candidates = [c for c in candidates if c and "/" not in c]
    if not candidates:
        raise _err(
            path,
            "zip archive has no <archive>/data.pkl, so it is not a PyTorch checkpoint "
            "(or it is corrupt); re-download it or use the safetensors weights",
        )
    if len(candidates) > 1:
        first = names[0].split("/", 1)[0]
        if first in candidates:
            return first
    return candidates[0]


def _read_byteorder(zf: zipfile.ZipFile, prefix: str, path: Path) -> bool:
    """True when the storages are big-endian; missing entry means little (older torch)."""
    try:
        raw = zf.read(f"{prefix}/byteorder")
    except KeyError:
        return False
    order = raw.strip().decode("ascii", errors="replace")
    if order not in ("little", "big"):
        raise _err(
            path,
            f"byteorder entry says {_q(order, 20)}, expected 'little' or 'big'; the file "
            "is corrupt — re-download it",
        )
    return order == "big"


def _not_zip_error(path: Path, head: bytes) -> MlxLocalError:
    if head.startswith(_LEGACY_MAGIC):
        return _err(
            path,
            "this is the legacy pre-1.6 torch.save format, which mlxlocal does not "
            "read; re-save it with a recent torch (torch.save(torch.load(old, "
            "weights_only=True), new)) or use the safetensors weights",
        )
    if head.startswith(b"PK"):
        return _err(
            path,
            "the zip archive is truncated or corrupt (no readable central directory); "
            "re-download the file",
        )
    if head[:1] == b"\x80":
        return _err(
            path,
            "this is a bare pickle, not a torch.save zip checkpoint (perhaps the "
            "pre-1.6 format); re-save it with a recent torch or use safetensors",
        )
    return _err(
        path,
        "not a PyTorch checkpoint (not a zip archive); re-download it or use the "
        "safetensors weights",
    )


def _to_mx(t: _Tensor) -> mx.array:
    if t.mx_dtype == mx.bfloat16:
        return mx.array(t.data.astype(np.uint16, copy=False)).view(mx.bfloat16)
    # Explicit dtype: mx.array would silently turn float64 numpy arrays into float32.
    return mx.array(t.data, dtype=t.mx_dtype)


def _check_state_dict(obj: Any, path: Path) -> dict[str, _Tensor]:
    if not isinstance(obj, dict):
        raise _err(
            path,
            f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors; "
            "re-save it with torch.save(model.state_dict(), path)",
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _err(
                path,
                f"the state dict has a non-string key {_q(key, 40)}; re-save it with "
                "torch.save(model.state_dict(), path)",
            )
        if not isinstance(value, _Tensor):
            kind = "dict" if isinstance(value, dict) else type(value).__name__
            raise _err(
                path,
                f"entry {_q(key)} holds a {kind}, not a tensor (a nested or training "
                f"checkpoint?); save just the state dict with torch.save(model.state_dict(), "
                "path)",
            )
    return obj


def load_torch_bin(path: Path) -> dict[str, mx.array]:
    """Load a torch.save zip checkpoint of a state dict as MLX arrays, executing nothing.

    Raises ``MlxLocalError`` (one line: file, problem, fix) for anything that is not a plain,
    intact state dict of supported tensors, including files whose pickle asks for any global
    outside the tensor-rebuilding allow-list, or whose tensors would take more than
    ``MAX_EXPANSION`` times the file's size.
    """
    tensors = _unpickle(Path(path), read_data=True)
    return {name: _to_mx(tensors.pop(name)) for name in list(tensors)}  # numpy freed as we go


def read_torch_bin_header(path: Path) -> dict[str, tuple[mx.Dtype, tuple[int, ...]]]:
    """name → (dtype, shape) of every tensor in a torch.save checkpoint, reading no tensor
    bytes: the pickle is checked as strictly as by `load_torch_bin`."""
    return {name: (t.mx_dtype, t.shape) for name, t in _unpickle(Path(path), False).items()}


def _check_entries(zf: zipfile.ZipFile, path: Path) -> None:
    """Only stored entries that lie inside the file: nothing is inflated or over-read."""
    size = path.stat().st_size
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise _err(
                path,
                f"zip entry {_q(info.filename)} is compressed, which torch.save never does; "
                f"refusing to inflate it (it could be a zip bomb) — {_SAFE_FIX}",
            )
        if info.compress_size != info.file_size or info.header_offset + info.file_size > size:
            raise _err(
                path,
                f"zip entry {_q(info.filename)} claims {info.file_size} bytes, more than the "
                "file holds; the file is truncated or corrupt — re-download it",
            )


def _unpickle(path: Path, read_data: bool) -> dict[str, _Tensor]:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as e:
        raise _err(path, f"cannot read the checkpoint: {e.strerror or e}") from e
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, but also NotImplementedError, ValueError, ... on garbage
        raise _not_zip_error(path, head) from e
    with zf:
        try:
            _check_entries(zf, path)
            prefix = _find_prefix(zf, path)
            big = _read_byteorder(zf, prefix, path)
            data = zf.read(f"{prefix}/data.pkl")
            unpickler = _TorchUnpickler(data, zf, prefix, path, big, read_data)
            return _check_state_dict(unpickler.load(), path)
        except MlxLocalError:
            raise
        except Exception as e:  # a bad file must never escape as anything but MlxLocalError
            detail = " ".join(f"{type(e).__name__}: {e}".split()).rstrip(":")[:160]
            raise _err(
                path,
                f"the checkpoint is corrupt or not a plain torch state dict ({detail}); "
                "re-download it or use the safetensors weights",
            ) from e
