"""imagen_jax.xla_settings: XLA:CPU keeps convolutions out of YNNPACK, set before JAX starts and never over the
user's own XLA_FLAGS."""

import json
import os
import subprocess
import sys

from imagen_jax import xla_settings

# Compiles a convolution's forward pass and weight gradient, reports how XLA:CPU placed them and what JAX sees.
_PROBE = """
import json, os
import imagen_jax
import jax, jax.numpy as jnp
conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
x, w = jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
text = jax.jit(jax.grad(lambda w: jnp.vdot(conv(w, x), conv(w, x)))).lower(w).compile().as_text()
print(json.dumps({"flags": os.environ["XLA_FLAGS"], "ynn": "ynn_fusion" in text, "devices": jax.device_count()}))
"""


def _probe(xla_flags: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=xla_flags)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_measured_jaxlib_gets_the_flag_and_others_get_none():
    assert xla_settings.cpu_flags("0.10.2") == ["--xla_cpu_experimental_ynn_fusion_type=reduce"]
    assert xla_settings.cpu_flags("0.11.0") == []
    assert xla_settings.cpu_flags(None) == []


def test_configure_appends_to_the_users_flags_and_keeps_the_users_choice():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_settings.configure(environ, "0.10.2") == (
        "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type=reduce"
    )
    assert xla_settings.configure(environ, "0.10.2") == environ["XLA_FLAGS"]  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert xla_settings.configure(mine, "0.10.2") == "--xla_cpu_experimental_ynn_fusion_type="
    assert xla_settings.configure({}, "0.11.0") == ""


def test_importing_the_package_keeps_convolutions_out_of_ynnpack_and_the_users_flags_in_force():
    ours = _probe("--xla_force_host_platform_device_count=2")
    assert ours["devices"] == 2 and "ynn_fusion_type=reduce" in ours["flags"]
    assert not ours["ynn"]  # the convolutions (and their weight gradient) run as XLA's own
    users = _probe("--xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    assert users["flags"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert users["ynn"]  # the user's choice holds: YNNPACK takes the convolutions
