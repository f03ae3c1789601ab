"""Tests for internlm_jax.torch_pickle (torch is used only to write fixtures and as reference)."""

from __future__ import annotations

import collections
import io
import os
import pickle
import shlex
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from internlm_jax import torch_pickle  # noqa: E402
from internlm_jax.torch_pickle import (  # noqa: E402
    LazyTensor,
    TorchCheckpoint,
    UnsafePickleError,
    open_torch_checkpoint,
)

NP_DTYPE = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype(np.float64),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}


def torch_bytes(t: "torch.Tensor") -> bytes:
    """Raw C-order bytes of a torch tensor, without going through numpy dtypes."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(lazy: LazyTensor, ref: "torch.Tensor") -> np.ndarray:
    arr = lazy.load()
    assert isinstance(arr, np.ndarray)
    assert arr.flags.c_contiguous
    assert lazy.shape == tuple(ref.shape) == arr.shape
    assert lazy.dtype == NP_DTYPE[ref.dtype] == arr.dtype
    assert lazy.nbytes == arr.nbytes == ref.numel() * ref.element_size()
    assert arr.tobytes() == torch_bytes(ref)
    return arr


def save(obj, path, zip_format: bool = True) -> str:
    """torch.save in the zip format (default) or the legacy (non-zip) format."""
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def check_against_torch_load(path: str) -> dict:
    ref = torch.load(path, weights_only=True)
    tensors = open_torch_checkpoint(path)
    assert list(tensors) == list(ref)
    for name, t in ref.items():
        assert_bit_exact(tensors[name], t)
    return tensors


# --------------------------------------------------------------------------
# Dtypes, shapes, views
# --------------------------------------------------------------------------


def _random_tensor(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


@FORMATS
@pytest.mark.parametrize("dtype", list(NP_DTYPE), ids=lambda d: str(d).split(".")[-1])
def test_dtypes_and_shapes_bit_exact(tmp_path, dtype, zip_format):
    gen = torch.Generator().manual_seed(0)
    sd = {
        "scalar": _random_tensor(dtype, (), gen),
        "vec": _random_tensor(dtype, (7,), gen),
        "cube": _random_tensor(dtype, (2, 3, 5), gen),
        "empty": _random_tensor(dtype, (0, 3), gen),
    }
    if dtype.is_floating_point:  # special values must survive bit-exactly
        sd["special"] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40]).to(dtype)
    path = save(sd, tmp_path / "pytorch_model.bin", zip_format)
    tensors = check_against_torch_load(path)
    assert tensors["scalar"].shape == ()
    assert tensors["empty"].load().shape == (0, 3)
    if dtype.is_floating_point:  # value-level check too, via a float32 cast
        np.testing.assert_array_equal(
            tensors["cube"].load().astype(np.float32), sd["cube"].float().numpy()
        )


def test_bfloat16_bits(tmp_path):
    t = torch.randn(4, 4, dtype=torch.float32).to(torch.bfloat16)
    path = save({"w": t}, tmp_path / "bf16.bin")
    arr = open_torch_checkpoint(path)["w"].load()
    assert arr.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(arr.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))


@FORMATS
def test_shared_storage_slices_and_views(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = collections.OrderedDict(
        [
            ("base", base),
            ("rows", base[1:3]),  # storage_offset 6
            ("col", base[:, 2]),  # offset 2, stride 6
            ("transposed", base.t()),
            ("expanded", base[3, :1].expand(5, 1)),  # stride 0
        ]
    )
    path = save(sd, tmp_path / "shared.bin", zip_format)
    with TorchCheckpoint(path) as ck:
        assert len({t.storage_key for t in ck.tensors.values()}) == 1
        assert ck["rows"].storage_offset == 6
        for name, t in sd.items():
            assert_bit_exact(ck[name], t)
    check_against_torch_load(path)


@FORMATS
def test_slice_saved_alone(tmp_path, zip_format):
    base = torch.randn(100, 8)
    part = base[40:43]
    path = save({"part": part}, tmp_path / "part.bin", zip_format)
    lazy = open_torch_checkpoint(path)["part"]
    assert lazy.storage_offset == 40 * 8
    assert_bit_exact(lazy, part)
    check_against_torch_load(path)


@FORMATS
def test_non_contiguous_tensors(tmp_path, zip_format):
    gen = torch.Generator().manual_seed(1)
    sd = {
        "t2d": torch.randn(3, 5, generator=gen).t(),
        "perm3d": torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).permute(2, 0, 1),
        "strided": torch.randn(10, 10, generator=gen).to(torch.bfloat16)[::3, 1::2],
        "int_t": torch.arange(12).reshape(3, 4).t(),
    }
    for t in sd.values():
        assert not t.is_contiguous()
    path = save(sd, tmp_path / "views.bin", zip_format)
    check_against_torch_load(path)


def test_ordered_dict_order_preserved(tmp_path):
    names = ["z.weight", "a.bias", "m", "b.0.x", "aa"]
    sd = collections.OrderedDict((n, torch.full((2,), float(i))) for i, n in enumerate(names))
    path = save(sd, tmp_path / "order.bin")
    assert list(open_torch_checkpoint(path)) == names


@FORMATS
def test_module_state_dict(tmp_path, zip_format):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 4),
        torch.nn.Linear(4, 6),
        torch.nn.LayerNorm(6),
        torch.nn.BatchNorm1d(6),  # has an int64 0-d num_batches_tracked buffer
    )
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")  # pickled via BUILD; must be tolerated
    path = save(sd, tmp_path / "pytorch_model.bin", zip_format)
    tensors = check_against_torch_load(path)
    assert tensors["3.num_batches_tracked"].dtype == np.int64

    model_bf16 = model.to(torch.bfloat16)
    path = save(model_bf16.state_dict(), tmp_path / "bf16_model.bin", zip_format)
    check_against_torch_load(path)


def test_parameters_saved_directly(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    path = save({"p": p, "buf": torch.ones(2)}, tmp_path / "param.bin")
    check_against_torch_load(path)


@pytest.mark.parametrize("filename", ["pytorch_model-00001-of-00002.bin", "x.pt"])
def test_archive_prefix_follows_file_name(tmp_path, filename):
    path = save({"w": torch.ones(3)}, tmp_path / filename)
    with zipfile.ZipFile(path) as z:
        assert z.namelist()[0] == os.path.splitext(filename)[0] + "/data.pkl"
    check_against_torch_load(path)


def test_saved_through_buffer_has_archive_prefix(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(5)}, buf)
    path = tmp_path / "from_buffer.bin"
    path.write_bytes(buf.getvalue())
    with zipfile.ZipFile(path) as z:
        assert z.namelist()[0] == "archive/data.pkl"
    check_against_torch_load(str(path))


def test_big_endian_archive(tmp_path):
    sd = {
        "f32": torch.randn(2, 3),
        "bf16": torch.randn(4).to(torch.bfloat16),
        "i64": torch.arange(3),
        "b": torch.tensor([True, False]),
        "f16_t": torch.randn(3, 2).half().t(),
    }
    src = save(sd, tmp_path / "le.bin")
    dst = tmp_path / "be.bin"
    # Storage keys are assigned in order of first appearance: '0', '1', ...
    swapped = {}
    for i, t in enumerate(sd.values()):
        raw = np.frombuffer(torch_bytes(t), dtype=f"<u{t.element_size()}")
        swapped[f"le/data/{i}"] = raw.byteswap().tobytes() if t.is_contiguous() else None
    # the transposed storage is the full (contiguous) base storage
    base = sd["f16_t"].t()
    swapped["le/data/4"] = np.frombuffer(torch_bytes(base), "<u2").byteswap().tobytes()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = swapped.get(info.filename) or zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            zout.writestr(info.filename.replace("le/", "be/", 1), data)
    # torch itself agrees the crafted file is a valid big-endian checkpoint...
    ref = torch.load(dst, weights_only=True)
    for k, t in sd.items():
        assert torch_bytes(ref[k]) == torch_bytes(t)
    # ...and we read it back to the native values.
    tensors = open_torch_checkpoint(dst)
    for k, t in sd.items():
        assert_bit_exact(tensors[k], t)
    # a byteorder record that is neither is named, with the file, before any tensor is read
    odd = tmp_path / "odd.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(odd, "w") as zout:
        for info in zin.infolist():
            data = b"middle" if info.filename.endswith("/byteorder") else zin.read(info)
            zout.writestr(info.filename.replace("le/", "odd/", 1), data)
    with pytest.raises(ValueError, match=r"odd\.bin: unknown byteorder record 'middle'"):
        open_torch_checkpoint(odd)


# --------------------------------------------------------------------------
# Wrappers and non-tensor values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_single_wrapper_is_unwrapped(tmp_path, wrapper):
    sd = {"w": torch.randn(2, 2), "b": torch.zeros(2)}
    path = save({wrapper: sd}, tmp_path / "wrapped.bin")
    tensors = open_torch_checkpoint(path)
    assert list(tensors) == ["w", "b"]
    assert_bit_exact(tensors["w"], sd["w"])


def test_nested_dict_is_rejected(tmp_path):
    path = save({"model": {"w": torch.ones(1)}, "optimizer": {"lr": 0.1}}, tmp_path / "full.bin")
    with pytest.raises(ValueError, match=r"full\.bin.*'model'.*nested dict"):
        open_torch_checkpoint(path)


def test_non_tensor_value_is_rejected(tmp_path):
    path = save({"w": torch.ones(1), "step": 3}, tmp_path / "step.bin")
    with pytest.raises(ValueError, match=r"step\.bin.*'step'.*not a tensor"):
        open_torch_checkpoint(path)


def test_dtype_value_is_rejected_as_non_tensor(tmp_path):
    path = save({"w": torch.ones(1), "dtype": torch.float16}, tmp_path / "dt.bin")
    with pytest.raises(ValueError, match=r"dt\.bin.*'dtype'.*not a tensor"):
        open_torch_checkpoint(path)


# --------------------------------------------------------------------------
# Security
# --------------------------------------------------------------------------


def _binunicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _global_call_pickle(module: str, name: str, arg: str, stack_global: bool = False) -> bytes:
    """Protocol-2 pickle of {'w': <module.name(arg)>}, built opcode by opcode."""
    if stack_global:  # protocol-4 style lookup; must go through find_class too
        fetch = _binunicode(module) + _binunicode(name) + b"\x93"
    else:
        fetch = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return b"\x80\x02}(" + _binunicode("w") + fetch + _binunicode(arg) + b"\x85Ru."


def _write_torch_like_zip(path, data_pkl: bytes, prefix: str = "pytorch_model") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", b"little")
        z.writestr(f"{prefix}/version", b"3\n")


PAYLOADS = [
    ("os", "system", lambda m: f"touch {shlex.quote(str(m))}", False),
    ("posix", "system", lambda m: f"touch {shlex.quote(str(m))}", False),
    ("builtins", "eval", lambda m: f"open({str(m)!r}, 'w').close()", False),
    ("builtins", "exec", lambda m: f"open({str(m)!r}, 'w').close()", True),
]


@pytest.mark.parametrize("module,name,make_arg,stack_global", PAYLOADS, ids=lambda p: p if isinstance(p, str) else None)
def test_malicious_pickle_is_refused(tmp_path, module, name, make_arg, stack_global):
    marker = tmp_path / "pwned"
    data_pkl = _global_call_pickle(module, name, make_arg(marker), stack_global)
    if module == "posix" and os.name != "posix":
        pytest.skip("posix module only on POSIX")

    # Sanity: the payload is live -- plain pickle would run it.
    pickle.loads(data_pkl)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "pytorch_model.bin"
    _write_torch_like_zip(path, data_pkl)
    with pytest.raises(UnsafePickleError) as excinfo:
        open_torch_checkpoint(path)
    msg = str(excinfo.value)
    assert f"'{module}.{name}'" in msg
    assert "pytorch_model.bin" in msg
    assert isinstance(excinfo.value, ValueError)
    assert not marker.exists()


def test_payload_after_real_tensors_is_refused(tmp_path):
    """A valid-looking state dict whose last entry smuggles in a call."""
    marker = tmp_path / "pwned"
    real = tmp_path / "real.bin"
    torch.save({"w": torch.ones(3)}, real)
    with zipfile.ZipFile(real) as z:
        good = z.read("real/data.pkl")
        storage = z.read("real/data/0")
    assert good.endswith(b".")
    # after the last SETITEM(S) the dict is on top again: add one more item
    evil = good[:-1] + _binunicode("x") + b"cbuiltins\neval\n" + _binunicode(
        f"open({str(marker)!r}, 'w').close()"
    ) + b"\x85Rs."
    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", evil)
        z.writestr("evil/data/0", storage)
    with pytest.raises(UnsafePickleError, match=r"evil\.bin.*'builtins\.eval'"):
        open_torch_checkpoint(path)
    assert not marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    path = save(torch.nn.Linear(2, 2), tmp_path / "module.bin")
    with pytest.raises(UnsafePickleError, match=r"module\.bin.*'torch\.nn\.modules\.linear\.Linear'"):
        open_torch_checkpoint(path)


def test_build_on_stand_in_is_refused(tmp_path):
    """BUILD (setstate) on an allowed stand-in must not mutate module state."""
    # push torch._utils._rebuild_tensor_v2 stand-in, then BUILD it with a dict
    data_pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}" + _binunicode("a") + b"K\x01sb."
    path = tmp_path / "build.bin"
    _write_torch_like_zip(path, data_pkl)
    with pytest.raises(ValueError, match=r"build\.bin"):
        open_torch_checkpoint(path)


# --------------------------------------------------------------------------
# Broken / unsupported files
# --------------------------------------------------------------------------


def test_random_bytes(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"random\.bin"):
        open_torch_checkpoint(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.bin"):
        open_torch_checkpoint(path)


@FORMATS
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_checkpoint(tmp_path, keep, zip_format):
    full = save({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "full.bin", zip_format)
    with open(full, "rb") as f:
        data = f.read()
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"truncated\.bin.*truncated"):
        open_torch_checkpoint(path)


def _legacy_file(path, main_pickle: bytes, keys: list, magic=0x1950A86A20F9469CFC6C) -> None:
    """A legacy torch.save layout around a hand-made state dict pickle (no storage data)."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(v, protocol=2) for v in (magic, 1001, sys_info))
    path.write_bytes(head + main_pickle + pickle.dumps(keys, protocol=2))


def test_legacy_layout_is_what_torch_writes(tmp_path):
    """The hand-made layout of _legacy_file matches torch's own (so the tests below test real files)."""
    path = save({}, tmp_path / "empty_legacy.bin", zip_format=False)
    _legacy_file(tmp_path / "made.bin", pickle.dumps({}, protocol=2), [])
    assert (tmp_path / "made.bin").read_bytes() == open(path, "rb").read()
    assert torch.load(tmp_path / "made.bin", weights_only=True) == {} == open_torch_checkpoint(path)


@pytest.mark.parametrize("where", ["first pickle", "state dict"])
def test_legacy_malicious_pickle_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = _global_call_pickle("builtins", "eval", f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "legacy_evil.bin"
    if where == "first pickle":
        path.write_bytes(evil)
    else:
        _legacy_file(path, evil, [])
    with pytest.raises(UnsafePickleError, match=r"legacy_evil\.bin.*'builtins\.eval'"):
        open_torch_checkpoint(path)
    assert not marker.exists()


def test_legacy_bad_files_name_the_problem(tmp_path):
    plain = tmp_path / "plain_pickle.bin"
    plain.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(ValueError, match=r"plain_pickle\.bin.*not a torch\.save file.*magic number"):
        open_torch_checkpoint(plain)
    path = save({"w": torch.ones(8)}, tmp_path / "count.bin", zip_format=False)
    data = open(path, "rb").read()
    count = struct.pack("<q", 8)
    assert data.count(count) == 1 and data.index(count) == len(data) - 8 - 32
    (tmp_path / "count.bin").write_bytes(data.replace(count, struct.pack("<q", 7)))
    with pytest.raises(ValueError, match=r"count\.bin.*holds 7 elements, its tensors expect 8"):
        open_torch_checkpoint(path)
    real = save({"w": torch.ones(2)}, tmp_path / "real.bin")
    with zipfile.ZipFile(real) as z:
        state_dict_pickle = z.read("real/data.pkl")
    _legacy_file(tmp_path / "unstored.bin", state_dict_pickle, [])  # zip-style persistent ids, no storages
    with pytest.raises(ValueError, match=r"unstored\.bin.*unexpected persistent id"):
        open_torch_checkpoint(tmp_path / "unstored.bin")


def test_legacy_loading_one_tensor_reads_only_its_bytes(tmp_path, read_spy):
    gen = torch.Generator().manual_seed(3)
    sd = {"big0": torch.randn(256, 256, generator=gen), "small": torch.randn(7, generator=gen).half(),
          "big1": torch.randn(256, 256, generator=gen).bfloat16()[100:110]}
    path = save(sd, tmp_path / "lazy_legacy.bin", zip_format=False)
    with TorchCheckpoint(path) as ck:
        assert read_spy == [(o, 8) for o, _ in read_spy] and len(read_spy) == 3  # one element count per storage
        for name in sd:
            read_spy.clear()
            assert_bit_exact(ck[name], sd[name])
            assert [n for _, n in read_spy] == [ck[name].nbytes]
    check_against_torch_load(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("something/readme.txt", "hi")
    with pytest.raises(ValueError, match=r"other\.zip.*data\.pkl"):
        open_torch_checkpoint(path)


def test_storage_member_too_short(tmp_path):
    real = save({"w": torch.ones(8)}, tmp_path / "real.bin")
    path = tmp_path / "short.bin"
    with zipfile.ZipFile(real) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "real/data/0":
                data = data[:5]
            zout.writestr(info.filename.replace("real/", "short/", 1), data)
    with pytest.raises(ValueError, match=r"short\.bin.*data/0"):
        open_torch_checkpoint(path)


# --------------------------------------------------------------------------
# Lazy reading / handle management
# --------------------------------------------------------------------------


@pytest.fixture
def read_spy(monkeypatch):
    """Records every (file offset, length) read through the archive's read path."""
    calls = []
    orig = torch_pickle._Source._readinto_at

    def spy(self, offset, out):
        calls.append((offset, len(out)))
        return orig(self, offset, out)

    monkeypatch.setattr(torch_pickle._Source, "_readinto_at", spy)
    return calls


def test_loading_one_tensor_reads_only_its_bytes(tmp_path, read_spy, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    sd = {
        "big0": torch.randn(256, 256, generator=gen),
        "small": torch.randn(7, generator=gen).to(torch.bfloat16),
        "big1": torch.randn(256, 256, generator=gen),
    }
    path = save(sd, tmp_path / "lazy.bin")
    with TorchCheckpoint(path) as ck:
        assert read_spy == []  # parsing reads only data.pkl, no tensor data

        def forbidden(*a, **k):
            raise AssertionError("load() must not go through ZipFile.read/open")

        monkeypatch.setattr(zipfile.ZipFile, "read", forbidden)
        monkeypatch.setattr(zipfile.ZipFile, "open", forbidden)

        arr = ck["small"].load()
        data_reads = [(o, n) for o, n in read_spy if n == ck["small"].nbytes]
        assert len(data_reads) == 1
        # the only other read is the member's 30-byte local file header
        assert sum(n for _, n in read_spy) == ck["small"].nbytes + 30
        offset, n = data_reads[0]
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(n) == torch_bytes(sd["small"]) == arr.tobytes()


def test_slice_reads_only_its_range(tmp_path, read_spy):
    base = torch.randn(1000)
    path = save({"base": base, "part": base[500:510]}, tmp_path / "slice.bin")
    tensors = open_torch_checkpoint(path)
    read_spy.clear()
    arr = tensors["part"].load()
    assert arr.tobytes() == torch_bytes(base[500:510])
    assert sum(n for _, n in read_spy) <= 40 + 30


def test_context_manager_and_close(tmp_path):
    path = save({"w": torch.ones(3)}, tmp_path / "cm.bin")
    with TorchCheckpoint(path) as ck:
        lazy = ck.tensors["w"]
        assert not ck.closed
        np.testing.assert_array_equal(lazy.load(), np.ones(3, np.float32))
    assert ck.closed
    with pytest.raises(ValueError, match=r"cm\.bin.*closed"):
        lazy.load()


def test_open_torch_checkpoint_tensors_outlive_the_call(tmp_path):
    path = save({"a": torch.arange(4), "b": torch.ones(2)}, tmp_path / "plain.bin")
    tensors = open_torch_checkpoint(path)
    import gc

    gc.collect()
    np.testing.assert_array_equal(tensors["a"].load(), np.arange(4))
    np.testing.assert_array_equal(tensors["b"].load(), np.ones(2, np.float32))


def test_module_does_not_import_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(torch_pickle))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported
