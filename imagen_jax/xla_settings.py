"""XLA compiler settings the package runs with, set in XLA_FLAGS when `imagen_jax` is imported (before JAX starts
its backends, which read XLA_FLAGS once), without importing JAX.

XLA:CPU in jax 0.10 hands convolutions, matrix products and reductions to YNNPACK by default. Its convolutions
are slow here: on a 2-core AVX2 CPU a 3x3 convolution's forward pass ran at 60-125 GFLOP/s and its weight
gradient at 7-77, against 145-180 for both with XLA's Eigen convolutions; YNNPACK's reductions are faster than
XLA's own loops. `--xla_cpu_experimental_ynn_fusion_type=reduce` keeps YNNPACK for reductions only, which made a
training step of the tiny32 U-Net 1.5x and base64-small's 1.6x faster (benchmarks/README.md). Only XLA:CPU reads
the flag; TPU and GPU compiles ignore it.

A flag XLA does not know stops the process at start-up, so it is only set for the jaxlib versions it was
measured with, and never over a value the user put in XLA_FLAGS.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "reduce"
MEASURED_JAXLIB = ("0.10.",)  # release prefixes whose XLA knows the flag (jax is pinned to 0.10.2)


def cpu_flags(jaxlib_version: str | None) -> list[str]:
    """The XLA_FLAGS entries to add for this jaxlib (none for an unmeasured version)."""
    if jaxlib_version is None or not jaxlib_version.startswith(MEASURED_JAXLIB):
        return []
    return [f"{YNN_FUSION_FLAG}={YNN_FUSION_TYPES}"]


def configure(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> str:
    """Adds `cpu_flags` to environ['XLA_FLAGS'] unless the user set that flag already; returns the new value."""
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            pass  # no jaxlib: nothing to configure
    flags = environ.get("XLA_FLAGS", "")
    missing = [flag for flag in cpu_flags(jaxlib_version) if flag.split("=")[0] not in flags]
    if missing:
        environ["XLA_FLAGS"] = " ".join([flags.strip(), *missing]).strip()
    return environ.get("XLA_FLAGS", "")


configure()
