"""Export a trained stage's EMA weights and config as plain files (no orbax, no optimizer state).

    python -m imagen_jax.tools.export --workdir runs/base64 --out exports/base64 [--step N] [--overwrite]
    python -m imagen_jax.tools.export --workdir runs/base64_lora --out base64_sks.safetensors --lora_only

Writes OUT/config.json, OUT/ema.safetensors and OUT/export.json (see imagen_jax.stage.export) from the latest
checkpoint of the workdir, or the one at --step. A LoRA run (train.lora_rank) exports its adapters merged into full
weights (an export like any other, its config's lora_rank 0), or with --lora_only its adapters alone: one small
safetensors file OUT whose metadata names its base (train.init_from and a fingerprint of its parameters; see
imagen_jax.stage.lora), for sample.py --lora. The U-Net's text width is read from the config.json of the
stage's T5 folder (config.text.encoder); pass --text_dim when that folder is not on this machine.
Exit status 2 for a bad argument, 1 when the workdir or --out cannot be used; the error is one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def t5_dim(folder: str) -> int:
    """d_model of the T5 in `folder`, from its config.json alone (no weights are read)."""
    from imagen_jax.text import T5Config

    return T5Config.from_json(os.path.join(folder, "config.json")).d_model


def export_workdir(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    text_dim: int | None = None,
    overwrite: bool = False,
    lora_only: bool = False,
) -> dict:
    """Exports checkpoint `step` (default: latest) of `workdir` to `out` (with `lora_only`: a LoRA run's adapters
    alone, to the file `out`); returns the export's metadata."""
    import jax

    from imagen_jax.errors import MissingError, OutputError, StageError
    from imagen_jax.stage import export as export_lib
    from imagen_jax.stage import lora
    from imagen_jax.stage.model import local_mesh, stage_model
    from imagen_jax.stage.stage import checkpoint_config, open_checkpoint, restore_weights

    if lora_only:
        if os.path.exists(out) and (os.path.isdir(out) or not overwrite):
            raise OutputError(f"{out}: already exists (--overwrite replaces a file)")
    else:
        export_lib.check_writable(out, overwrite=overwrite)  # before the (possibly long) restore
    checkpointer, step = open_checkpoint(workdir, step)
    try:
        config = checkpoint_config(checkpointer, workdir, step)
        if text_dim is None:
            try:
                text_dim = t5_dim(config.text.encoder)
            except FileNotFoundError as e:
                raise MissingError(f"{e} (the stage's T5 folder; pass --text_dim to export without it)") from None
        if lora_only and not lora.rank(config):
            raise StageError(f"{workdir} is not a LoRA run (train.lora_rank is 0): export its full weights instead")
        model = stage_model(config, text_dim, local_mesh())
        params = restore_weights(checkpointer, workdir, step, config, model, text_dim, merge=not lora_only)
    finally:
        checkpointer.close()
    if lora_only:
        base = config.train.init_from
        return lora.write_adapters(
            out, config, jax.device_get(params), base=base, base_params=model.abstract_params, step=step
        )
    if lora.rank(config):  # the adapters are in the weights now: the export is a plain stage
        config = config.copy_and_resolve_references()
        config.train.lora_rank = 0
    export_lib.write_export(
        out,
        config,
        jax.device_get(params),
        step=step,
        text_dim=text_dim,
        source=workdir if "://" in workdir else os.path.abspath(workdir),
        overwrite=overwrite,
    )
    return export_lib.read_metadata(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="the stage's training workdir")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--text_dim", type=int, default=None, help="T5 width (default: the T5 folder's d_model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument(
        "--lora_only",
        action="store_true",
        help="a LoRA run's adapters alone, to the safetensors file --out (default: merged into full weights)",
    )
    args = parser.parse_args(argv)
    if args.step is not None and args.step < 0:
        parser.error(f"--step must be >= 0, got {args.step}")
    if args.text_dim is not None and args.text_dim < 1:
        parser.error(f"--text_dim must be >= 1, got {args.text_dim}")
    from imagen_jax.cli import main_guard

    def body() -> int:
        metadata = export_workdir(
            args.workdir,
            args.out,
            step=args.step,
            text_dim=args.text_dim,
            overwrite=args.overwrite,
            lora_only=args.lora_only,
        )
        print(json.dumps({"out": os.path.abspath(args.out), **metadata}))
        return 0

    return main_guard("export", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
