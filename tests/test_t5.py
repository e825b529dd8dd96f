"""T5 encoder and tokenizer against Hugging Face goldens (tests/fixtures/make_t5_fixtures.py)."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.errors import WeightsError
from imagen_jax.text import T5Encoder, Tokenizer, make_tiny_t5, weight_files
from imagen_jax.text.t5 import relative_position_buckets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "t5")
RELU = os.path.join(FIXTURES, "relu")
GOLDEN = np.load(os.path.join(FIXTURES, "golden.npz"))
TEXTS = [str(t) for t in GOLDEN["texts"]]


def _with_spiece(tmp_path_factory, name: str) -> str:
    """A fixture checkpoint folder plus the shared spiece.model (kept once in relu/)."""
    folder = tmp_path_factory.mktemp("t5") / name
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    shutil.copy(os.path.join(RELU, "spiece.model"), folder)
    return str(folder)


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory):
    """The sharded seq2seq checkpoint (safetensors)."""
    return _with_spiece(tmp_path_factory, "gated")


@pytest.fixture(scope="module")
def encoders(gated_dir, tmp_path_factory):
    """The golden checkpoints in each weight format: safetensors (relu: one file, gated: sharded) and PyTorch's
    pytorch_model.bin (relu_bin: one file, gated_bin: sharded; tests/fixtures/make_t5_bin_fixtures.py)."""
    return {
        "relu": T5Encoder.from_pretrained(RELU),
        "gated": T5Encoder.from_pretrained(gated_dir),
        "relu_bin": T5Encoder.from_pretrained(_with_spiece(tmp_path_factory, "relu_bin")),
        "gated_bin": T5Encoder.from_pretrained(_with_spiece(tmp_path_factory, "gated_bin")),
    }


def test_tokenizer_matches_hugging_face():
    ids, mask = Tokenizer(RELU)(TEXTS, max_length=GOLDEN["ids_short"].shape[1])
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(ids, GOLDEN["ids_short"])
    np.testing.assert_array_equal(mask, GOLDEN["mask_short"])
    assert mask.all(axis=1).sum() >= 2  # some texts were truncated: EOS must still end them
    assert (ids[mask.all(axis=1), -1] == 1).all()
    long_ids, long_mask = Tokenizer(RELU)(TEXTS, max_length=GOLDEN["ids"].shape[1])
    np.testing.assert_array_equal(long_ids, GOLDEN["ids"])
    np.testing.assert_array_equal(long_mask, GOLDEN["mask"])


def test_tokenizer_json_folder_matches_spiece_model(tmp_path):
    """A folder holding tokenizer.json (what transformers saves) and no spiece.model tokenises as the golden."""
    from transformers import T5Tokenizer

    T5Tokenizer.from_pretrained(RELU, local_files_only=True).save_pretrained(tmp_path)
    assert "tokenizer.json" in os.listdir(tmp_path) and "spiece.model" not in os.listdir(tmp_path)
    ids, mask = Tokenizer(str(tmp_path))(TEXTS, max_length=GOLDEN["ids"].shape[1])
    np.testing.assert_array_equal(ids, GOLDEN["ids"])
    np.testing.assert_array_equal(mask, GOLDEN["mask"])
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(
        FileNotFoundError, match="no tokenizer in the T5 folder .looked for tokenizer.json, spiece.model"
    ):
        Tokenizer(str(tmp_path))  # transformers alone would make a tokenizer with an empty vocabulary here


def test_tokenizer_edge_cases_and_threads():
    tokenizer = Tokenizer(RELU)
    ids, mask = tokenizer([], max_length=5)
    assert ids.shape == mask.shape == (0, 5) and ids.dtype == np.int32
    ids, mask = tokenizer(["a red circle", ""], max_length=1)
    assert ids.tolist() == [[1], [1]] and mask.all()
    with pytest.raises(TypeError, match="single str"):
        tokenizer("a red circle", max_length=8)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tokenizer(["a"], max_length=0)
    # Each length has its own configured copy: threads asking for different lengths never mix them.
    from concurrent.futures import ThreadPoolExecutor

    lengths = [3, 9, 17, 64] * 8
    expected = {n: tokenizer(TEXTS, n) for n in set(lengths)}
    with ThreadPoolExecutor(4) as pool:
        for n, (ids, mask) in zip(lengths, pool.map(lambda n: tokenizer(TEXTS, n), lengths)):
            np.testing.assert_array_equal(ids, expected[n][0])
            np.testing.assert_array_equal(mask, expected[n][1])


def test_tokenizer_imports_neither_torch_nor_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from imagen_jax.text.tokenizer import Tokenizer; Tokenizer(sys.argv[1])(['a cat'], 8); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, RELU], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    assert "PyTorch was not found" not in proc.stderr


# Where the fast tokenizer and transformers' sentencepiece-backed (slow, legacy) one differ: text/tokenizer.py.
_FAST_SLOW_DIFFER = {
    "a\x85b": (["▁a", "▁b"], ["▁a", "<unk>", "b"]),  # NEL: whitespace to fast, a character to slow
    "\xa0\u0308": ([], ["▁", "<unk>"]),  # a mark after a character the map rewrites: fast drops it
    "\u3000\u0301": ([], ["▁", "<unk>"]),
    "a ﬁ\u0301": (["▁a", "▁", "f", "i"], ["▁a", "▁", "f", "i", "<unk>"]),
    "a\u0301\u0302\u0303b": (["▁a", "<unk>", "b"], ["▁", "<unk>", "b"]),  # >= 6 bytes: fast does not compose
}


def test_fast_and_slow_tokenizers_differ_only_where_known():
    import random

    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    fast = Tokenizer(RELU)
    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]  # T5's order: <extra_id_0> has the last id
    slow = SentencePieceBackend(
        vocab_file=os.path.join(RELU, "spiece.model"), eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=extra, legacy=True,
    )  # fmt: skip
    sentinels = ["<extra_id_0>", "<extra_id_99>"]
    assert fast(sentinels, max_length=2)[0][:, 0].tolist() == slow.convert_tokens_to_ids(sentinels)

    def fast_tokens(texts: list[str]) -> list[list[str]]:
        ids, mask = fast(texts, max_length=128)
        return [slow.convert_ids_to_tokens(row[m][:-1].tolist()) for row, m in zip(ids, mask)]

    def slow_tokens(text: str) -> list[str]:
        return slow.convert_ids_to_tokens(slow.encode(text, add_special_tokens=False))

    for text, (want_fast, want_slow) in _FAST_SLOW_DIFFER.items():
        assert fast_tokens([text])[0] == want_fast and slow_tokens(text) == want_slow, text
    # No difference anywhere else: golden texts, special tokens, and random strings of hard characters.
    rng = random.Random(0)
    pool = [*"ab é", "\xa0", "\u3000", "\u2028", "\x1c", "\u200b", "\xad", "\ufeff", "ﬁ", "①", "한", "😀", "\t", "  "]
    pool += ["</s>", "<extra_id_3>", "<pad>"]
    texts = TEXTS + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(2000)]
    for text, tokens in zip(texts, fast_tokens(texts)):
        assert tokens == slow_tokens(text), repr(text)


def test_relative_position_buckets_closed_form():
    buckets = relative_position_buckets(300, num_buckets=32, max_distance=128)
    # Row 150 holds key - query = -150..149. Exact buckets below 8, keys after the query
    # offset by 16, log buckets 8 + floor(8 * log(n / 8) / log(128 / 8)), at most 15.
    row = buckets[150]
    assert row[150] == 0 and row[151] == 17 and row[149] == 1 and row[143] == 7
    assert row[150 - 8] == 8 and row[150 + 8] == 16 + 8
    assert row[150 - 16] == 8 + int(8 * np.log(2) / np.log(16))
    assert row[150 - 90] == 14 and row[150 - 91] == 15 and row[0] == 15 and row[299] == 31


@pytest.mark.parametrize("name", ["relu", "gated", "relu_bin", "gated_bin"])
def test_float32_matches_hugging_face(encoders, name):
    enc = encoders[name]
    golden = GOLDEN[f"{name.removesuffix('_bin')}_hidden"]
    out = enc(jnp.asarray(GOLDEN["ids"]), jnp.asarray(GOLDEN["mask"]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), golden, atol=2e-5, rtol=1e-5)
    emb, mask = enc.encode(TEXTS, max_length=GOLDEN["ids"].shape[1])
    np.testing.assert_array_equal(np.asarray(mask), GOLDEN["mask"])
    np.testing.assert_allclose(np.asarray(emb), golden, atol=2e-5, rtol=1e-5)


def test_bfloat16_close_to_hugging_face(gated_dir):
    enc = T5Encoder.from_pretrained(gated_dir, dtype=jnp.bfloat16)  # bf16 file, bf16 compute
    emb, _ = enc.encode(TEXTS, max_length=GOLDEN["ids"].shape[1])
    assert emb.dtype == jnp.bfloat16
    err = np.abs(np.asarray(emb, np.float32) - GOLDEN["gated_hidden"])
    assert err.max() < 0.1 and err.mean() < 0.02


def test_encode_api_and_compiles_once_per_shape(encoders):
    enc = encoders["gated"]
    assert enc.dim == 32
    emb, mask = enc.encode(["a cat", "a dog"], max_length=8)
    assert emb.shape == (2, 8, 32) and mask.shape == (2, 8) and mask.dtype == jnp.bool_
    before = enc._forward._cache_size()
    enc.encode(["a red circle", "a blue square at the bottom"], max_length=8)
    assert enc._forward._cache_size() == before
    enc.encode(["a cat", "a dog"], max_length=9)
    assert enc._forward._cache_size() == before + 1


def test_padding_and_masked_ids_do_not_change_valid_tokens(encoders):
    enc = encoders["relu"]
    ids, mask = enc.tokenizer(["a red circle on the left"], max_length=40)
    n = int(mask.sum())
    base = np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask)))[0, :n]
    shorter = np.asarray(enc(jnp.asarray(ids[:, : n + 2]), jnp.asarray(mask[:, : n + 2])))[0, :n]
    garbage = np.where(mask, ids, np.random.default_rng(0).integers(3, 50, ids.shape)).astype(np.int32)
    noisy = np.asarray(enc(jnp.asarray(garbage), jnp.asarray(mask)))
    np.testing.assert_allclose(shorter, base, atol=1e-5)
    np.testing.assert_allclose(noisy[0, :n], base, atol=1e-5)
    unmasked = np.asarray(enc(jnp.asarray(garbage), jnp.ones_like(jnp.asarray(mask))))
    assert np.abs(unmasked[0, :n] - base).max() > 1e-2  # the mask is what hid the garbage


def test_encoder_output_is_constant(encoders):
    enc = encoders["relu"]
    ids, mask = enc.tokenizer(["a red circle"], max_length=8)
    grads = jax.grad(lambda s: enc.apply(s, jnp.asarray(ids), jnp.asarray(mask)).sum())(enc.state)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_parameters_carry_logical_axis_names(encoders):
    specs = nnx.get_partition_spec(encoders["gated"].state)
    block = specs["blocks"][0]
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")
    assert tuple(block["q"]["kernel"].get_value()) == ("embed", "heads_x_dim")
    assert tuple(block["o"]["kernel"].get_value()) == ("heads_x_dim", "embed")
    assert tuple(block["wi_0"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(block["wo"]["kernel"].get_value()) == ("mlp", "embed")


def test_reads_only_encoder_tensors(gated_dir, monkeypatch):
    read: list[str] = []
    original = weight_files.SafetensorsFile.get

    def spy(self, name, region=None):
        read.append(name)
        return original(self, name, region)

    monkeypatch.setattr(weight_files.SafetensorsFile, "get", spy)
    encoder = T5Encoder.from_pretrained(gated_dir)
    with open(os.path.join(gated_dir, "model.safetensors.index.json")) as f:
        stored = json.load(f)["weight_map"]
    assert any(k.startswith("decoder.") for k in stored)
    assert len(read) == len(set(read))
    assert set(read) == {k for k in stored if k.startswith("encoder.")} | {"shared.weight"}
    # every byte read is an encoder tensor's, each once; and they are what the files hold for them
    files = {name: load_file(os.path.join(gated_dir, name)) for name in set(stored.values())}
    assert encoder.bytes_read == encoder.bytes_stored == sum(files[stored[k]][k].nbytes for k in read)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def _copy_relu(tmp_path, skip: str = "") -> str:
    folder = tmp_path / "t5"
    shutil.copytree(RELU, folder, ignore=shutil.ignore_patterns(skip) if skip else None)
    return str(folder)


def test_missing_files_and_keys_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Encoder.from_pretrained(os.path.join(FIXTURES, "gated"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5Encoder.from_pretrained(_copy_relu(tmp_path / "a", "config.json"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        T5Encoder.from_pretrained(_copy_relu(tmp_path / "b", "model.safetensors"))

    folder = _copy_relu(tmp_path / "c")
    config_path = os.path.join(folder, "config.json")
    config = _read_json(config_path)
    _write_json(config_path, {k: v for k, v in config.items() if k != "d_kv"})
    with pytest.raises(WeightsError, match="config.json: missing key 'd_kv'"):
        T5Encoder.from_pretrained(folder)
    _write_json(config_path, {**config, "feed_forward_proj": "gated-swish"})
    with pytest.raises(ValueError, match="unsupported feed_forward_proj 'gated-swish'"):
        T5Encoder.from_pretrained(folder)

    folder = _copy_relu(tmp_path / "d")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    save_file({k: v for k, v in weights.items() if k != missing}, os.path.join(folder, "model.safetensors"))
    with pytest.raises(WeightsError, match=f"model.safetensors: missing tensor '{missing}'"):
        T5Encoder.from_pretrained(folder)

    weights["encoder.final_layer_norm.weight"] = np.ones(7, np.float32)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match="'encoder.final_layer_norm.weight' has shape"):
        T5Encoder.from_pretrained(folder)


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_make_tiny_t5_round_trip(tmp_path, ffn):
    colors, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"]
    places = ["on the left", "on the right", "at the top", "at the bottom"]
    captions = [f"a {c} {s} {p}" for c in colors for s in shapes for p in places]
    folder = make_tiny_t5(str(tmp_path / "tiny"), captions, feed_forward_proj=ffn, num_layers=1)
    enc = T5Encoder.from_pretrained(folder)
    stored = load_file(os.path.join(folder, "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(enc.state["embed"].get_value()), stored["shared.weight"])
    ids, mask = enc.tokenizer(captions, max_length=32)
    assert not mask.all(axis=1).any()  # no caption needed truncation
    assert (ids != 2).all()  # every caption character is in the trained vocabulary
    assert ids.max() < _read_json(os.path.join(folder, "config.json"))["vocab_size"]
    emb, mask = enc.encode(captions[:3], max_length=32)
    valid = np.asarray(emb)[np.asarray(mask)]
    assert np.isfinite(valid).all() and 0.5 < valid.std() < 2.0
    assert np.abs(np.asarray(emb[0] - emb[1])).max() > 0.1  # different captions, different embeddings


def test_make_tiny_t5_with_few_captions(tmp_path):
    folder = make_tiny_t5(str(tmp_path / "tiny"), ["hi", "yo"], vocab_size=1000)
    emb, mask = T5Encoder.from_pretrained(folder).encode(["hi", "unseen words"], max_length=6)
    assert emb.shape == (2, 6, 64) and np.asarray(mask[1]).sum() > 1
    with pytest.raises(ValueError, match="non-empty caption"):
        make_tiny_t5(str(tmp_path / "empty"), ["", "  "])


def test_sharded_pytorch_checkpoint_reads_only_encoder_tensors(tmp_path_factory, monkeypatch):
    """pytorch_model.bin shards: the encoder's tensors and shared.weight are read, once each; no decoder tensor."""
    read: list[str] = []
    original = weight_files.TorchCheckpoint.get

    def spy(self, name, region=None):
        read.append(name)
        return original(self, name, region)

    monkeypatch.setattr(weight_files.TorchCheckpoint, "get", spy)
    folder = _with_spiece(tmp_path_factory, "gated_bin")
    T5Encoder.from_pretrained(folder)
    stored = _read_json(os.path.join(folder, "pytorch_model.bin.index.json"))["weight_map"]
    assert any(k.startswith("decoder.") for k in stored)
    assert len(read) == len(set(read))
    assert set(read) == {k for k in stored if k.startswith("encoder.")} | {"shared.weight"}


def test_convert_t5_writes_encoder_safetensors_that_load_the_same(tmp_path_factory, tmp_path, capsys):
    """tools.convert_t5: sharded pytorch_model.bin -> sharded safetensors of the encoder's tensors only (no
    decoder, shared.weight stored as the encoder embedding), which loads and encodes exactly as the golden."""
    from imagen_jax.tools import convert_t5

    out = str(tmp_path / "encoder")
    files = convert_t5.convert(_with_spiece(tmp_path_factory, "gated_bin"), out, shard_bytes=40_000)
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    stored = _read_json(os.path.join(out, "model.safetensors.index.json"))["weight_map"]
    assert all(k.startswith("encoder.") for k in stored) and "encoder.embed_tokens.weight" in stored
    assert {"config.json", "spiece.model", *files} == set(os.listdir(out))
    enc = T5Encoder.from_pretrained(out)
    emb, _ = enc.encode(TEXTS, max_length=GOLDEN["ids"].shape[1])
    np.testing.assert_allclose(np.asarray(emb), GOLDEN["gated_hidden"], atol=2e-5, rtol=1e-5)

    assert convert_t5.main(["--folder", RELU, "--out", out]) == 1  # never overwrites unasked
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert convert_t5.main(["--folder", RELU, "--out", out, "--overwrite"]) == 0
    assert os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".convert_t5-")]  # no staging left behind
    assert convert_t5.main(["--folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "config.json" in err[-1] and not os.path.exists(tmp_path / "o")


_SHARDED_LOAD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder

folder, golden = sys.argv[1], np.load(sys.argv[2])
c = config_lib.load_config_file("configs/demo.py")
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
mesh = mesh_lib.make_mesh(c.mesh, jax.devices())
rules = mesh_lib.param_rules(c.mesh)
wanted = {}

def place(abstract):
    shardings = mesh_lib.state_shardings(abstract, mesh, rules)
    wanted.update({p: v.get_value() for p, v in nnx.to_flat_state(shardings)})
    return shardings

sharded, plain = T5Encoder.from_pretrained(folder, place=place), T5Encoder.from_pretrained(folder)
split = 0
for (path, a), (_, b) in zip(nnx.to_flat_state(sharded.state), nnx.to_flat_state(plain.state)):
    a, b = a.get_value(), b.get_value()
    assert a.sharding == wanted[path], path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    split += a.addressable_shards[0].data.size <= b.size // 4
assert split >= len(wanted) // 2, (split, len(wanted))  # most tensors are stored over fsdp x tensor
emb, _ = sharded.encode([str(t) for t in golden["texts"]], max_length=golden["ids"].shape[1])
np.testing.assert_allclose(np.asarray(emb), golden["gated_hidden"], atol=2e-5, rtol=1e-5)
print("OK", split, len(wanted))
"""


def test_weights_stream_into_their_shards(tmp_path_factory):
    """With `place`, each tensor of a sharded pytorch_model.bin goes straight to its shards on a 2x2 (fsdp x
    tensor) mesh of 4 fake CPU devices: the requested shardings, the values of a plain load, the golden output."""
    import subprocess
    import sys

    folder = _with_spiece(tmp_path_factory, "gated_bin")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_LOAD, folder, os.path.join(FIXTURES, "golden.npz")],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _to_ram(folder: str, url: str) -> str:
    """Copies a local folder to TensorFlow's in-process ram:// filesystem (a URL folder without a network)."""
    import tensorflow as tf

    tf.io.gfile.makedirs(url)
    for name in os.listdir(folder):
        tf.io.gfile.copy(os.path.join(folder, name), f"{url}/{name}", overwrite=True)
    return url


def test_url_folder_loads_as_the_local_one(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """A T5 folder at a URL (ram:// standing in for gs://): config and tokenizer are copied to the cache once, the
    weight files are read in place (the encoder's tensors, no whole file), and the encoder equals the local load."""
    import tensorflow as tf

    monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "cache"))
    local = _with_spiece(tmp_path_factory, "gated_bin")
    url = _to_ram(local, f"ram://{tmp_path.name}/gated_bin")
    remote = T5Encoder.from_pretrained(url)
    copied = [line.split()[1] for line in capsys.readouterr().err.splitlines() if line.startswith("copying ")]
    assert copied == [f"{url}/spiece.model"]
    plain = T5Encoder.from_pretrained(local)
    assert remote.bytes_read == plain.bytes_read == plain.bytes_stored
    for (path, a), (_, b) in zip(nnx.to_flat_state(remote.state), nnx.to_flat_state(plain.state)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    emb, mask = remote.encode(TEXTS, max_length=GOLDEN["ids"].shape[1])
    np.testing.assert_array_equal(np.asarray(mask), GOLDEN["mask"])
    np.testing.assert_allclose(np.asarray(emb), GOLDEN["gated_hidden"], atol=2e-5, rtol=1e-5)

    T5Encoder.from_pretrained(url)  # the cache is reused: nothing copied again
    assert "copying" not in capsys.readouterr().err
    (spiece,) = glob.glob(str(tmp_path / "cache" / "*" / "spiece.model"))
    with open(spiece, "r+b") as f:
        f.truncate(100)  # a copy of the wrong size (an interrupted one) is copied again
    Tokenizer(url)
    assert capsys.readouterr().err.count("copying") == 1
    assert os.path.getsize(spiece) == os.path.getsize(os.path.join(local, "spiece.model"))
    assert not [n for n in os.listdir(os.path.dirname(spiece)) if ".partial-" in n]
    assert T5Encoder.abstract(f"{url}/config.json").dim == 32  # config.json alone (train validation, plans)
    from imagen_jax.tools import convert_t5

    out = str(tmp_path / "encoder")
    convert_t5.convert(url, out)  # a URL folder to a local encoder-only one, tokenizer included
    assert {"config.json", "spiece.model", "model.safetensors"} == set(os.listdir(out))

    # Missing files are one-line errors naming the URL.
    with pytest.raises(FileNotFoundError, match=f"^{url}/nope/config.json: T5 config.json not found$"):
        T5Encoder.from_pretrained(f"{url}/nope")
    tf.io.gfile.remove(f"{url}/pytorch_model-00002-of-00003.bin")
    with pytest.raises(FileNotFoundError, match=f"^{url}/pytorch_model-00002-of-00003.bin: weight file named in"):
        T5Encoder.from_pretrained(url)
    tf.io.gfile.remove(f"{url}/spiece.model")
    with pytest.raises(FileNotFoundError, match=f"^{url}: no tokenizer in the T5 folder"):
        Tokenizer(url)


_TWO_HOSTS = """
import json, sys
import jax
index, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=index)
import numpy as np
from flax import nnx
from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder, regions

regions.LOCAL_GAP = 0  # every run read apart: the bytes read are exactly those of this host's slices
c = config_lib.load_config_file("configs/demo.py")
c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.replicate_below = 1, 4, 1, 0
mesh = mesh_lib.make_mesh(c.mesh, jax.devices())
place = lambda abstract: mesh_lib.state_shardings(abstract, mesh, mesh_lib.param_rules(c.mesh))
report = {}
for folder in sys.argv[3:]:
    sharded = T5Encoder.from_pretrained(folder, place=place)
    plain = T5Encoder.from_pretrained(folder, place=lambda a: jax.tree.map(lambda _: mesh_lib.replicated(mesh), a))
    half = whole = 0
    for (path, a), (_, b) in zip(nnx.to_flat_state(sharded.state), nnx.to_flat_state(plain.state)):
        a, b = a.get_value(), b.get_value()
        for shard in a.addressable_shards:  # this host's slices hold the checkpoint's values there
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(b.addressable_data(0))[shard.index])
        split = any(axis is not None for axis in a.sharding.spec)
        half, whole = half + split * b.size, whole + (not split) * b.size
    itemsize = plain.bytes_stored / (half + whole)
    report[folder] = [sharded.bytes_read, plain.bytes_read, plain.bytes_stored, (half / 2 + whole) * itemsize]
print(json.dumps(report))
"""


@pytest.mark.slow  # two JAX processes: ~15 s
def test_each_host_reads_only_the_slices_its_devices_hold(tmp_path_factory):
    """Two processes of two devices each, T5 over fsdp=4: each process reads from the files the bytes of its own
    halves of the split tensors and the unsplit ones whole (issue 29, point 4), for safetensors and PyTorch
    shards alike, and its slices hold the checkpoint's values."""
    import subprocess
    import sys

    from tests.processes import REPO, free_port

    folders = [_with_spiece(tmp_path_factory, "gated_bin"), _with_spiece(tmp_path_factory, "gated")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, str(i), str(port), *folders], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    for out, _ in outputs:
        for folder, (read, read_whole, stored, expected) in json.loads(out.strip().splitlines()[-1]).items():
            assert read_whole == stored and read == expected < 0.6 * stored, (folder, read, stored, expected)
