"""Export a trained stage's EMA weights and config as plain files (no orbax, no optimizer state).

    python -m imagen_jax.tools.export --workdir runs/base64 --out exports/base64 [--step N] [--overwrite]

Writes OUT/config.json, OUT/ema.safetensors and OUT/export.json (see imagen_jax.export) from the latest
checkpoint of the workdir, or the one at --step. The U-Net's text width is read from the config.json of the
stage's T5 folder (config.text.encoder); pass --text_dim when that folder is not on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import ml_collections
from flax import nnx

from imagen_jax import export as export_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.pipeline import checkpoint_config
from imagen_jax.text import T5Config
from imagen_jax.train import state as state_lib
from imagen_jax.train.checkpoint import Checkpointer, checkpoint_dir


def t5_dim(folder: str) -> int:
    """d_model of the T5 in `folder`, from its config.json alone (no weights are read)."""
    return T5Config.from_json(os.path.join(folder, "config.json")).d_model


def export_workdir(workdir: str, out: str, *, step: int | None = None, text_dim: int | None = None,
                   overwrite: bool = False) -> dict:
    """Exports checkpoint `step` (default: latest) of `workdir` to `out`; returns the export's metadata."""
    export_lib.check_writable(out, overwrite=overwrite)  # before the (possibly long) restore
    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False, read_only=True)
    try:
        steps = list(checkpointer.manager.all_steps())
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {checkpoint_dir(workdir)} (train the stage first, or check --workdir)"
            )
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {checkpoint_dir(workdir)} (steps: {sorted(steps)})"
            )
        config = checkpoint_config(checkpointer, workdir, step)
        if text_dim is None:
            try:
                text_dim = t5_dim(config.text.encoder)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e} (the stage's T5 folder; pass --text_dim to export without it)") from None
        try:
            params = checkpointer.restore_ema(step, _ema_target(config, text_dim))
        except ValueError as e:  # e.g. a wrong --text_dim: orbax names the shapes, not the cause
            raise ValueError(f"{checkpoint_dir(workdir)}/{step}: EMA weights do not fit the model of the saved "
                             f"config with text_dim={text_dim}: {e}") from None
    finally:
        checkpointer.close()
    export_lib.write_export(out, config, jax.device_get(params), step=step, text_dim=text_dim,
                            source=workdir if "://" in workdir else os.path.abspath(workdir), overwrite=overwrite)
    return export_lib.read_metadata(out)


def _ema_target(config: ml_collections.ConfigDict, text_dim: int) -> dict:
    """The EMA params' ShapeDtypeStructs, replicated over this host's devices (as pipeline.Stage.load)."""
    abstract_model = nnx.eval_shape(lambda: state_lib.build_model(config, text_dim))
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices())
    replicated = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_params)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the stage's training workdir")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--text_dim", type=int, default=None, help="T5 width (default: the T5 folder's d_model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    args = parser.parse_args(argv)
    if args.step is not None and args.step < 0:
        parser.error(f"--step must be >= 0, got {args.step}")
    if args.text_dim is not None and args.text_dim < 1:
        parser.error(f"--text_dim must be >= 1, got {args.text_dim}")
    try:
        metadata = export_workdir(args.workdir, args.out, step=args.step, text_dim=args.text_dim,
                                  overwrite=args.overwrite)
    except (OSError, ValueError, KeyError) as e:  # missing or unreadable checkpoints, an unwritable --out
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        message = "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(e).__name__
        parser.exit(1, f"export: error: {message}\n")
    print(json.dumps({"out": os.path.abspath(args.out), **metadata}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
