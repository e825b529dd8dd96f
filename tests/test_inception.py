"""The FID InceptionV3 against torch-fidelity (tests/fixtures/make_inception_fixtures.py): seeded random weights,
seeded uint8 inputs of several sizes; the TF1 resize alone; the converter and the weight file's errors."""

import hashlib
import os
import struct
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from imagen_jax.errors import MissingError, WeightsError
from imagen_jax.eval import inception_weights
from imagen_jax.eval.inception import inception_features, load_inception, preprocess, resize_like_tf1
from imagen_jax.eval.inception_weights import make_random_inception, random_weights, read_weights, tensor_shapes
from imagen_jax.tools import convert_inception

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "inception")
GOLDEN = np.load(os.path.join(FIXTURES, "golden.npz"))
WEIGHTS_SEED, INPUT_SEED = 0, 1  # as in the fixture script
CASES = [(1, 299, 299), (3, 32, 32), (1, 64, 64), (3, 333, 333), (1, 37, 120), (1, 480, 300)]
RESIZE_CASES = [((2, 5, 7), (13, 3)), ((1, 40, 33), (64, 50)), ((1, 17, 10), (6, 23))]
RTOL = 1e-5  # max |diff| over the features' largest magnitude (reached: 8e-7)


def images(index: int, n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng([INPUT_SEED, index]).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(WEIGHTS_SEED)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("inception") / "random.safetensors")
    assert make_random_inception(path, WEIGHTS_SEED) == f"random-seed-{WEIGHTS_SEED}"
    return path


@pytest.fixture(scope="module")
def model(weights_file):
    return load_inception(weights_file)


def test_random_weights_are_the_ones_the_goldens_were_made_with(weights):
    assert {k: v.shape for k, v in weights.items()} == tensor_shapes() and len(weights) == 470
    total = sum(np.abs(v).sum(dtype=np.float64) for v in weights.values())
    np.testing.assert_allclose(total, GOLDEN["weights_sum"], rtol=1e-12)
    assert not np.array_equal(random_weights(WEIGHTS_SEED + 1)["Mixed_7c.branch_pool.conv.weight"],
                              weights["Mixed_7c.branch_pool.conv.weight"])  # fmt: skip


def test_resize_matches_torch_fidelity_tf1_bilinear():
    for i, ((n, h, w), size) in enumerate(RESIZE_CASES):
        got = np.asarray(resize_like_tf1(images(100 + i, n, h, w), size))
        want = GOLDEN[f"resize_{i}"]
        assert got.shape == want.shape == (n, *size, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"resize {i}")  # 1 ulp at 255; reached: 0


def test_features_match_torch_fidelity(model):
    """Every input size through preprocess (resize + normalisation) and one batch through the jitted network."""
    graphdef, state = nnx.split(model)
    trunk = jax.jit(lambda g, s, x: nnx.merge(g, s).trunk(x), static_argnums=0)
    prepared = [preprocess(images(i, *case)) for i, case in enumerate(CASES)]
    features = np.asarray(trunk(graphdef, state, np.concatenate(prepared)))
    assert features.shape == (sum(c[0] for c in CASES), 2048) and features.dtype == np.float32
    start = 0
    for i, (n, _, _) in enumerate(CASES):
        want = GOLDEN[f"features_{i}"]
        got = features[start : start + n]
        start += n
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < RTOL, f"case {CASES[i]}: max |diff| / max |feature| = {error:.2e}"
        assert 0.3 < want.std() < 3  # the random weights keep features of order one


def test_pure_forward_under_jit_matches_torch_fidelity(model):
    """The public pure function, uint8 in: what the evaluation jits and shards."""
    graphdef, state = nnx.split(model)
    got = np.asarray(jax.jit(inception_features, static_argnums=0)(graphdef, state, images(2, *CASES[2])))
    want = GOLDEN["features_2"]
    assert np.abs(got - want).max() / np.abs(want).max() < RTOL
    with pytest.raises(ValueError, match=r"Inception input must be uint8 \[N, H, W, 3\] images, got float32"):
        preprocess(images(2, *CASES[2]).astype(np.float32))


def _storage_type(array: np.ndarray) -> bytes:
    return {np.dtype(np.float32): b"FloatStorage", np.dtype(np.int64): b"LongStorage"}[array.dtype]


def write_pth(path: str, tensors: dict[str, np.ndarray]) -> None:
    """torch.save's zip layout for a dict of float32/int64 tensors, the pickle written opcode by opcode (no torch):
    OrderedDict of _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, hooks)."""

    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s.encode())) + s.encode()

    def ints(values) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    ordered_dict = b"ccollections\nOrderedDict\n)R"
    items = []
    for key, (name, array) in enumerate(tensors.items()):
        strides = [s // array.itemsize for s in array.strides]
        storage = b"(" + text("storage") + b"ctorch\n" + _storage_type(array) + b"\n" + text(str(key))
        storage += text("cpu") + b"J" + struct.pack("<i", array.size) + b"tQ"
        rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"J\0\0\0\0" + ints(array.shape)
        items.append(text(name) + rebuild + ints(strides) + b"\x89" + ordered_dict + b"tR")
    pickle_bytes = b"\x80\x02" + ordered_dict + b"(" + b"".join(items) + b"u."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for key, array in enumerate(tensors.values()):
            z.writestr(f"archive/data/{key}", np.ascontiguousarray(array).tobytes())


def test_convert_round_trip_from_a_pth(tmp_path, weights, model, capsys):
    """A full-size .pth as torch saves a model (plus the classifier and BN counters the network does not use):
    converted (unknown hash allowed), it holds the same tensors and loads to the same network as the random file."""
    extra = {
        "fc.weight": np.ones((1008, 2048), np.float32),
        "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64),
    }
    pth, out = str(tmp_path / "random.pth"), str(tmp_path / "random.safetensors")
    write_pth(pth, {**weights, **extra})
    assert convert_inception.main(["--weights", pth, "--out", out, "--allow_unknown_hash"]) == 0
    digest = hashlib.sha256(open(pth, "rb").read()).hexdigest()
    tensors, metadata = read_weights(out)
    assert metadata["weights_id"] == f"sha256-{digest[:16]}" and metadata["source_sha256"] == digest
    assert tensors.keys() == weights.keys() and all(np.array_equal(tensors[k], weights[k]) for k in weights)
    converted = load_inception(out)
    assert converted.weights_id == metadata["weights_id"] and model.weights_id == "random-seed-0"
    for (where, a), (_, b) in zip(nnx.to_flat_state(nnx.state(converted)), nnx.to_flat_state(nnx.state(model))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(where))
    assert convert_inception.main(["--weights", pth, "--out", out, "--allow_unknown_hash"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_convert_checks_the_standard_hash(tmp_path, capsys, monkeypatch):
    tiny = os.path.join(FIXTURES, "tiny_zip.pth")
    digest = hashlib.sha256(open(tiny, "rb").read()).hexdigest()
    out = tmp_path / "x.safetensors"
    assert convert_inception.main(["--weights", tiny, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"convert_inception: error: {tiny}: sha256 {digest} does not start with 6726825d, the hash of the standard "
        "FID weights pt_inception-2015-12-05-6726825d.pth; pass --allow_unknown_hash to convert other weights\n"
    )
    assert not out.exists()
    monkeypatch.setattr(inception_weights, "STANDARD_SHA256_PREFIX", digest[:8])  # as if it were the standard file
    assert convert_inception.check_hash(tiny, allow_unknown_hash=False) == (
        digest,
        inception_weights.STANDARD_WEIGHTS_ID,
    )


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_convert_names_the_first_missing_tensor(tmp_path, capsys, name):
    """torch's zip and pre-1.6 formats both read; the tiny files hold one real tensor of the network."""
    path = os.path.join(FIXTURES, name)
    assert convert_inception.main(["--weights", path, "--out", str(tmp_path / "x"), "--allow_unknown_hash"]) == 1
    assert capsys.readouterr().err == (
        f"convert_inception: error: {path}: missing Inception tensor 'Conv2d_1a_3x3.bn.weight'\n"
    )


def test_weight_file_errors_name_the_tensor(tmp_path, weights_file):
    tensors, metadata = read_weights(weights_file)
    bad = tmp_path / "bad.safetensors"
    del tensors["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(
        WeightsError, match=r"bad.safetensors: missing Inception tensor 'Mixed_6c.branch7x7dbl_4.bn.running_var'$"
    ):
        load_inception(str(bad))
    tensors["Mixed_6c.branch7x7dbl_4.bn.running_var"] = np.ones(160, np.float32)
    tensors["Mixed_7a.branch3x3_2.conv.weight"] = tensors["Mixed_7a.branch3x3_2.conv.weight"].transpose(2, 3, 1, 0)
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(
        WeightsError,
        match=r"'Mixed_7a.branch3x3_2.conv.weight' has shape \(3, 3, 192, 320\), expected \(320, 192, 3, 3\)",
    ):
        load_inception(str(bad))
    save_file(tensors, str(bad))
    with pytest.raises(WeightsError, match="not an Inception weight file of imagen_jax.tools.convert_inception"):
        load_inception(str(bad))
    with pytest.raises(MissingError, match="nowhere.safetensors: Inception weights not found .convert pt_inception"):
        load_inception(str(tmp_path / "nowhere.safetensors"))
