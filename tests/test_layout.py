"""The package's shape: imports form a DAG (module-level and lazy imports alike), the layers only reach down
(``kernels ← model ← generation ← shells``; training never uses generation), and files stay readable in size."""

from __future__ import annotations

import ast
from pathlib import Path

import af3

ROOT = Path(af3.__file__).parent
#: Files allowed over MAX_LINES, each with the reason it is one file.
LONG_FILES: dict[str, str] = {}
MAX_LINES = 520
#: The one upward edge: AF3Model.generate is the transformers-style entry point to the Engine's loop.
ALLOWED_UP = {("af3.model.af3", "af3.generation.batch_generate")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every af3 module ``path`` imports anywhere in the file (top level, functions, TYPE_CHECKING blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_imports_form_a_dag():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "af3"


def test_layers_only_reach_down():
    g = graph()
    # The foundation: plain modules that know nothing of the model, generation or training.
    base = {"config", "config_checks", "errors", "features", "system", "files", "fetch", "audio", "audio_decode",
            "audio_probe", "audio_sources", "chat", "processor", "segments"}
    below = {
        "kernels": {"system"},  # a leaf: knows nothing of the model
        "model": {"kernels", "config", "config_checks", "errors", "features", "system", "files"},
        "generation": {"model", "kernels"} | base,
    }
    for name, deps in g.items():
        own = layer(name)
        for dep in deps:
            other = layer(dep)
            if other == own or (name, dep) in ALLOWED_UP:
                continue
            if own in below:
                assert other in below[own], f"{name} imports {dep}"
            if own == "training":
                assert other != "generation", f"{name} imports {dep}"
            if own in base:
                assert other not in ("model", "generation", "training", "kernels"), f"{name} imports {dep}"


def test_files_stay_readable_in_size():
    too_long = {}
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_FILES:
            too_long[rel] = n
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"
