"""PyTorch checkpoints read as data: tensors as torch wrote them (tests/fixtures/make_t5_bin_fixtures.py), and
every pickle that would call anything but tensor rebuilding refused before it runs."""

import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from imagen_jax.errors import WeightsError
from imagen_jax.text.torch_checkpoint import TorchCheckpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "t5")


def test_views_offsets_and_dtypes_as_torch_saved_them():
    checkpoint = TorchCheckpoint(os.path.join(FIXTURES, "views.bin"))
    want = np.load(os.path.join(FIXTURES, "views.npz"))
    assert sorted(checkpoint.keys()) == sorted(want.files)
    for name in want.files:
        got = checkpoint.get(name)
        np.testing.assert_array_equal(got.astype(want[name].dtype), want[name], err_msg=name)
        assert got.flags.c_contiguous and got.flags.owndata
    assert checkpoint.get("bf16").dtype == ml_dtypes.bfloat16 and checkpoint.get("ids").dtype == np.int64
    assert checkpoint.get("transposed").shape == (4, 3)  # a transpose of "same_storage", sharing its storage
    checkpoint.close()


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_both_torch_save_formats(name):
    """torch.save's zip archive and its pre-1.6 legacy stream (the FID Inception weights' format) read alike:
    tests/fixtures/make_inception_fixtures.py."""
    checkpoint = TorchCheckpoint(os.path.join(FIXTURES, "..", "inception", name))
    want = np.load(os.path.join(FIXTURES, "..", "inception", "tiny.npz"))
    assert sorted(checkpoint.keys()) == sorted(want.files)
    for key in want.files:
        np.testing.assert_array_equal(checkpoint.get(key).astype(want[key].dtype), want[key], err_msg=key)
    assert checkpoint.get("bf16").dtype == ml_dtypes.bfloat16 and checkpoint.get("ids").dtype == np.int64
    assert checkpoint.get("transposed").shape == (4, 3)
    checkpoint.close()


def test_a_truncated_legacy_file_is_refused(tmp_path):
    data = open(os.path.join(FIXTURES, "..", "inception", "tiny_legacy.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[:-10])
    with pytest.raises(WeightsError, match=r"cut.pth: truncated: its storages need \d+ bytes, the file has \d+$"):
        TorchCheckpoint(str(tmp_path / "cut.pth"))


class _Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _archive(path, payload: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/data/0", b"\0" * 16)
    return str(path)


def test_a_pickle_that_calls_a_function_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    path = _archive(tmp_path / "evil.bin", pickle.dumps({"weight": _Exploit(sentinel)}, protocol=2))
    with pytest.raises(WeightsError) as info:
        TorchCheckpoint(path)
    message = str(info.value)
    assert "evil.bin: refused pickled global" in message and "system" in message and "\n" not in message
    assert not sentinel.exists()
    # also as the pickle's own persistent id, and a global hidden behind an allowed-looking module
    for payload in (
        b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01cbuiltins\neval\nq\x02X\x04\x00\x00\x001+1q\x03\x85q\x04Rq\x05s.",
        b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01X\x03\x00\x00\x00abcq\x02Qs.",
        b"\x80\x02ctorch._utils\n_rebuild_device_tensor_from_numpy\nq\x00.",
    ):
        with pytest.raises(WeightsError, match="refused"):
            TorchCheckpoint(_archive(tmp_path / "x.bin", payload))


def test_files_that_are_not_tensor_archives_get_one_line_errors(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match="legacy.bin: not a PyTorch checkpoint .neither a zip archive nor torch.s"):
        TorchCheckpoint(str(legacy))
    with pytest.raises(WeightsError, match="not a state dict of tensors"):
        TorchCheckpoint(_archive(tmp_path / "ints.bin", pickle.dumps({"a": 1}, protocol=2)))
    with pytest.raises(WeightsError, match="unreadable state dict pickle"):
        TorchCheckpoint(_archive(tmp_path / "cut.bin", pickle.dumps({"a": 1}, protocol=2)[:-3]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a/data.pkl", b"")
        z.writestr("b/data.pkl", b"")
    (tmp_path / "two.bin").write_bytes(buffer.getvalue())
    with pytest.raises(WeightsError, match="expected one <name>/data.pkl in the archive, found 2"):
        TorchCheckpoint(str(tmp_path / "two.bin"))
