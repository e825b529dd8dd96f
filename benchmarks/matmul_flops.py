"""FLOPs of convolutions and matrix products in a traced JAX function: the rule side_by_side.py applies to both
projects (torch's FlopCounterMode counts the same two kinds of op on the peer's side).

XLA's cost analysis also counts element-wise work, reductions and the optimizer's arithmetic, which torch's counter
does not see; counting only `dot_general` and `conv_general_dilated` in the jaxpr (2 x multiply-adds each, nested
jaxprs included, scans times their length) compares like with like. A padded convolution counts its whole kernel
window at every output position, as torch's counter does (XLA's skips the taps that fall on padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core


def dot_general_flops(eqn: core.JaxprEqn) -> int:
    """2 x output elements x contracted length."""
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


def conv_flops(eqn: core.JaxprEqn) -> int:
    """2 x output elements x (kernel window x kernel input features). Holds for the transposed convolutions of the
    backward pass too, where batch and feature roles swap: the kernel operand's input-feature and spatial axes are
    always what each output element sums over."""
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) axis indices
    rhs = eqn.invars[1].aval.shape
    window = math.prod(rhs[d] for d in rhs_spec[2:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * window * rhs[rhs_spec[1]]


COUNTED = {"dot_general": dot_general_flops, "conv_general_dilated": conv_flops}


def jaxpr_flops(jaxpr: core.Jaxpr) -> int:
    """Counted FLOPs of `jaxpr`, descending into every nested jaxpr (jit, remat, custom rules, scan x length;
    the costlier branch of a cond)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in COUNTED:
            total += COUNTED[eqn.primitive.name](eqn)
            continue
        if eqn.primitive.name == "cond":
            total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
            continue
        if eqn.primitive.name == "while":
            raise ValueError("a while loop's trip count is unknown: its FLOPs cannot be counted")
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += times * sum(jaxpr_flops(sub) for sub in _subjaxprs(eqn.params))
    return total


def _subjaxprs(params: dict[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def function_flops(fn: Callable, *args: Any) -> int:
    """Counted FLOPs of one call `fn(*args)` (arrays or ShapeDtypeStructs; nothing is computed)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
