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
