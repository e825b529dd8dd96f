"""Train one Imagen stage.

    python train.py --config configs/demo.py --workdir runs/demo [--config.train.batch_size=64 ...]

A workdir that already holds checkpoints resumes from the latest one. On a multi-host TPU pod slice run
the same command on every host with --distributed.

The whole config (choices, sizes, the shards, the T5 folder's config.json) and the workdir are checked before
anything heavy loads, and the workdir is created only then. Errors are one line on stderr, `train.py: error:
...`: exit status 2 for a bad config file, key or value given on the command line, 1 for everything found
later (data, checkpoints, divergence). A SIGTERM ends the run at a step boundary with a checkpoint, exit 0.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/<stage>.py")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here (local or gs://)")
    parser.add_argument("--distributed", action="store_true", help="join a multi-host run (parallel/distributed.py)")
    args, overrides = parser.parse_known_args(argv)

    from imagen_jax import config as config_lib
    from imagen_jax.cli import main_guard
    from imagen_jax.errors import ConfigError, UsageError

    def body() -> int:
        try:
            config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        if args.distributed:
            from imagen_jax.parallel import distributed

            distributed.initialize()
        from imagen_jax.train.loop import run

        run(config, args.workdir)  # Returns normally after SIGTERM too: checkpoint written, exit status 0.
        return 0

    return main_guard("train.py", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
