"""Convert img2dataset webdataset shards (.tar) into img2dataset TFRecord shards, the training input format.

    python -m imagen_jax.tools.convert_shards --input 'gs://b/cc3m/{00000..00331}.tar' \\
        --output /data/cc3m_tfrecord [--workers N] [--overwrite]

Getting the data. img2dataset (pip install img2dataset) downloads CC3M and CC12M from their URL lists:

    # CC3M: Google's Train_GCC-training.tsv has no header line; name its columns first.
    sed -i '1s/^/caption\\turl\\n/' cc3m.tsv
    img2dataset --url_list cc3m.tsv --input_format tsv --url_col url --caption_col caption \\
        --output_format webdataset --output_folder gs://b/cc3m --encode_format jpg \\
        --resize_mode keep_ratio --image_size 1024 --resize_only_if_bigger True \\
        --processes_count 16 --thread_count 64 --enable_wandb False
    # CC12M: cc12m.tsv (columns url, caption; add the header the same way: '1s/^/url\\tcaption\\n/')
    img2dataset --url_list cc12m.tsv --input_format tsv --url_col url --caption_col caption \\
        --output_format webdataset --output_folder gs://b/cc12m ... (same resize flags)

`--resize_mode keep_ratio --image_size 1024 --resize_only_if_bigger True` keeps the whole picture with its
short side at most 1024, so one copy serves every stage (the training pipeline resizes the short side to the
stage's size and centre-crops). For base-only training (64 px) a smaller copy is much cheaper, e.g.
`--image_size 256`. `--resize_mode center_crop` stores squares (smaller, but the crop is then fixed).
Avoid img2dataset's default `--resize_mode border`: it letterboxes every image into a square with black
bars, and the model learns the bars. img2dataset can also write TFRecord directly (`--output_format
tfrecord`, needs tensorflow_io); this tool is for sets already fetched as webdataset.

Then point training at the result: `--config.data.train_shards='/data/cc3m_tfrecord/*.tfrecord'`.

What it does. Each `NAME.tar` becomes `NAME.tfrecord` in --output, one `tf.train.Example` per sample in the
layout of `imagen_jax.data.records` (key, image under jpg/png/webp, txt, metadata fields from the .json).
The tar is read once, front to back, as a stream (`tarfile` mode 'r|*' over a `tf.io.gfile.GFile`), and each
sample is written as soon as its members are read, so memory holds one sample, never a shard; gs:// works
for both sides. Members sharing a key (basename up to its first dot) and standing next to each other form a
sample; the extension (after that dot, lower-cased) says what the member is. The `.parquet` and
`_stats.json` files img2dataset writes next to the tars are not inputs (list only the .tar files).

A shard is written to `NAME.tfrecord.tmp-<pid>` and renamed when complete, so an interrupted run never
leaves a complete-looking shard (on gs:// the rename is a copy: the object appears only once whole). Shards
whose output exists are skipped unless --overwrite, so rerunning the same command resumes. Stale `.tmp-*`
files of killed runs can be deleted once no conversion is running.

Counters (the summary line and `convert`'s return value):
  shards       input shards;   converted  written in full;   existing  skipped, output already there;
  damaged      the tar is truncated or corrupt: the samples before the damage are written, the sample being
               read when it hit is dropped, a one-line warning names the file and the reason;
  failed       no output: a read/write error (e.g. network; rerun to retry), or damage before any sample;
  samples      records written;
  skipped      samples not written, by reason: no_image (no jpg/png/webp member), incomplete (cut by damage);
  bad_meta     samples written without metadata: their .json was not UTF-8, not a JSON object, or held a
               value no feature can store (e.g. an int beyond int64);
  ignored_members  members of written samples other than the chosen image, .txt and .json (a second image
               format, an extension img2dataset does not write).
Exit status: 0 when at least one shard was converted, damaged-but-written or already there; 1 when every
shard failed or an input pattern matches nothing; 2 for other bad arguments (a non-.tar input, --workers 0).
Errors are one line on stderr, `convert_shards: error: ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input",
        required=True,
        help="the .tar shards: glob, brace pattern ({00000..00331}), comma-separated; local or gs://",
    )
    parser.add_argument("--output", required=True, help="folder for the .tfrecord shards (local or gs://)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="shards converted in parallel (default: min(8, CPU count))",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo shards whose output already exists")
    args = parser.parse_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        import tensorflow as tf

        from imagen_jax.data.convert_shards import convert
        from imagen_jax.errors import DataError

        try:
            totals = convert(args.input, args.output, workers=args.workers, overwrite=args.overwrite)
        except tf.errors.OpError as e:
            raise DataError(e.message) from None
        return 1 if totals["shards"] and totals["failed"] == totals["shards"] else 0

    return main_guard("convert_shards", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
