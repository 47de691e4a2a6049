"""The house stays easy to change: imports go one way, no module grows into a room nobody can read, and the code
is lint- and format-clean under the configured ruff."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ct_siglip"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (top level or inside functions), by their full names."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import checkpoint`: a module
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, set(modules)) for name, path in modules.items()}


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_lazy_and_submodule_imports():
    graph = import_graph()
    assert "ct_siglip.runtime" in graph["ct_siglip.trainer"] or "ct_siglip.runtime" in graph["ct_siglip.step"]
    assert "ct_siglip.checkpoint" in graph["ct_siglip.trainer"]  # `from . import checkpoint as ckpt`
    assert "ct_siglip.demo" in graph["ct_siglip.train"]  # imported inside main()
    assert graph["ct_siglip.runtime"] == set()  # the helpers everything may import import nothing of ours


def test_the_package_import_graph_is_acyclic():
    """No module imports, directly or through others, a module that imports it back (lazy imports included:
    an import hidden in a function is still an arrow a reader has to follow)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_model_library_imports_without_the_trainer():
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for module in ("ct_siglip.model", "ct_siglip.image_tower", "ct_siglip.text_tower", "ct_siglip.loss",
                   "ct_siglip.data", "ct_siglip.evaluate", "ct_siglip.feature_cache"):  # fmt: skip
        assert not reach(module) & {"ct_siglip.trainer", "ct_siglip.train"}, module


def test_every_module_imports_in_a_fresh_process():
    names = sorted(n for n in package_modules() if not n.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_module_is_over_600_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *ROOT.glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    beside = Path(sys.executable).with_name("ruff")  # the test environment's pinned ruff first
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


DOCS = ("README.md", "README_SIGLIP_TRAINING.md", "BENCHMARKS.md", "benchmarks/README.md", "docs/benchmarks_howto.md")


def resolve(dotted: str) -> object:
    """`a.b.c` -> the module `a.b` attribute `c` (or the module `a.b.c`), importing the longest module prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_name_the_docs_import_or_name_resolves():
    """What the guide shows (`from ct_siglip.x import a, b`, `ct_siglip.x.name`) imports from where it says, and
    the top-level script keeps the public names of the original trainer."""
    import re

    names: set[str] = {f"siglip_trainer.{n}" for n in ("TextEncoder", "ImageEncoder", "SigLIPLoss", "ChestCTCLIP",
                                                       "SigLIPTrainer", "main")}  # fmt: skip
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for module, listed in re.findall(
            r"^\s*from ((?:ct_siglip|siglip_trainer)[\w.]*) import ([\w, ]+)$", text, re.M
        ):
            names.update(f"{module}.{n.strip()}" for n in listed.split(",") if n.strip())
        names.update(re.findall(r"`(ct_siglip(?:\.\w+)+)", text))
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, missing


TOP = ("ct_siglip/", "tests/", "benchmarks/", "docs/")


def test_user_docs_name_only_files_that_exist_and_nothing_of_how_the_team_works():
    """The docs speak to users: every repository path they name is there, and they never point at files outside
    the project or at the team's own process."""
    import re

    missing, internal = [], []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for path in re.findall(r"`([A-Za-z0-9_./-]+)`", text):
            in_repo = path.startswith(TOP) or path.endswith((".py", ".md", ".toml", ".txt", ".yaml", ".sh"))
            path = path.rstrip("/")  # a folder of the repository (a folder a run writes is not one)
            here = (ROOT / path).exists() or (ROOT / doc).parent.joinpath(path).exists()
            if in_repo and not path.endswith((".jsonl", ".csv", ".png")) and not here:
                missing.append(f"{doc}: {path}")
        for phrase in re.findall(r"\.\./shared|BASELINES\.md|\.ci/run|\bissue \d+|device call", text):
            internal.append(f"{doc}: {phrase}")
    assert not missing, missing
    assert not internal, internal
