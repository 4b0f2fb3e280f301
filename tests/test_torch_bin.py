"""load_torch_bin: exact round trips against torch, and hostile or broken files refused."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_bin_files import FakeTensor, StatePickler, StorageRef, write_checkpoint  # noqa: E402

from mlxlocal.checkpoint import torch_bin  # noqa: E402
from mlxlocal.checkpoint.torch_bin import load_torch_bin, read_torch_bin_header  # noqa: E402
from mlxlocal.errors import MlxLocalError  # noqa: E402

_MX_DTYPE = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.float64: mx.float64,
    torch.int64: mx.int64,
    torch.int32: mx.int32,
    torch.int16: mx.int16,
    torch.int8: mx.int8,
    torch.uint8: mx.uint8,
    torch.bool: mx.bool_,
}


def _assert_same(got: dict[str, mx.array], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        a = got[name]
        assert a.dtype == _MX_DTYPE[t.dtype], name
        assert tuple(a.shape) == tuple(t.shape), name
        if t.dtype in (torch.bfloat16, torch.float16):
            np.testing.assert_array_equal(
                np.array(a.astype(mx.float32)), t.float().numpy(), err_msg=name
            )
        else:
            np.testing.assert_array_equal(np.array(a), t.numpy(), err_msg=name)


def _raises(path: Path, *fragments: str) -> str:
    with pytest.raises(MlxLocalError) as info:
        load_torch_bin(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_dtypes_views_and_scalars(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    sd = {
        "f32": base,
        "f16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i64": torch.tensor([-(2**40), 0, 7, 2**62]),
        "i32": torch.tensor([[-5, 6]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "tail": base[1:],  # shares base's storage at an offset
        "transposed": base.t(),  # non-contiguous view of the same storage
        "strided": base[::2, 1::2],
        "column": base[:, 3],
        "scalar": torch.tensor(2.5),
        "bf16_scalar": torch.tensor(-1.25, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "expanded": torch.arange(3.0).expand(2, 3),  # stride 0
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    got = load_torch_bin(path)
    _assert_same(got, sd)
    assert got["scalar"].ndim == 0 and got["bf16_scalar"].ndim == 0
    assert got["f64"].dtype == mx.float64  # not silently narrowed to float32


def test_module_state_dict_with_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(5, 4),
        torch.nn.Linear(4, 3),
        torch.nn.LayerNorm(3),
        torch.nn.BatchNorm1d(3),  # buffers incl. an int64 0-d num_batches_tracked
    ).to(torch.bfloat16)
    sd = model.state_dict()
    sd_params = {name: p for name, p in model.named_parameters()}  # nn.Parameter objects
    assert all(isinstance(p, torch.nn.Parameter) for p in sd_params.values())
    path_sd = tmp_path / "sd.bin"
    path_params = tmp_path / "params.bin"
    torch.save(sd, path_sd)
    torch.save(sd_params, path_params)
    _assert_same(load_torch_bin(path_sd), dict(sd))
    _assert_same(load_torch_bin(path_params), {k: v.detach() for k, v in sd_params.items()})


def test_tensor_and_parameter_with_python_attributes(tmp_path: Path) -> None:
    t = torch.arange(4.0)
    t.note = "hello"  # pickled via torch._tensor._rebuild_from_type_v2
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.tag = 3  # pickled via _rebuild_parameter_with_state
    path = tmp_path / "attrs.bin"
    torch.save({"t": t, "p": p}, path)
    _assert_same(load_torch_bin(path), {"t": t, "p": p.detach()})


def test_big_endian_byteorder_entry_is_honoured(tmp_path: Path) -> None:
    sd = {"w": torch.tensor([1.5, -2.0, 3.25]), "b": torch.tensor([1.0, 2.0]).bfloat16()}
    little = tmp_path / "little.bin"
    torch.save(sd, little)
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                itemsize = 4 if info.filename.endswith("/0") else 2
                data = np.frombuffer(data, dtype=f"u{itemsize}").byteswap().tobytes()
            dst.writestr(info.filename, data)
    _assert_same(load_torch_bin(big), sd)


# --- hand-made checkpoints ---------------------------------------------------------------------


def test_hand_made_checkpoint_loads(tmp_path: Path) -> None:
    s = StorageRef("0", 6)
    obj = OrderedDict(a=FakeTensor(s, 0, (2, 3), (3, 1)), b=FakeTensor(s, 1, (2, 2), (1, 3)))
    raw = np.arange(6, dtype="<f4").tobytes()
    got = load_torch_bin(write_checkpoint(tmp_path / "ok.bin", obj, {"0": raw}))
    np.testing.assert_array_equal(np.array(got["a"]), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(np.array(got["b"]), [[1.0, 4.0], [2.0, 5.0]])


def test_out_of_bounds_view_is_refused(tmp_path: Path) -> None:
    s = StorageRef("0", 4)
    obj = {"w": FakeTensor(s, 2, (2, 2), (100000, 1))}
    path = write_checkpoint(tmp_path / "oob.bin", obj, {"0": bytes(16)})
    _raises(path, "storage '0'", "corrupt")


def test_unbounded_stride_zero_expansion_is_refused(tmp_path: Path) -> None:
    """A 4-byte storage must not be able to demand gigabytes through a stride-0 view."""
    obj = {"w": FakeTensor(StorageRef("0", 1), 0, (100000, 100000), (0, 0))}
    path = write_checkpoint(tmp_path / "bomb.bin", obj, {"0": bytes(4)})
    _raises(path, "over 4x the file's size", "malicious")


def test_missing_and_short_storage_entries(tmp_path: Path) -> None:
    obj = {"w": FakeTensor(StorageRef("0", 4), 0, (4,), (1,))}
    _raises(write_checkpoint(tmp_path / "missing.bin", obj, {}), "archive/data/0", "missing")
    _raises(write_checkpoint(tmp_path / "short.bin", obj, {"0": bytes(10)}), "10 bytes", "16")


def test_bad_persistent_id_and_non_storage(tmp_path: Path) -> None:
    class BadRef(StorageRef):
        pass

    class P(StatePickler):
        def persistent_id(self, obj):
            return ("storage", "FloatStorage", "0", "cpu", 1) if isinstance(obj, BadRef) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": FakeTensor(BadRef("0", 1), 0, (1,), (1,))})
    path = tmp_path / "pid.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", bytes(4))
    _raises(path, "malformed storage reference")

    # a tensor "rebuilt" from a plain list instead of a storage
    obj = {"w": FakeTensor([1.0], 0, (1,), (1,))}  # type: ignore[arg-type]
    _raises(write_checkpoint(tmp_path / "list.bin", obj, {}), "non-storage")


def test_unsupported_storage_dtype(tmp_path: Path) -> None:
    path = tmp_path / "complex.bin"
    torch.save({"c": torch.ones(2, dtype=torch.complex64)}, path)
    _raises(path, "ComplexFloatStorage")


# --- malicious files ---------------------------------------------------------------------------


class _Evil:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize(
    ("func", "name"),
    [(os.system, "system"), (builtins.eval, "eval"), (builtins.exec, "exec")],
)
def test_malicious_reduce_is_refused_without_running(tmp_path: Path, func, name: str) -> None:
    sentinel = tmp_path / "pwned"
    if func is os.system:
        payload = f"touch {sentinel}"
    else:
        payload = f"open({str(sentinel)!r}, 'w').close()"
    path = tmp_path / "evil.bin"
    # torch.save writes it exactly as an attacker's file would look; the evil object sits after
    # a real tensor so the loader is mid-way through a valid state dict when it meets it.
    torch.save({"ok": torch.ones(2), "evil": _Evil(func, payload)}, path)
    msg = _raises(path, "refusing to load", name, "malicious")
    assert "\n" not in msg
    assert not sentinel.exists()


def test_malicious_protocol4_stack_global_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    buf = io.BytesIO()
    pickle.dump({"x": _Evil(subprocess.Popen, ["touch", str(sentinel)])}, buf, protocol=4)
    path = tmp_path / "evil4.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
    _raises(path, "subprocess.Popen", "malicious")
    assert not sentinel.exists()


def test_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.bin"
    torch.save(torch.nn.Linear(2, 2), path)
    _raises(path, "torch.nn.modules.linear.Linear", "state_dict")


def test_top_level_must_be_dict_of_tensors(tmp_path: Path) -> None:
    as_list = tmp_path / "list.bin"
    torch.save([torch.ones(1)], as_list)
    _raises(as_list, "list", "not a dict of tensors")

    nested = tmp_path / "nested.bin"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, nested)
    _raises(nested, "'model'", "not a tensor")

    non_str_key = tmp_path / "intkey.bin"
    torch.save({0: torch.ones(1)}, non_str_key)
    _raises(non_str_key, "non-string key")


# --- broken files ------------------------------------------------------------------------------


def test_legacy_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    _raises(path, "pre-1.6", "safetensors")


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "full.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    _raises(cut, "truncated")


def test_random_bytes_and_empty_file_are_refused(tmp_path: Path) -> None:
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(rnd, "not a PyTorch checkpoint")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    _raises(empty, "not a PyTorch checkpoint")
    _raises(tmp_path / "does-not-exist.bin", "cannot read")


def test_zip_without_data_pkl_and_garbage_pickle(tmp_path: Path) -> None:
    no_pkl = tmp_path / "nopkl.bin"
    with zipfile.ZipFile(no_pkl, "w") as zf:
        zf.writestr("archive/data/0", bytes(4))
    _raises(no_pkl, "data.pkl")

    garbage = tmp_path / "garbage.bin"
    with zipfile.ZipFile(garbage, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00(X\x01")  # cut mid-pickle
    _raises(garbage, "corrupt")


def test_corrupted_storage_bytes_fail_crc(tmp_path: Path) -> None:
    path = tmp_path / "crc.bin"
    torch.save({"w": torch.arange(256, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data/0")))
    # flip a byte inside the stored payload (after the 30-byte local header + name + extra)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    _raises(path, "corrupt")


def test_mutated_files_only_ever_raise_mlxlocalerror(tmp_path: Path) -> None:
    """Byte flips in data.pkl and in the whole file: load or MlxLocalError, nothing else."""
    path = tmp_path / "base.bin"
    torch.save({"a": torch.randn(3, 4), "b": torch.randn(4).bfloat16(), "c": torch.arange(5)}, path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        entries = [(info.filename, zf.read(info)) for info in zf.infolist()]
    rng = np.random.default_rng(1)
    bad = tmp_path / "mutated.bin"
    for i in range(300):
        if i % 2:
            with zipfile.ZipFile(bad, "w") as zf:
                for name, data in entries:
                    if name.endswith("/data.pkl"):
                        buf = bytearray(data)
                        for pos in rng.integers(0, len(buf), size=rng.integers(1, 4)):
                            buf[pos] = int(rng.integers(0, 256))
                        data = bytes(buf)
                    zf.writestr(name, data)
        else:
            buf = bytearray(raw)
            for pos in rng.integers(0, len(buf), size=rng.integers(1, 4)):
                buf[pos] = int(rng.integers(0, 256))
            bad.write_bytes(bytes(buf))
        try:
            load_torch_bin(bad)
        except MlxLocalError as e:
            assert str(e).isprintable(), str(e)


# --- memory budgets ----------------------------------------------------------------------------


def test_views_of_one_storage_share_one_budget(tmp_path: Path, monkeypatch) -> None:
    """Tied weights (a storage read 4 times) load; a fifth view is over 4x the file's size."""
    monkeypatch.setattr(torch_bin, "_MIN_BUDGET", 0)
    base = torch.arange(16384.0)  # 64 KB, the bulk of the file
    tied = {f"w{i}": base.view(128, 128) for i in range(4)}
    path = tmp_path / "tied.bin"
    torch.save(tied, path)
    _assert_same(load_torch_bin(path), tied)
    torch.save({**tied, "w4": base}, path)
    _raises(path, "over 4x the file's size", "malicious")


def test_many_views_over_the_floor_are_refused(tmp_path: Path) -> None:
    """Per tensor each view is 1x its storage; together they would be 400 MB from 1 MB."""
    s = StorageRef("0", 1 << 18)
    obj = {f"w{i}": FakeTensor(s, 0, (512, 512), (512, 1)) for i in range(400)}
    path = write_checkpoint(tmp_path / "views.bin", obj, {"0": bytes(1 << 20)})
    _raises(path, "expand to more than", "malicious")
    header = read_torch_bin_header(path)  # metadata only: no budget is spent
    assert len(header) == 400 and header["w7"] == (mx.float32, (512, 512))


def test_header_matches_load_without_reading_data(tmp_path: Path, monkeypatch) -> None:
    sd = {"a": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "c": torch.tensor(1)}
    path = tmp_path / "sd.bin"
    torch.save(sd, path)
    loaded = load_torch_bin(path)
    opened, zip_open = [], zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return zip_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    header = read_torch_bin_header(path)
    assert header == {k: (a.dtype, tuple(a.shape)) for k, a in loaded.items()}
    assert opened and not [n for n in opened if "/data/" in n]  # no storage was read
    # the header pass checks the pickle as strictly as a load
    evil = tmp_path / "evil.bin"
    torch.save({"ok": torch.ones(2), "evil": _Evil(os.system, "true")}, evil)
    with pytest.raises(MlxLocalError, match="refusing to load"):
        read_torch_bin_header(evil)


def test_compressed_entries_are_refused_before_inflating(tmp_path: Path) -> None:
    obj = {"w": FakeTensor(StorageRef("0", 1 << 20), 0, (1 << 20,), (1,))}
    path = write_checkpoint(tmp_path / "deflated.bin", obj, {})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data/0", bytes(4 << 20))  # 4 MB of zeros in a few KB
    assert path.stat().st_size < 100_000
    _raises(path, "'archive/data/0' is compressed", "zip bomb")
    with pytest.raises(MlxLocalError, match="is compressed"):
        read_torch_bin_header(path)


def test_entry_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    obj = {"w": FakeTensor(StorageRef("0", 4), 0, (4,), (1,))}
    path = write_checkpoint(tmp_path / "ok.bin", obj, {"0": bytes(16)})
    data = bytearray(path.read_bytes())
    # the central directory's sizes of data/0: grow both to 2**31 bytes
    at = data.rindex(b"archive/data/0") - 46
    struct.pack_into("<II", data, at + 20, 1 << 31, 1 << 31)
    path.write_bytes(bytes(data))
    _raises(path, "claims 2147483648 bytes")


def test_overlapping_entries_are_refused(tmp_path: Path) -> None:
    """Storage 0's entry is stretched over storage 1's: each read would cover the file again."""
    storages = {"0": bytes(64), "1": bytes(1 << 20)}
    path = write_checkpoint(tmp_path / "overlap.bin", {}, storages)  # to learn the offsets
    with zipfile.ZipFile(path) as zf:
        first, second = zf.getinfo("archive/data/0"), zf.getinfo("archive/data/1")
    span = second.header_offset + 30 + len(second.filename) + second.file_size
    span -= first.header_offset + 30 + len(first.filename)
    numel = span // 4 - 1  # read part of the entry only, as a storage shorter than it may
    obj = {
        "a": FakeTensor(StorageRef("0", numel), 0, (numel,), (1,)),
        "b": FakeTensor(StorageRef("1", 1 << 18), 0, (1 << 18,), (1,)),
    }
    data = bytearray(write_checkpoint(path, obj, storages).read_bytes())
    at = data.rindex(b"archive/data/0") - 46  # its central directory record
    struct.pack_into("<II", data, at + 20, span, span)
    path.write_bytes(bytes(data))
    _raises(path, "overlapping zip entries", "malicious")
