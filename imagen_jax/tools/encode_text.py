"""Precompute T5 embeddings of the captions in TFRecord shards, so training never runs (or builds) T5.

    python -m imagen_jax.tools.encode_text --encoder /path/t5 --input '/data/cc3m/*.tfrecord' \\
        --output /data/cc3m_t5 [--max_length 128] [--dtype bfloat16|float16] \\
        [--compute_dtype float32|bfloat16] [--lowercase] [--batch_size 256] [--overwrite] \\
        [--process_index I --process_count N]

Each input shard is copied record by record to the same file name in --output, every feature unchanged,
with `t5_embedding` and `t5_length` added (format: imagen_jax/data/text_records.py); text_embeddings.json
is written last. Train on the result with `data.train_shards='/data/cc3m_t5/*.tfrecord'` and
`data.precomputed_text=True`, and keep --max_length equal to the config's `text.max_length` and --lowercase
to its `text.lowercase` (True for DeepFloyd IF stages, whose T5 saw lower-cased, stripped prompts); training
checks both against text_embeddings.json.

Shards stream through in batches of --batch_size records (one jit compile: the last batch is padded), with
the next batch's tokenization overlapping the device's encoding of the previous one; the batch is split over
this host's devices. Each shard is written under a temporary name (`NAME.incomplete`) and renamed when done,
so an interrupted run leaves no complete-looking shard, and running again with the same arguments skips the
shards already written (--overwrite re-encodes them). Records that are not tf.train.Examples are skipped
and counted; a shard that is truncated or corrupt keeps the records before the damage, is reported on one
line, and the run carries on.

Many machines: give each `--process_index i --process_count n`; process i encodes the sorted input files
i, i+n, i+2n, ... Process 0 writes text_embeddings.json when its own share is done (without
`num_records`, which it cannot know): wait for every process to finish before training on the folder.

Bad arguments exit 2, other errors 1, each as one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="encode_text", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", required=True, help="Hugging Face T5 folder (config.json, tokenizer, weights)")
    parser.add_argument(
        "--input", required=True, help="input shards: glob, brace pattern or comma list; local or gs://"
    )
    parser.add_argument("--output", required=True, help="output folder (not the input folder); local or gs://")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per caption; = config text.max_length")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="storage dtype")
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"), help="T5 dtype")
    parser.add_argument(
        "--lowercase", action="store_true", help="lower-case and strip captions first; = config text.lowercase"
    )
    parser.add_argument("--batch_size", type=int, default=256, help="records per encoder call")
    parser.add_argument("--overwrite", action="store_true", help="re-encode shards whose output exists")
    parser.add_argument("--process_index", type=int, default=0, help="this machine's index in a split run")
    parser.add_argument("--process_count", type=int, default=1, help="machines sharing the run")
    args = parser.parse_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        import tensorflow as tf

        from imagen_jax.data.encode_text import encode_shards, op_error_text
        from imagen_jax.errors import DataError

        try:
            encode_shards(
                args.encoder,
                args.input,
                args.output,
                max_length=args.max_length,
                dtype=args.dtype,
                compute_dtype=args.compute_dtype,
                lowercase=args.lowercase,
                batch_size=args.batch_size,
                overwrite=args.overwrite,
                process_index=args.process_index,
                process_count=args.process_count,
                log=lambda line: print(line, flush=True),
            )
        except tf.errors.OpError as e:  # an unreadable input or unwritable output, named by TensorFlow
            raise DataError(op_error_text(e)) from None
        return 0

    return main_guard("encode_text", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
