"""Type-check virtnet: the data plane with ``mypy --strict``, the rest with mypy's defaults.

The data plane is ``virtnet._build.DATA_PLANE``, the modules setup.py compiles
with mypyc: strict typing there is what lets the compiler use native classes and
fields. Usage: ``python tools/typecheck.py`` from the repository; exit 1 on any error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from virtnet._build import DATA_PLANE, source_path  # noqa: E402


def main() -> int:
    package = ROOT / "src" / "virtnet"
    strict = sorted(str(source_path(m, package).relative_to(ROOT)) for m in DATA_PLANE)
    every = (str(p.relative_to(ROOT)) for p in package.rglob("*.py"))
    rest = sorted(p for p in every if p not in strict)
    mypy = [sys.executable, "-m", "mypy", "--follow-imports=silent"]
    rc = 0
    for what, flags, files in (
        ("data plane, --strict", ["--strict"], strict),
        ("control plane, defaults", [], rest),
    ):
        print(f"mypy: {what} ({len(files)} files)", flush=True)
        rc |= subprocess.run([*mypy, *flags, *files], cwd=ROOT).returncode
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
