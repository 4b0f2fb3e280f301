"""Hand-made torch.save checkpoints: any offset, size, stride or storage a test wants."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch


class StorageRef:
    """Pickles as a reference to the storage `archive/data/<key>` of `numel` elements."""

    def __init__(self, key: str, numel: int, storage_type=None) -> None:
        self.key, self.numel = key, numel
        self.storage_type = storage_type or torch.FloatStorage


class FakeTensor:
    """Pickles like a torch tensor, but with whatever offset/size/stride a test wants."""

    def __init__(self, storage: StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class StatePickler(pickle.Pickler):
    """Writes StorageRefs as torch.save's persistent ids."""

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def write_checkpoint(path: Path, obj, storages: dict[str, bytes], pid_ok: bool = True) -> Path:
    """A torch.save-shaped zip: archive/data.pkl + archive/data/<key> + archive/byteorder."""
    buf = io.BytesIO()
    (StatePickler if pid_ok else pickle.Pickler)(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", b"little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path
