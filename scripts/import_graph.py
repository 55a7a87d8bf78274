"""The import graph between the project's modules: floors (modules on the longest import chain), edges,
and the largest module. Every `import` statement that runs counts, at any depth (a function's lazy import
too); those under `if TYPE_CHECKING:` do not (they are for the type checker and never run).

    python scripts/import_graph.py [ROOT] [--packages mame_core server loadtest] [--chain]
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

PACKAGES = ("mame_core", "server", "loadtest")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages (a package is its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that importing `name` loads last: the name itself, or its closest parent."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def edges_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        targets |= {t for t in (imported(n, modules) for n in names) if t is not None and t != module}
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=".", type=Path)
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    parser.add_argument("--chain", action="store_true", help="print the longest chain")
    args = parser.parse_args()
    modules = module_files(args.root, tuple(args.packages))
    graph = {m: edges_of(m, p, modules) for m, p in modules.items()}

    sys.setrecursionlimit(10_000)
    on_path: set[str] = set()

    @cache
    def longest(module: str) -> tuple[str, ...]:
        # An import cycle is cut where it closes (Python loads it once).
        on_path.add(module)
        chains = [longest(t) for t in graph[module] if t not in on_path]
        on_path.discard(module)
        return (module, *max(chains, key=len, default=()))

    chain = max((longest(m) for m in sorted(graph)), key=len)
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules.items()}
    big = max(sizes, key=sizes.get)
    print(f"modules: {len(modules)}")
    print(f"floors (modules on the longest import chain): {len(chain)}")
    print(f"import edges between project modules: {sum(len(t) for t in graph.values())}")
    print(f"largest module: {big} ({sizes[big]} lines)")
    for package in args.packages:
        within = {m: s for m, s in sizes.items() if m == package or m.startswith(package + ".")}
        if within:
            top = max(within, key=within.get)
            print(f"  largest in {package}: {top} ({within[top]} lines)")
    if args.chain:
        print("longest chain: " + " -> ".join(chain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
