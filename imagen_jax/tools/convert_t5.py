"""Convert a T5 folder's weights to safetensors once: the encoder's tensors only, in shards, without torch.

    python -m imagen_jax.tools.convert_t5 --folder /path/to/t5-v1_1-xxl --out /path/to/t5-v1_1-xxl-encoder \
        [--shard_gib 2] [--overwrite]

Reads any folder `T5Encoder.from_pretrained` reads, local or gs:// (pytorch_model.bin, sharded or not, through the
pickle-free reader; or safetensors), keeps the tensors the encoder uses (google/t5-v1_1-xxl: 4.76B of its 11.3B
parameters, the decoder and lm_head are never read), in their stored dtype, and writes OUT/model.safetensors
or, above --shard_gib, OUT/model-0000N-of-0000M.safetensors with model.safetensors.index.json, beside copies of
config.json and the tokenizer files. Memory holds one shard. The folder is written under a temporary name and
renamed when complete, so OUT is never half-written. Exit status 2 for a bad argument, 1 when a folder cannot be
used; the error is one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile


def encoder_tensor_names(folder: str) -> list[str]:
    """The stored names of the tensors the encoder of `folder` (its config.json) reads, in a stable order."""
    from imagen_jax.text.t5 import T5Config, hf_tensor_names

    cfg = T5Config.from_json(os.path.join(folder, "config.json"))
    return sorted({name for name, _ in hf_tensor_names(cfg).values()})


def convert(folder: str, out: str, *, shard_bytes: int = 2 * 2**30, overwrite: bool = False) -> list[str]:
    """Writes the encoder tensors of `folder` to safetensors in `out`; returns the weight files written."""
    from safetensors.numpy import save_file

    from imagen_jax import filesystem
    from imagen_jax.errors import OutputError
    from imagen_jax.text.t5 import stored_name
    from imagen_jax.text.tokenizer import TOKENIZER_FILES
    from imagen_jax.text.weight_files import WeightFolder

    if os.path.exists(out) and not overwrite:
        raise OutputError(f"--out {out} exists; pass --overwrite to replace it")
    names = encoder_tensor_names(folder)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert_t5-", dir=parent)
    try:
        shards: list[list[str]] = []  # tensor names per written shard
        current: dict = {}
        size = total = 0  # bytes in the current shard, in all

        def flush() -> None:
            save_file(current, os.path.join(staging, f"part-{len(shards)}.safetensors"))
            shards.append(list(current))
            current.clear()

        with contextlib.ExitStack() as stack:
            reader = WeightFolder(folder, stack)
            print(f"convert_t5: {len(names)} encoder tensors from {reader.source}", flush=True)
            for i, name in enumerate(names, 1):
                array = reader.get(stored_name(name, reader))
                if current and size + array.nbytes > shard_bytes:
                    flush()
                    size = 0
                current[name] = array
                size += array.nbytes
                total += array.nbytes
                if i % 50 == 0 or i == len(names):
                    print(f"convert_t5: {i}/{len(names)} tensors read", flush=True)
            flush()
        files = _name_shards(staging, shards, total)
        for extra in ("config.json", *TOKENIZER_FILES):
            if filesystem.for_path(folder).exists(os.path.join(folder, extra)):  # a URL folder works too
                shutil.copy(filesystem.local_copy(os.path.join(folder, extra)), os.path.join(staging, extra))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"convert_t5: wrote {', '.join(files)} in {out}", flush=True)
    return files


def _name_shards(staging: str, shards: list[list[str]], total: int) -> list[str]:
    """Renames the part-N files to Hugging Face's names; with several shards writes the index too."""
    if len(shards) == 1:
        os.replace(os.path.join(staging, "part-0.safetensors"), os.path.join(staging, "model.safetensors"))
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(staging, f"part-{i}.safetensors"), os.path.join(staging, name))
        weight_map.update(dict.fromkeys(keys, name))
        files.append(name)
    with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*files, "model.safetensors.index.json"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_t5", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", required=True, help="a Hugging Face T5 folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--shard_gib", type=float, default=2.0, help="largest shard, GiB (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        from imagen_jax.errors import UsageError

        if args.shard_gib <= 0:
            raise UsageError(f"--shard_gib must be > 0, got {args.shard_gib}")
        convert(args.folder, args.out, shard_bytes=int(args.shard_gib * 2**30), overwrite=args.overwrite)
        return 0

    return main_guard("convert_t5", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
