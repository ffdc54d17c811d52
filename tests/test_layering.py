"""The layering check (import-linter, contract in pyproject.toml): passes on the tree, fails on an upward import."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint(src: Path) -> subprocess.CompletedProcess:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (make test installs it)")
    return subprocess.run([lint_imports, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src.parent,
                          capture_output=True, text=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})


def test_the_package_keeps_its_layers():
    done = lint(ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module,upward", [("kernels/dropout.py", "lorakit.adapters"),  # a layer importing a higher one
                                           ("celora/plan.py", "lorakit.adapters.attach")])  # a cycle with adapters
def test_an_upward_import_fails_the_check(tmp_path, module, upward):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "lorakit", copy / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / "lorakit" / module
    path.write_text(path.read_text() + f"\nimport {upward}  # noqa\n")
    done = lint(copy)
    assert done.returncode != 0 and "BROKEN" in done.stdout and upward in done.stdout, done.stdout



def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules():
    """No cycle among lorakit's modules (a lazy import inside a function counts; a package and its own submodules
    are one unit): e.g. train.state must not import train.loop, which imports it."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("lorakit")

    def family(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    edges = {m: [n for n in graph.find_modules_directly_imported_by(m) if not family(m, n)] for m in graph.modules}
    assert cycles(edges) == []
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]  # the check sees one
