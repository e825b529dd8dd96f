"""Precomputed T5 embeddings written into copies of TFRecord shards: the work behind
`python -m imagen_jax.tools.encode_text` (its docstring is the user's guide: layout, resumption, many machines).

`encode_shards` streams each shard in batches through the T5 encoder (split over this host's devices),
copies every record with `t5_embedding` / `t5_length` added (imagen_jax/data/text_records.py) under a
temporary name, renames it when complete, and writes text_embeddings.json last.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence

# Before TensorFlow loads (it only reads and writes files here): keep its banners out of the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax.data import text_records
from imagen_jax.data.decode import CAPTION_FEATURES
from imagen_jax.data.shards import list_shards
from imagen_jax.errors import DataError, UsageError
from imagen_jax.text import T5Config, T5Encoder

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_STORAGE_JNP = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
_READ_BUFFER_BYTES = 16 << 20
TEMP_SUFFIX = ".incomplete"


def _caption(example: tf.train.Example) -> str:
    """The first non-empty of the caption features, as the training pipeline picks it."""
    features = example.features.feature
    for name in CAPTION_FEATURES:
        if name in features and features[name].bytes_list.value and features[name].bytes_list.value[0]:
            return features[name].bytes_list.value[0].decode("utf-8", "replace")
    return ""


def _folder_key(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.normpath(os.path.abspath(path))


class _ShardReader:
    """Yields a shard's serialized records in lists of `batch_size`; stops at the first damaged record and
    keeps the DataLossError's message in `damage` (None when the file read to its end)."""

    def __init__(self, path: str, batch_size: int) -> None:
        self.path = path
        self.batch_size = batch_size
        self.damage: str | None = None

    def __iter__(self) -> Iterator[list[bytes]]:
        records = tf.data.TFRecordDataset(self.path, buffer_size=_READ_BUFFER_BYTES).as_numpy_iterator()
        batch: list[bytes] = []
        while True:
            try:
                batch.append(next(records))
            except StopIteration:
                break
            except tf.errors.DataLossError as e:
                self.damage = op_error_text(e)
                break
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def op_error_text(error: tf.errors.OpError) -> str:
    """The cause in a TF error message, on one line, without the op and graph-function wrapping."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message.strip().splitlines()[0])
    return re.sub(r"\s*\[Op:.*$", "", text).strip()


def _count_records(path: str) -> int:
    return int(tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES).reduce(np.int64(0), lambda n, _: n + 1))


class _BatchEncoder:
    """Tokenizes captions and runs the jitted encoder over this host's devices, batch split along 'data'."""

    def __init__(self, encoder: T5Encoder, *, max_length: int, batch_size: int, dtype: str) -> None:
        devices = jax.local_devices()
        if batch_size % len(devices):
            raise UsageError(f"--batch_size {batch_size} must be a multiple of the {len(devices)} local devices")
        mesh = Mesh(np.array(devices), ("data",))
        replicated, batched = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        self.tokenizer = encoder.tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.state = jax.device_put(encoder.state, replicated)
        storage = _STORAGE_JNP[dtype]
        # Cast on device: halves (float32 compute) the bytes that come back to the host.
        self.forward = jax.jit(
            lambda state, ids, mask: encoder.apply(state, ids, mask).astype(storage),
            in_shardings=(replicated, batched, batched),
            out_shardings=batched,
        )

    def __call__(self, captions: list[str]) -> tuple[jax.Array, np.ndarray]:
        """Starts encoding (asynchronously); returns (embeddings [batch_size, L, D], lengths [len(captions)])."""
        padded = captions + [""] * (self.batch_size - len(captions))
        ids, mask = self.tokenizer(padded, self.max_length)
        return self.forward(self.state, ids, mask), mask[: len(captions)].sum(axis=1)


def _with_embeddings(example: tf.train.Example, embedding: np.ndarray, length: int, dtype: str) -> bytes:
    features = example.features.feature
    for name in (text_records.EMBEDDING_FEATURE, text_records.LENGTH_FEATURE):
        if name in features:
            del features[name]
    features[text_records.EMBEDDING_FEATURE].bytes_list.value.append(
        text_records.encode_embedding(embedding[:length], dtype)
    )
    features[text_records.LENGTH_FEATURE].int64_list.value.append(length)
    return example.SerializeToString()


def _encode_shard(src: str, dst: str, encode: _BatchEncoder, dtype: str, batch_size: int) -> dict:
    """Writes dst (via a temporary file) from src; returns {'records', 'unparsable', 'damage'}."""
    reader = _ShardReader(src, batch_size)
    records = unparsable = 0
    temp = dst + TEMP_SUFFIX
    pending: tuple[list[tf.train.Example], jax.Array, np.ndarray] | None = None
    try:
        with tf.io.TFRecordWriter(temp) as writer:

            def flush(examples: list[tf.train.Example], embeddings: jax.Array, lengths: np.ndarray) -> None:
                host = np.asarray(embeddings)
                for i, example in enumerate(examples):
                    try:
                        writer.write(_with_embeddings(example, host[i], int(lengths[i]), dtype))
                    except ValueError as e:
                        raise DataError(f"{src}: record {records + i}: {e}") from None

            for raw_batch in reader:
                examples = []
                for raw in raw_batch:
                    try:
                        examples.append(tf.train.Example.FromString(raw))
                    except DecodeError:
                        unparsable += 1
                if not examples:
                    continue
                started = (examples, *encode([_caption(e) for e in examples]))
                if pending is not None:  # written while the device encodes the batch just started
                    flush(*pending)
                    records += len(pending[0])
                pending = started
            if pending is not None:
                flush(*pending)
                records += len(pending[0])
        tf.io.gfile.rename(temp, dst, overwrite=True)
    finally:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.remove(temp)
    return {"records": records, "unparsable": unparsable, "damage": reader.damage}


def _check_previous_run(output: str, wanted: dict) -> None:
    """A finished run's metadata in --output must describe what this run would write (or --overwrite)."""
    path = os.path.join(output, text_records.METADATA_FILE)
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            previous = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); delete it or pass --overwrite") from None
    for key, value in wanted.items():
        old, value = text_records.agreeing(previous, key), text_records.agreeing(wanted, key)
        if old != value:
            raise DataError(
                f"{path} says {key} {old!r} but this run has {value!r}: pass --overwrite to "
                f"re-encode every shard, or choose another --output"
            )


def _write_metadata(output: str, metadata: dict) -> None:
    path = os.path.join(output, text_records.METADATA_FILE)
    temp = path + TEMP_SUFFIX
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(json.dumps(metadata, indent=2) + "\n")
    tf.io.gfile.rename(temp, path, overwrite=True)


def encode_shards(
    encoder: str,
    input: str | Sequence[str],
    output: str,
    *,
    max_length: int = 128,
    dtype: str = "bfloat16",
    compute_dtype: str = "float32",
    lowercase: bool = False,
    batch_size: int = 256,
    overwrite: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Encodes this process's share of the `input` shards into `output`; see the module docstring.

    Returns {'shards': files this process handled, 'written': shards encoded, 'existing': shards skipped
    because their output existed, 'records': records written, 'unparsable': records skipped, 'damaged':
    [(file, message)], 'metadata': what text_embeddings.json got, or None on processes other than 0}.
    """
    if max_length < 1:
        raise UsageError(f"--max_length must be >= 1, got {max_length}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")
    if dtype not in text_records.STORAGE_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; use one of {text_records.STORAGE_DTYPES}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"--compute_dtype {compute_dtype!r} is not supported; use one of {tuple(COMPUTE_DTYPES)}")
    if not 0 <= process_index < process_count:
        raise UsageError(f"--process_index {process_index} is outside [0, --process_count={process_count})")
    files = list_shards(input)
    by_name: dict[str, str] = {}
    for path in files:
        if _folder_key(os.path.dirname(path)) == _folder_key(output):
            raise UsageError(f"--output {output} is the folder of input shard {path}: it would be overwritten")
        name = os.path.basename(path)
        if name in by_name:
            raise UsageError(
                f"input shards {by_name[name]} and {path} share the name {name}; "
                f"encode each folder into its own --output"
            )
        by_name[name] = path
    T5Config.from_json(os.path.join(encoder, "config.json"))  # a bad --encoder fails before any work
    wanted = {
        "encoder": encoder,
        "max_length": max_length,
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "lowercase": lowercase,
    }
    if not overwrite:
        _check_previous_run(output, wanted)

    t5 = T5Encoder.from_pretrained(encoder, dtype=COMPUTE_DTYPES[compute_dtype], lowercase=lowercase)
    encode = _BatchEncoder(t5, max_length=max_length, batch_size=batch_size, dtype=dtype)
    tf.io.gfile.makedirs(output)
    mine = files[process_index::process_count]
    count_existing = process_count == 1
    summary = {
        "shards": mine,
        "written": 0,
        "existing": 0,
        "records": 0,
        "unparsable": 0,
        "damaged": [],
        "metadata": None,
    }
    total_records = 0
    started = time.perf_counter()
    for src in mine:
        dst = os.path.join(output, os.path.basename(src))
        if not overwrite and tf.io.gfile.exists(dst):
            summary["existing"] += 1
            note = ""
            if count_existing:
                existing = _count_records(dst)
                total_records += existing
                note = f" ({existing} records)"
            log(f"{dst}: exists{note}, skipped (--overwrite re-encodes it)")
            continue
        shard_start = time.perf_counter()
        result = _encode_shard(src, dst, encode, dtype, batch_size)
        seconds = time.perf_counter() - shard_start
        summary["written"] += 1
        summary["records"] += result["records"]
        summary["unparsable"] += result["unparsable"]
        total_records += result["records"]
        extra = f", {result['unparsable']} unparsable records skipped" if result["unparsable"] else ""
        log(
            f"{dst}: {result['records']} records in {seconds:.1f}s ({result['records'] / max(seconds, 1e-9):.0f} "
            f"records/s){extra}"
        )
        if result["damage"]:
            summary["damaged"].append((src, result["damage"]))
            log(
                f"{src}: damaged after record {result['records'] + result['unparsable']} ({result['damage']}); "
                f"kept the records before it"
            )
    if process_index == 0:
        metadata = {
            "encoder": encoder,
            "dim": t5.dim,
            "max_length": max_length,
            "dtype": dtype,
            "compute_dtype": compute_dtype,
            "lowercase": lowercase,
            "num_shards": len(files),
        }
        if count_existing:
            metadata["num_records"] = total_records
        _write_metadata(output, metadata)
        summary["metadata"] = metadata
    seconds = time.perf_counter() - started
    log(
        f"done: {summary['written']} shards encoded ({summary['records']} records, "
        f"{summary['records'] / max(seconds, 1e-9):.0f} records/s), {summary['existing']} already there, "
        f"{summary['unparsable']} unparsable records skipped, {len(summary['damaged'])} damaged shards"
        + (f"; metadata: {os.path.join(output, text_records.METADATA_FILE)}" if process_index == 0 else "")
    )
    return summary
