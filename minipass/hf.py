"""Importing Hugging Face `transformers` (the optional peer and test oracle) from inside a checkout of minipass.

transformers >= 5.25 depends on the `kernels` distribution and imports its top-level `kernels` package when it builds
a model. A checkout of minipass has a top-level `kernels/` folder of its own (installed as `minipass.kernels`, so it
never clashes in site-packages). But the folder of the running script (`python bench.py`) and the working directory
(`python -m pytest`) come first on `sys.path`, so from the repository root `import kernels` would find this
repository's folder instead of the distribution, and transformers fails with an ImportError on its first model.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# In a checkout, minipass/kernels links to the top-level kernels/ folder; installed from a wheel, minipass/kernels is
# a folder of its own and a `kernels` beside it in site-packages is the distribution, to be left alone.
_OURS = _ROOT / "kernels" if (_ROOT / "minipass" / "kernels").resolve() == (_ROOT / "kernels").resolve() else None


def _is_checkout_entry(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == _ROOT
    except OSError:
        return False


def import_transformers():
    """`transformers`, with `sys.modules["kernels"]` the installed distribution (if any), not the checkout's folder.

    Raises ImportError when transformers is not installed, like `import transformers`.
    """
    if _OURS is None:  # not a checkout: nothing shadows the distribution
        return importlib.import_module("transformers")
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == _OURS:
        # The checkout's folder was imported under the bare name (e.g. by an earlier availability probe): forget it,
        # so the distribution can take the name. minipass itself only ever imports it as `minipass.kernels`.
        for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
            del sys.modules[name]
    if "kernels" not in sys.modules:
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if not _is_checkout_entry(p)]
        try:
            importlib.import_module("kernels")  # the distribution, where it is installed
        except ImportError:
            pass  # not installed: transformers then finds no usable `kernels` and does without it
        finally:
            sys.path[:] = saved
    return importlib.import_module("transformers")
