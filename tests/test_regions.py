"""Boxes of tensors read from their files with only the bytes they cover (imagen_jax/text/regions.py): against
NumPy's slicing, for raw payloads, safetensors files and PyTorch checkpoints; and a pod host's box of a sharded
weight."""

import io
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from imagen_jax.errors import WeightsError
from imagen_jax.text import regions
from imagen_jax.text.torch_checkpoint import TorchCheckpoint
from imagen_jax.text.weight_files import SafetensorsFile

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _index(region):
    return tuple(slice(a, b) for a, b in region)


@pytest.mark.parametrize(
    "shape, region",
    [
        ((6, 5), ((2, 4), (0, 5))),  # rows: one run
        ((6, 5), ((0, 6), (1, 3))),  # columns: a run per row
        ((4, 3, 5), ((1, 3), (0, 3), (2, 5))),
        ((4, 3, 5), ((1, 2), (1, 2), (0, 5))),
        ((7,), ((3, 7),)),
        ((), ()),
        ((3, 4), ((1, 1), (0, 4))),  # empty
    ],
)
def test_a_box_is_numpys_slice_and_reads_only_its_bytes(shape, region):
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 1.5
    file = io.BytesIO(b"x" * 11 + array.tobytes() + b"y" * 5)
    box = array[_index(region)]
    got, read = regions.read_region(file, 11, array.dtype, shape, region, gap=0, name="t")
    np.testing.assert_array_equal(got, box)
    assert got.flags.c_contiguous and got.flags.writeable
    assert read == box.nbytes  # gap 0: nothing between the runs is read
    got, read = regions.read_region(file, 11, array.dtype, shape, region, gap=1 << 20, name="t")
    np.testing.assert_array_equal(got, box)
    if box.size:  # one read through the gaps: from the box's first element to its last
        corners = tuple(np.array([a, b - 1]) for a, b in region)
        first, last = np.ravel_multi_index(corners, shape) if shape else (0, 0)
        assert read == (last - first + 1) * 4


def test_a_short_file_is_named():
    with pytest.raises(WeightsError, match=r"^f: tensor 'w': truncated: 8 of 16 bytes at offset 0$"):
        regions.read_region(io.BytesIO(bytes(8)), 0, np.dtype(np.float32), (4,), ((0, 4),), 0, "f: tensor 'w'")


def test_a_hosts_box_covers_its_devices_slices():
    shape = (8, 6)
    # four devices of eight, fsdp over rows: this host's are rows 2-5 whatever their order
    mine = [(slice(4, 6), slice(None)), (slice(2, 4), slice(None, None))]
    region = regions.host_region(mine, shape)
    assert region == ((2, 6), (0, 6))
    assert regions.local_index((slice(4, 6), slice(None)), region, shape) == (slice(2, 4), slice(0, 6))
    assert regions.host_region([(slice(None), slice(3, 6))], shape) == ((0, 8), (3, 6))
    assert regions.host_region([], shape) == ((0, 0), (0, 0))


def test_safetensors_boxes_and_bad_headers(tmp_path):
    tensors = {
        "w": np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32),
        "b": np.arange(5, dtype=np.int64),
        "h": np.ones((3, 2), ml_dtypes.bfloat16),
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    with open(path, "rb") as f:
        st = SafetensorsFile(path, f, gap=0)
        assert sorted(st.keys()) == ["b", "h", "w"] and st.shape("w") == (16, 12)
        for name, want in tensors.items():
            np.testing.assert_array_equal(st.get(name), want)
            assert st.get(name).dtype == want.dtype
        before = st.bytes_read
        np.testing.assert_array_equal(st.get("w", ((4, 8), (0, 12))), tensors["w"][4:8])
        assert st.bytes_read - before == 4 * 12 * 4
    data = open(path, "rb").read()
    cases = {
        "short": (b"\x01", r"not a safetensors file \(header size -1, file size 1\)$"),
        "header": (b"\x05" + bytes(7) + b"{nope", r"unreadable safetensors header"),
        "list": (b"\x02" + bytes(7) + b"[]", r"the safetensors header is not a JSON object$"),
        "cut": (data[:-8], r"tensor '\w' \(\w+ \[[\d, ]+\]\) does not fit its bytes \[\d+, \d+\) of a \d+-byte"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with open(tmp_path / name, "rb") as f, pytest.raises(WeightsError, match=rf"^{tmp_path / name}: {message}"):
            SafetensorsFile(str(tmp_path / name), f, gap=0)


@pytest.mark.parametrize(
    "path", ["t5/views.bin", "inception/tiny_zip.pth", "inception/tiny_legacy.pth"]
)  # fmt: skip
def test_pytorch_boxes_read_only_their_bytes(path):
    """Boxes of every tensor torch saved (views, offsets into shared storages, a transpose, both formats) are
    NumPy's slices; a box of rows of a contiguous tensor reads only those rows."""
    checkpoint = TorchCheckpoint(os.path.join(FIXTURES, path), gap=0)
    for name in checkpoint.keys():
        whole = checkpoint.get(name)
        region = tuple((n // 2, n) for n in whole.shape)
        box = checkpoint.get(name, region)
        np.testing.assert_array_equal(box, whole[_index(region)], err_msg=name)
        assert box.flags.c_contiguous and box.flags.owndata
    contiguous = [n for n in checkpoint.keys() if n != "transposed" and len(checkpoint.shape(n)) == 2]
    name = max(contiguous, key=lambda n: np.prod(checkpoint.shape(n)))
    rows, columns = checkpoint.shape(name)
    before = checkpoint.bytes_read
    checkpoint.get(name, ((1, 2), (0, columns)))
    assert 0 < checkpoint.bytes_read - before == columns * checkpoint.get(name).itemsize
    checkpoint.close()
