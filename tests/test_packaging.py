"""The kernels live in the top-level kernels/ folder for reading and copying, but are installed and imported as
minipass.kernels: the top-level name `kernels` belongs to another distribution on PyPI."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_minipass_kernels_is_the_kernels_folder():
    import minipass.kernels.attention as attention

    assert Path(attention.__file__).resolve() == (ROOT / "kernels" / "attention.py").resolve()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "minipass.kernels" in packages and "kernels" not in packages


def test_nothing_imports_the_top_level_name():
    # Every module of the package, the kernels' tools and bench.py, imported in a fresh interpreter run from a
    # folder where `kernels` is not importable by accident.
    modules = sorted(p.stem for p in (ROOT / "minipass").glob("*.py") if p.stem != "__init__")
    tools = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
    code = "\n".join([
        "import importlib, runpy, sys",
        f"sys.path.insert(0, {str(ROOT)!r})",
        *[f"importlib.import_module('minipass.{m}')" for m in modules],
        *[f"importlib.import_module('minipass.kernels.{m}')" for m in tools],
        f"runpy.run_path({str(ROOT / 'bench.py')!r}, run_name='bench')",
        "leaked = sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.'))",
        "assert not leaked, leaked",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_transformers_gets_its_own_kernels_when_run_from_the_checkout():
    # transformers >= 5.25 imports the `kernels` distribution; from the repository root (the folder of bench.py, the
    # working directory of `python -m pytest`) this checkout's kernels/ folder comes first on sys.path. Here it is
    # even imported under the bare name beforehand, the worst case.
    from tests.util import transformers_or_skip

    transformers_or_skip()
    code = "\n".join([
        "import sys, importlib.metadata",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import kernels",
        "from minipass.hf import import_transformers",
        "transformers = import_transformers()",
        "transformers.LlamaForCausalLM, transformers.LlamaConfig",
        "try:",
        "    importlib.metadata.version('kernels')",
        "except importlib.metadata.PackageNotFoundError:",
        "    pass",
        "else:",
        f"    assert not sys.modules['kernels'].__file__.startswith({str(ROOT / 'kernels')!r}), 'the checkout shadows kernels'",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_wheel_holds_the_kernels_under_minipass(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building the wheel needs setuptools >= 77 (pyproject.toml), found {setuptools.__version__}")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("minipass-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = {f"minipass/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    kernel_files |= {f"minipass/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.cpp")}  # built on first use
    assert kernel_files <= names
    assert not [n for n in names if n.startswith("kernels/")]
