"""House rules that a reviewer would otherwise check by eye: imports run downward only.

Layers, bottom to top: models, diffusion, text, data, parallel, eval (the building blocks) < stage (a U-Net of the
cascade with its config, checkpoint and sampling) < train, cascade < tools and the entry points. The building
blocks never import the stage, train, the cascade or tools; the stage never imports train, the cascade or
tools; the cascade never imports train. Checked on the source (every `import` statement, also inside functions),
so a deferred import cannot hide an upward one.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDING_BLOCKS = ("models", "diffusion", "text", "data", "parallel", "eval")
UPPER = ("stage", "train", "cascade", "tools", "sample_files")
FORBIDDEN = {
    **{block: UPPER for block in BUILDING_BLOCKS},
    "stage": ("train", "cascade", "tools", "sample_files"),
    "cascade": ("train", "tools"),
    "train": ("cascade", "tools", "sample_files"),
}


def _unit(module: str) -> str | None:
    """'imagen_jax.stage.model' -> 'stage'; 'imagen_jax.cascade' -> 'cascade'; other packages -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "imagen_jax" and len(parts) > 1 else None


def _imports(path: str, module: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: -node.level]
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def upward_imports(root: str) -> list[str]:
    """'module imports target' for every import in imagen_jax/ under `root` that breaks the layering."""
    violations = []
    for folder, _, files in os.walk(os.path.join(root, "imagen_jax")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            unit = _unit(module)
            for target in sorted(_imports(path, module)):
                if _unit(target) in FORBIDDEN.get(unit, ()):
                    violations.append(f"{module} imports {target}")
    return violations


def test_imports_run_downward():
    assert upward_imports(REPO) == []


def test_the_check_finds_an_upward_import(tmp_path):
    """Yesterday's layout (the cascade in pipeline.py, importing train/) fails the check; a clean one passes."""
    package = tmp_path / "imagen_jax"
    (package / "models").mkdir(parents=True)
    (package / "models" / "unet.py").write_text("import jax\nfrom imagen_jax.models import layers\n")
    (package / "cascade.py").write_text("from imagen_jax.stage.stage import Stage\n")
    assert upward_imports(str(tmp_path)) == []
    (package / "cascade.py").write_text("def load():\n    from imagen_jax.train.step import make_apply_fn\n")
    (package / "models" / "unet.py").write_text("from ..tools import demo\n")
    assert upward_imports(str(tmp_path)) == [
        "imagen_jax.cascade imports imagen_jax.train.step",
        "imagen_jax.cascade imports imagen_jax.train.step.make_apply_fn",
        "imagen_jax.models.unet imports imagen_jax.tools",
        "imagen_jax.models.unet imports imagen_jax.tools.demo",
    ]


@pytest.mark.parametrize("name", ["cascade.py", "pipeline.py"])
def test_no_module_called_pipeline_outside_data(name):
    """'pipeline' means the data pipeline only: the cascade lives in cascade.py."""
    assert os.path.exists(os.path.join(REPO, "imagen_jax", name)) == (name == "cascade.py")
