"""The package's folders are its layers (ARCHITECTURE.md): imports point down only.

Every module's imports are read from its syntax tree -- those inside functions too, since
a function-level import is still a dependency, and it is where cycles used to hide -- and
checked against the layer order.  The checker is tested on a planted tree as well, so a
rule it stops enforcing fails here rather than passing silently.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unicon_dist"

# rank of each top-level folder (and root module) of the package; a module may import
# modules of a lower rank and of its own folder, nothing else.  The package's __init__
# is the facade over all of them and is not ranked.
RANKS = {
    "version": 0,
    "compat": 0,
    "math": 1,
    "io": 2,
    "data": 3,
    "solver": 4,
    "execution": 5,
    "baselines": 5,
    "apps": 6,
    "integrations": 6,
}
FACADE = "__init__"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path):
    """(line, imported module, imported names) for every import in the file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target, tuple(a.name for a in node.names)


def check_tree(root: Path, ranks: dict = RANKS) -> list[str]:
    """Every violation of the layering in the package at ``root``, as readable lines."""
    top = root.name
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def layer(mod: str):
        parts = mod.split(".")
        return FACADE if len(parts) == 1 else parts[1]

    for mod, path in modules.items():
        here = layer(mod)
        for line, target, names in imports_of(path, root):
            if target != top and not target.startswith(top + "."):
                continue
            # ``from pkg import sub`` depends on the submodule itself
            deps = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
            for dep in deps:
                if dep in modules and dep != mod:
                    graph[mod].add(dep)
                there = layer(dep)
                where = f"{path.relative_to(root.parent)}:{line}"
                if here == FACADE:
                    continue
                if there == FACADE:
                    problems.append(f"{where}: {mod} imports the package facade {dep}")
                    continue
                if here not in ranks or there not in ranks:
                    problems.append(f"{where}: {mod} -> {dep}: unranked folder ({here!r} or {there!r})")
                    continue
                if here != there and ranks[there] >= ranks[here]:
                    problems.append(f"{where}: {mod} ({here}, rank {ranks[here]}) imports {dep} "
                                    f"({there}, rank {ranks[there]}): upward or sideways")
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private and layer(target) != here and here != FACADE:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {mod} imports private "
                                f"{', '.join(private)} from another package ({target})")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan 1972), iteratively."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_package_layers_point_down():
    problems = check_tree(PACKAGE)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_folder_is_ranked():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    roots = {p.stem for p in PACKAGE.glob("*.py")} - {FACADE}
    assert folders | roots <= set(RANKS), f"unranked: {sorted((folders | roots) - set(RANKS))}"


def _plant(tmp_path, files: dict) -> Path:
    root = tmp_path / "unicon_dist"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


def test_checker_catches_an_upward_import_inside_a_function(tmp_path):
    root = _plant(tmp_path, {
        "math/kernels.py": "def f():\n    from ..solver.estimator import UniCon\n",
        "solver/estimator.py": "from ..math.kernels import f\n",
    })
    problems = check_tree(root)
    assert any("math.kernels (math, rank 1) imports unicon_dist.solver.estimator" in p for p in problems), problems
    assert any(p.startswith("import cycle") for p in problems), problems


def test_checker_catches_a_cycle_within_a_layer_and_private_imports(tmp_path):
    root = _plant(tmp_path, {
        "math/a.py": "from .b import g\n",
        "math/b.py": "def g():\n    from . import a\n",
        "solver/s.py": "from ..math.a import _hidden\n",
        "apps/x.py": "import unicon_dist\n",
    })
    problems = check_tree(root)
    assert "import cycle: unicon_dist.math.a -> unicon_dist.math.b" in problems, problems
    assert any("imports private _hidden" in p for p in problems), problems
    assert any("imports the package facade" in p for p in problems), problems
    assert not check_tree(_plant(tmp_path / "clean", {"math/a.py": "x = 1\n", "solver/s.py": "from ..math import a\n"}))


def test_import_does_not_load_ray_or_dask():
    code = "import sys, unicon_dist as ud; ud.RayExecutor; print(sorted(m for m in ('ray', 'dask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_old_flat_paths_are_the_new_modules():
    code = ("import warnings, unicon_dist as ud\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import unicon_dist.model as old\n"
            "    from unicon_dist.streamed import weighted_cross_product\n"
            "import unicon_dist.solver.estimator as new\n"
            "assert old is new and weighted_cross_product is ud.weighted_cross_product\n"
            "print(sorted({str(x.message).split()[0] for x in w}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['unicon_dist.model', 'unicon_dist.streamed']", out


MAX_LINES = 650  # "no module over ~600 lines" (issue 17), with a little room for docstrings


def test_no_module_is_a_monolith():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    large = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not large, f"modules over {MAX_LINES} lines: {large}"
