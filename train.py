"""Train one Imagen stage.

    python train.py --config configs/demo.py --workdir runs/demo [--config.train.batch_size=64 ...]

A workdir that already holds checkpoints resumes from the latest one. On a multi-host TPU pod slice run
the same command on every host with --distributed.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/<stage>.py")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here (local or gs://)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    args, overrides = parser.parse_known_args(argv)

    from imagen_jax import config as config_lib

    try:
        config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    except config_lib.ConfigError as e:
        parser.exit(2, f"train.py: error: {e}\n")

    import jax

    if args.distributed:
        jax.distributed.initialize()
    from imagen_jax.data.pipeline import NoExamplesError
    from imagen_jax.train.checkpoint import CheckpointError
    from imagen_jax.train.loop import TrainingDiverged, run

    try:
        run(config, args.workdir)  # Returns normally after SIGTERM too: checkpoint written, exit status 0.
    except (config_lib.ConfigError, FileNotFoundError, KeyError, CheckpointError, TrainingDiverged,
            NoExamplesError) as e:  # one line
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        parser.exit(1, f"train.py: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
