"""Design checks for src/tuneforge, run by `make lint` (part of `make test`):

- no import cycles between modules (a module importing its own package's
  `__init__` or a submodule of itself is not a cycle), counting imports inside
  functions too, since a deferred import only hides a cycle;
- no underscored name imported from another module (shared pieces are public);
- no function longer than MAX_FUNCTION_LINES, unless a comment on the line
  above its `def` starts with "# long:" and says why.

Prints every finding and exits 1 when there is any. Standard library only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root (root's parent is the import root)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(target module, imported name or '', line) for each internal import in a file."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in mods:
                    found.append((sub, "", node.lineno))
                elif target in mods:
                    found.append((target, alias.name, node.lineno))
    return found


MAX_FUNCTION_LINES = 80


def long_functions(path: Path) -> list[str]:
    """Functions over MAX_FUNCTION_LINES lines (decorators excluded) without a `# long:` reason above them."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            if length > MAX_FUNCTION_LINES and not above.startswith("# long:"):
                found.append(f"{path}:{node.lineno}: function {node.name} is {length} lines "
                             f"(over {MAX_FUNCTION_LINES}; split it, or say why in a '# long:' comment above)")
    return found


def related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return components


def check(root: Path) -> list[str]:
    mods = module_names(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for name, path in mods.items():
        problems += long_functions(path)
        for target, imported, line in imports_of(name, path, mods):
            if imported.startswith("_") and not imported.startswith("__") and target != name:
                problems.append(f"{path}:{line}: imports the private name {imported!r} from {target}")
            if not related(name, target):
                edges[name].add(target)
    for comp in find_cycles(edges):
        problems.append("import cycle: " + " -> ".join(comp))
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "src/tuneforge")
    problems = check(root)
    for line in problems:
        print(line)
    print(f"design check: {len(problems)} problem(s) in {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
