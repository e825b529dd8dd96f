"""webdataset .tar shards -> TFRecord shards, streamed sample by sample: the work behind
`python -m imagen_jax.tools.convert_shards` (its docstring is the user's guide: counters, resumption, exit status).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import json  # noqa: E402
import multiprocessing  # noqa: E402
import posixpath  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from typing import IO, Any  # noqa: E402

import tensorflow as tf  # noqa: E402

from imagen_jax.data.records import IMAGE_FORMATS, example_from_sample  # noqa: E402
from imagen_jax.data.shards import list_shards  # noqa: E402
from imagen_jax.errors import UsageError  # noqa: E402

SKIP_REASONS = ("no_image", "incomplete")
SHARD_STATUSES = ("converted", "existing", "damaged", "failed")


class ShardDamaged(Exception):
    """The tar stream broke off: `reason` says how; `dropped` is the key of the sample in progress, if any."""

    def __init__(self, reason: str, dropped: str | None):
        super().__init__(reason)
        self.reason, self.dropped = reason, dropped


class _TarInfo(tarfile.TarInfo):
    """Notes why the archive ended. tarfile's stream reader ends quietly, without an error, at a missing or
    broken header after the first member, which is exactly how a shard cut at a member boundary looks."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive marker: a complete tar
            raise
        except tarfile.EmptyHeaderError:
            tar.damage = "the file ends without the end-of-archive marker (truncated)"
            raise
        except tarfile.HeaderError as e:
            tar.damage = f"{e} at byte {tar.offset}"
            raise


class _Tar(tarfile.TarFile):
    damage: str | None = None


def iter_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields (key, {extension: data}) for each run of consecutive members sharing a key.

    Reads `fileobj` once, front to back (it need not be seekable), holding one sample's members at a time. A
    truncated or corrupt tar raises ShardDamaged after the samples before the damage were yielded; the sample
    being read is not yielded, since which of its members are missing cannot be known.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with _Tar.open(fileobj=fileobj, mode="r|*", tarinfo=_TarInfo) as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it reads; a shard has tens of thousands
                if not info.isfile():
                    continue
                stem, _, ext = posixpath.basename(info.name).partition(".")
                if key is not None and stem != key:
                    yield key, members
                    members = {}
                key = stem
                members[ext.lower()] = tar.extractfile(info).read()
            if tar.damage:
                raise tarfile.ReadError(tar.damage)
    except (tarfile.TarError, EOFError) as e:
        raise ShardDamaged(str(e) or type(e).__name__, key) from None
    if key is not None:
        yield key, members


def _load_meta(data: bytes | None) -> dict[str, Any] | None:
    """The sample's metadata, {} without a .json, None when the .json is unusable."""
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return None
    return meta if isinstance(meta, dict) else None


def record_from_members(key: str, members: dict[str, bytes], counts: dict[str, int]) -> bytes | None:
    """The serialized record of one sample, or None when it has no image; updates `counts` (see module doc)."""
    image_format = next((f for f in IMAGE_FORMATS if f in members), None)
    if image_format is None:
        counts["no_image"] += 1
        return None
    counts["ignored_members"] += sum(ext not in (image_format, "txt", "json") for ext in members)
    meta = _load_meta(members.get("json"))
    args = (key, members[image_format], image_format, members.get("txt"))
    if meta is not None:
        try:
            return example_from_sample(*args, meta).SerializeToString()
        except ValueError:  # a value no feature can hold; the sample itself is fine
            pass
    counts["bad_meta"] += 1
    return example_from_sample(*args, {}).SerializeToString()


def output_name(path: str) -> str:
    """`…/00011.tar` -> `00011.tfrecord`."""
    return posixpath.basename(path)[: -len(".tar")] + ".tfrecord"


def _new_result(src: str, dst: str) -> dict[str, Any]:
    return {
        "input": src,
        "output": dst,
        "status": "converted",
        "error": None,
        "samples": 0,
        "no_image": 0,
        "incomplete": 0,
        "bad_meta": 0,
        "ignored_members": 0,
    }


def _remove_quietly(path: str) -> None:
    try:
        tf.io.gfile.remove(path)
    except tf.errors.OpError:
        pass


def convert_shard(src: str, output_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """Converts one tar into `output_dir/NAME.tfrecord` via a temporary file; returns its counts and status.

    Never raises for a damaged tar or an I/O error: those come back as status 'damaged' or 'failed' with
    `error` saying why, so one bad shard does not stop a conversion of hundreds.
    """
    dst = os.path.join(output_dir, output_name(src))
    result = _new_result(src, dst)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with tf.io.gfile.GFile(src, "rb") as f, tf.io.TFRecordWriter(tmp) as writer:
            try:
                for key, members in iter_samples(f):
                    record = record_from_members(key, members, result)
                    if record is not None:
                        writer.write(record)
                        result["samples"] += 1
            except ShardDamaged as e:
                result["incomplete"] += e.dropped is not None
                result["status"] = "damaged" if result["samples"] else "failed"
                result["error"] = f"damaged after {result['samples']} samples: {e.reason}"
        if result["status"] == "failed":
            _remove_quietly(tmp)
        else:
            tf.io.gfile.rename(tmp, dst, overwrite=overwrite)
    except (OSError, tf.errors.OpError) as e:
        _remove_quietly(tmp)
        result["status"] = "failed"
        result["error"] = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"
    return result


def _convert_task(task: tuple[str, str, bool]) -> dict[str, Any]:
    return convert_shard(*task)


def _check_inputs(files: list[str]) -> None:
    by_name: dict[str, str] = {}
    for path in files:
        if not path.endswith(".tar"):
            raise UsageError(f"input {path!r} is not a .tar shard (list only the webdataset .tar files)")
        name = output_name(path)
        if name in by_name:
            raise UsageError(f"inputs {by_name[name]!r} and {path!r} would both be written to {name!r}")
        by_name[name] = path


def _progress_line(done: int, total: int, r: dict[str, Any]) -> str:
    src, dst = posixpath.basename(r["input"]), posixpath.basename(r["output"])
    if r["status"] == "failed":
        return f"[{done}/{total}] {src}: FAILED, no output"
    skipped = sum(r[reason] for reason in SKIP_REASONS)
    line = f"[{done}/{total}] {src} -> {dst}: {r['samples']} samples ({skipped} skipped)"
    return line + (", DAMAGED" if r["status"] == "damaged" else "")


def summary_line(totals: dict[str, Any]) -> str:
    """One line with every counter of `convert`'s totals."""
    shards = ", ".join(f"{totals[s]} {s}" for s in SHARD_STATUSES)
    skipped = ", ".join(f"{reason}: {n}" for reason, n in totals["skipped"].items())
    return (
        f"done: {totals['shards']} shards ({shards}); {totals['samples']} samples written, "
        f"{sum(totals['skipped'].values())} skipped ({skipped}), {totals['bad_meta']} without metadata "
        f"(bad_meta), {totals['ignored_members']} ignored_members"
    )


def convert(
    inputs: str | Sequence[str], output_dir: str, workers: int = min(8, os.cpu_count() or 1), overwrite: bool = False
) -> dict[str, Any]:
    """Converts the tar shards that `inputs` names (patterns as `list_shards` takes them) into `output_dir`.

    Prints one progress line per finished shard and a summary line to stdout, a warning per damaged or failed
    shard to stderr. Returns the totals: {'shards', 'converted', 'existing', 'damaged', 'failed', 'samples',
    'skipped': {reason: n}, 'bad_meta', 'ignored_members'}. Raises MissingError / UsageError (one
    line, naming the pattern or file) for inputs that match nothing or are not .tar files.
    """
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    files = list_shards(inputs)
    _check_inputs(files)
    tf.io.gfile.makedirs(output_dir)
    totals: dict[str, Any] = {
        "shards": len(files),
        **{s: 0 for s in SHARD_STATUSES},
        "samples": 0,
        "skipped": {r: 0 for r in SKIP_REASONS},
        "bad_meta": 0,
        "ignored_members": 0,
    }
    todo = [f for f in files if overwrite or not tf.io.gfile.exists(os.path.join(output_dir, output_name(f)))]
    totals["existing"] = len(files) - len(todo)
    if totals["existing"]:
        print(
            f"skipping {totals['existing']} of {len(files)} shards whose output already exists in "
            f"{output_dir} (--overwrite to redo them)",
            flush=True,
        )
    tasks = [(f, output_dir, overwrite) for f in todo]
    pool = None
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: forking a process that has imported TensorFlow can deadlock in the child.
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
        results = pool.imap_unordered(_convert_task, tasks)
    else:
        results = map(_convert_task, tasks)
    try:
        for done, r in enumerate(results, 1):
            totals[r["status"]] += 1
            totals["samples"] += r["samples"]
            totals["bad_meta"] += r["bad_meta"]
            totals["ignored_members"] += r["ignored_members"]
            for reason in SKIP_REASONS:
                totals["skipped"][reason] += r[reason]
            if r["error"]:
                print(f"convert_shards: warning: {r['input']}: {r['error']}", file=sys.stderr, flush=True)
            print(_progress_line(done, len(tasks), r), flush=True)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    print(summary_line(totals), flush=True)
    return totals
