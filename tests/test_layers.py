"""The package's layering, enforced: a module imports only from its own layer or the layers below it.

Every `import` statement of every module counts, function-local ones included (a local import that reaches up is a
cycle hidden from the import system, not removed). Layers, bottom to top:

0. `constants`, `utils`, `_compat`: no project imports at all below this line
1. `tasks`, `data`, `models`, `metrics`: what the data and models are
2. `lm_head`, `scoring`, `masking`: the LM-head step, per-token NLL and the mask rules
3. `collator`, `anchor`, `sandbox`, `verifiers`, `sharding`: training-time parts and answer checking
4. `generation`, `evaluation`, `hub`, `sft`: the workflows
5. `study`, `demo`: workflows made of workflows
6. `commands`, `cli`: the command line

A new top-level module or subpackage must be given a layer here, which is the point: where it sits is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "trl_pplmask"

LAYERS = [
    {"constants", "utils", "_compat"},
    {"tasks", "data", "models", "metrics"},
    {"lm_head", "scoring", "masking"},
    {"collator", "anchor", "sandbox", "verifiers", "sharding"},
    {"generation", "evaluation", "hub", "sft"},
    {"study", "demo"},
    {"commands", "cli"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def _component(module: str) -> str | None:
    """`trl_pplmask.hub.card` -> `hub`; `trl_pplmask` itself -> `None` (its lazy exports name every layer)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "trl_pplmask" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every project import in `source`, the code of `module`, wherever it stands."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("trl_pplmask")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").startswith("trl_pplmask"):
                target = node.module
            else:
                continue
            # `from . import x` / `from .. import x`: each name may be a module of that package
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            found += [(node.lineno, name) for name in names]
    return found


def _file_imports(path: Path) -> list[tuple[int, str]]:
    return _imports(path.read_text(), _module_name(path), path.name == "__init__.py")


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_component_has_a_layer():
    components = {_component(_module_name(p)) for p in MODULES} - {None}
    unplaced = sorted(components - set(LAYER))
    assert not unplaced, f"give these a layer in tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = _component(_module_name(path))
    if own is None:
        return
    upward = []
    for line, target in _file_imports(path):
        component = _component(target)
        if component is not None and component in LAYER and LAYER[component] > LAYER[own]:
            upward.append(f"line {line}: {target} (layer {LAYER[component]}) from {own} (layer {LAYER[own]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_check_sees_relative_and_local_imports():
    """The parser resolves relative imports and finds those inside functions (a check that cannot fail is none)."""
    local = "import os\n\ndef f():\n    from ..cli import main\n"
    assert _imports(local, "trl_pplmask.hub.card") == [(4, "trl_pplmask.cli")]
    assert _imports("from . import scoring\n", "trl_pplmask.collator") == [(1, "trl_pplmask.scoring")]
    assert _imports("from .card import x\n", "trl_pplmask.hub", is_package=True) == [(1, "trl_pplmask.hub.card")]
    assert _imports("from trl_pplmask.cli import main\n", "trl_pplmask.masking") == [(1, "trl_pplmask.cli")]


# --------------------------------------------------------------------------------------------------------------------
# The lazy packages: `_EXPORTS` (what `lazy_exports` imports at run time) and the `if TYPE_CHECKING:` imports (what
# type checkers, editors and the layer check above see) must name the same things, or one of them lies
# --------------------------------------------------------------------------------------------------------------------
def _lazy_tables(path: Path) -> tuple[dict[str, str], dict[str, str]] | None:
    """(`_EXPORTS`, name -> module of the TYPE_CHECKING imports, written as `_EXPORTS` writes it), or None."""
    tree = ast.parse(path.read_text())
    exports, typed = None, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level >= 1, ast.dump(stmt)
                # `from .config import x` -> "config"; `from ..hub.self_output import x` -> ".hub.self_output"
                module = "." * (stmt.level - 1) + (stmt.module or "")
                typed.update({alias.name: module for alias in stmt.names})
    return None if exports is None else (exports, typed)


LAZY_PACKAGES = [p for p in MODULES if p.name == "__init__.py" and _lazy_tables(p) is not None]


def test_there_are_lazy_packages_to_check():
    assert {p.parent.name for p in LAZY_PACKAGES} >= {"trl_pplmask", "evaluation", "generation"}


@pytest.mark.parametrize("path", LAZY_PACKAGES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lazy_exports_and_type_checking_imports_agree(path):
    import importlib

    exports, typed = _lazy_tables(path)
    assert typed == exports, "the TYPE_CHECKING block and _EXPORTS differ (add or remove the name in both)"
    package = importlib.import_module(_module_name(path))
    assert package.__all__ == sorted(exports)


# Modules whose whole point is private borrowing, imported by name: `_compat` holds every private name of other
# packages in one place (see its docstring)
PRIVATE_MODULES_ALLOWED = {"_compat"}


def _private_imports(source: str) -> list[tuple[int, str]]:
    """(line, name) of every `_name` a project import in `source` takes from another module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("trl_pplmask")):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            found += [(node.lineno, name) for name in private if name not in PRIVATE_MODULES_ALLOWED]
    return found


def test_no_private_name_crosses_a_module_boundary():
    """`from .x import _name` in another module means `_name` is not private: make it public (documented) or move it.
    The package's own `_`-prefixed modules (`_compat`, `commands._args`, ...) are package-internal and allowed."""
    assert _private_imports("from .scoring import _x, y\nfrom . import _compat\n") == [(1, "_x")]
    crossing = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in MODULES
        for line, name in _private_imports(path.read_text())
    ]
    assert not crossing, "private names imported from another module:\n" + "\n".join(crossing)
