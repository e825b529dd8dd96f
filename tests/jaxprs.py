"""Walking a jaxpr for tests that check what a program computes (its primitives, their dtypes)."""

from __future__ import annotations

from collections.abc import Iterator


def equations(jaxpr) -> Iterator:
    """Every equation of a jaxpr, those of nested jaxprs included (remat regions, custom VJPs, scans)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)
