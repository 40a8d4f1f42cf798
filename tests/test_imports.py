"""The map of imports: the command lines (modules with a __main__ block, and bench.py) lean on the library, never on
each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Library modules that also have a small __main__ (a report), and may be imported by the command lines.
LIBRARY_WITH_MAIN = {"minipass.distributed"}


def cli_modules() -> dict:
    files = {p.stem: p for p in (ROOT / "minipass").glob("*.py")}
    clis = {f"minipass.{name}": p for name, p in files.items() if "__name__ == \"__main__\"" in p.read_text()}
    clis = {name: p for name, p in clis.items() if name not in LIBRARY_WITH_MAIN}
    clis["bench"] = ROOT / "bench.py"
    return clis


def imported(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_cli_module_imports_another():
    clis = cli_modules()
    assert set(clis) == {"bench", "minipass.generate", "minipass.train_lookahead", "minipass.eval_lookahead",
                         "minipass.distill", "minipass.bench_step", "minipass.build_datastore"}
    leaks = {name: sorted(imported(path) & (set(clis) - {name})) for name, path in clis.items()}
    assert not {k: v for k, v in leaks.items() if v}, leaks
