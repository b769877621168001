"""The house's layering, checked (in the spirit of Ray's ``test_circular_imports.py``).

Why: a library that a newcomer can find their way in has a direction. ``config`` is at the
bottom; ``data``, ``model``, ``losses``, ``metrics`` and ``tracking`` build on it; the
inference path, evaluation and training sit above those; tuning and serving on top. An import
that points the wrong way is how cycles and "importing the model pulls in Ray" creep in, so
these rules are checked on the source (every ``import`` statement, including the lazy ones
inside functions) rather than left to review.

Two kinds of check:

* static, on the AST of every module in ``platform/ageray``: no cycle among module-level
  imports, and each package imports only the layers it is allowed to (lazy imports count:
  a lazy import of a higher layer is still a dependency on it);
* dynamic, in a fresh interpreter: importing ``ageray``, ``ageray.model`` and ``ageray.data``
  loads neither Ray nor MLflow (the library's in-process loop must run where they are absent).
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "platform"
PKG = ROOT / "ageray"

# Which first-level parts of ageray each part may import (besides itself and `config`).
# "*" means anything. Keys are first-level names: a package (data, model, training, ...) or a
# module (losses, metrics, ...). Parts not listed may import anything below the top layer.
LOWER = {"config", "redaction"}  # redaction: credentials out of what is logged; imports nothing
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "redaction": set(),
    "data": LOWER,
    "model": LOWER,
    "losses": LOWER | {"model"},  # the losses read the model's Formulation (label space)
    "metrics": LOWER,
    "tracking": LOWER,
    # the one path, its loader (MLflow URIs through tracking), export and batch prediction
    "inference": LOWER | {"data", "model", "metrics", "losses", "tracking"},
    # reports, their tables and plots, fairness, traits, cross-validation summaries
    "evaluation": LOWER | {"data", "model", "metrics", "inference", "tracking"},
    # aliases, promotion (judged by evaluation), the pyfunc wrapper (the one path)
    "registry": LOWER | {"tracking", "evaluation", "inference", "model"},
    "localcluster": set(),  # the local multi-node Ray: subprocesses and sockets only
}
# Nothing below these may import them.
TOP = {"tuning", "serving", "cli"}
FORBIDDEN_FOR_EVALUATION = {"training", "tuning", "serving"}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Every ``ageray.*`` module that ``module`` imports (submodule names resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level, including inside try/if blocks, but not TYPE_CHECKING
        flat: list[ast.stmt] = []
        stack = list(nodes)
        while stack:
            n = stack.pop()
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                continue
            if isinstance(n, (ast.If, ast.Try)):
                stack.extend(n.body + n.orelse + getattr(n, "finalbody", []))
                for h in getattr(n, "handlers", []):
                    stack.extend(h.body)
            flat.append(n)
        nodes = flat
    for n in nodes:
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names if a.name.startswith("ageray"))
        elif isinstance(n, ast.ImportFrom):
            target = _resolve(module, is_pkg, n)
            if not target.startswith("ageray"):
                continue
            found.add(target)
            for a in n.names:  # `from ageray.data import loader` imports a submodule
                candidate = f"{target}.{a.name}"
                if candidate in MODULES:
                    found.add(candidate)
    return {f for f in found if f != module}


MODULES = dict(_modules())


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_package_is_where_the_house_says() -> None:
    assert "ageray" in MODULES and "ageray.config" in MODULES
    assert not (ROOT / "__init__.py").exists(), "platform/ must not be a package (stdlib clash)"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a module graph, ignoring a package's edges to its own submodules (that is
    how packages re-export; a submodule importing its package back is what we look for)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # package -> own submodule
                continue
            if state.get(nxt) == 1:
                cyc = [*stack[stack.index(nxt) :], nxt]
                if not all(b.startswith(a + ".") for a, b in itertools.pairwise(cyc)):
                    cycles.append(cyc)
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


@pytest.mark.parametrize("scope", ["module-level", "all"])
def test_no_import_cycle(scope: str) -> None:
    """Module-level cycles break imports; cycles through lazy (in-function) imports do not
    break anything today, but they mean two modules each need the other: one job split in
    two, or a rule in the wrong layer."""
    top = scope == "module-level"
    graph = {m: _imports(m, p, top_level_only=top) & set(MODULES) for m, p in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_lower_layers_import_only_what_they_may(part: str) -> None:
    allowed = ALLOWED[part] | {part}
    wrong = []
    for module, path in MODULES.items():
        if _part(module) != part:
            continue
        for target in _imports(module, path, top_level_only=False):
            if target == "ageray":
                continue
            if _part(target) not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, f"{part} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_evaluation_does_not_import_training_or_higher() -> None:
    wrong = [
        f"{m} imports {t}"
        for m, p in MODULES.items()
        if _part(m) in ("evaluation", "inference")
        for t in _imports(m, p, top_level_only=False)
        if _part(t) in FORBIDDEN_FOR_EVALUATION
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_top_imports_the_top() -> None:
    wrong = [
        f"{m} imports {t}"
        for m, p in MODULES.items()
        if _part(m) not in TOP
        for t in _imports(m, p, top_level_only=False)
        if _part(t) in TOP and _part(t) != _part(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_importing_the_library_imports_neither_ray_nor_mlflow() -> None:
    code = (
        "import sys, ageray, ageray.model, ageray.data, ageray.config, ageray.metrics, "
        "ageray.losses\n"
        "import importlib, pkgutil\n"
        "import ageray.data as d\n"
        "for m in pkgutil.iter_modules(d.__path__):\n"
        "    importlib.import_module('ageray.data.' + m.name)\n"
        "heavy = sorted(k for k in ('ray', 'mlflow', 'boto3', 'fastapi') if k in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent
    )
    assert out.stdout.strip() == "", f"imported at package import: {out.stdout.strip()}"


def test_every_module_imports_first() -> None:
    """Ray's check: every module, imported first, works. A cycle that only bites when it is
    entered from one side shows up here. Third-party packages stay loaded between rounds (a
    fresh interpreter per module would pay torch's import dozens of times); every ``ageray``
    module is dropped from ``sys.modules`` before each round, so each round starts with the
    library unimported."""
    mods = sorted(m for m in MODULES if m != "ageray")
    code = (
        "import importlib, sys, traceback\n"
        "import torch, numpy  # noqa: the heavy third-party imports, kept between rounds\n"
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'ageray' or k.startswith('ageray.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as exc:\n"
        "        bad.append(f'{m}: {exc!r}')\n"
        "print('\\n'.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent
    )
    assert out.stdout.strip() == "", out.stdout
