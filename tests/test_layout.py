"""The package's layout as README.md draws it: imports that resolve to files of the checkout, layers
that import only downward, and a native library that loads on first use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Layers, top first (README.md, "Layout"): a module may import its own layer and those below it.
LAYERS = ["__init__.py", "export", "passes", "backends", "runtime"]


def package_modules() -> list[Path]:
    return [REPO / "__init__.py", *sorted(p for folder in LAYERS[1:] for p in (REPO / folder).rglob("*.py"))]


def layer(path: Path) -> int:
    return LAYERS.index(path.relative_to(REPO).parts[0])


def imported_files(path: Path) -> list[tuple[str, Path | None]]:
    """(import as written, the checkout's file it names) for each of the package's imports in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "et_int4"]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("et_int4")):
            if not node.level:
                found.append((f"from {node.module}", None))
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            names = [node.module] if node.module else [alias.name for alias in node.names]
            for name in names:
                target = base.joinpath(*name.split("."))
                text = f"from {'.' * node.level}{node.module or ''} import {name}"
                module = target.with_suffix(".py")
                package = target / "__init__.py"
                found.append((text, module if module.is_file() else package if package.is_file() else None))
    return found


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_resolve_to_checkout_files_of_the_same_or_a_lower_layer(path: Path) -> None:
    for text, target in imported_files(path):
        assert target is not None, f"{path.relative_to(REPO)}: `{text}` names no file of the checkout"
        assert REPO in target.parents, f"{path.relative_to(REPO)}: `{text}` leaves the package"
        assert layer(target) >= layer(path), (
            f"{path.relative_to(REPO)}: `{text}` imports upward, from layer "
            f"{LAYERS[layer(path)]} into {LAYERS[layer(target)]}")


def test_nothing_in_the_checkout_shadows_the_installed_package() -> None:
    assert not (REPO / "et_int4").exists(), "python -m pytest from the root would import it, not the install"


def test_native_library_loads_on_first_use_not_at_import() -> None:
    script = (
        "import et_int4\n"
        "def loaded(): return any('libet_int4' in line for line in open('/proc/self/maps'))\n"
        "print(loaded())\n"
        "print(et_int4.SHIM_GEMM_MAX_M >= 1, loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False", "True", "True"], out
