"""Build virtnet: the data plane compiled by mypyc where it can be, pure Python where not.

Everything else is in pyproject.toml. This file only adds the compiled modules:
``virtnet._build.DATA_PLANE`` names them (read here without importing virtnet).
An install never fails for want of a compiler: without a C compiler, Python's
headers or mypyc, or when mypyc or the C build fails, the same ``.py`` files
are installed alone and ``virtnet --version`` says ``pure Python``.
``VIRTNET_BUILD=pure pip install .`` asks for the pure build on purpose.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
BUILD_ENV = "VIRTNET_BUILD"


def say(text: str) -> None:
    # pip shows a build's output only with -v; stderr reaches the log either way.
    print(f"virtnet build: {text}", file=sys.stderr)


def data_plane() -> tuple[str, ...]:
    tree = ast.parse((HERE / "src/virtnet/_build.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "DATA_PLANE"
            and node.value is not None
        ):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit("setup.py: src/virtnet/_build.py defines no DATA_PLANE")


def source(module: str) -> str:
    return "src/" + module.replace(".", "/") + ".py"


def why_pure() -> str:
    """Why this machine cannot compile, or "" when it can."""
    if os.environ.get(BUILD_ENV, "") == "pure":
        return f"{BUILD_ENV}=pure"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        return f"no Python headers ({include}/Python.h; Debian: apt-get install python3-dev)"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}; Debian: apt-get install build-essential)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (pip install mypy)"
    return ""


class BuildDataPlane(build_ext):
    """build_ext that falls back to pure Python whole, and records what it compiled."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:  # the C files of mypyc's group compile side by side
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as e:  # a compiler error: the .py files are still installed
            say(f"compiling failed ({e}); installing pure Python")
        built = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        if not all(p.exists() for p in built):
            # One missing piece (the group library or a module's shim) would fail
            # the import of the others: remove them all and install the sources alone.
            for p in built:
                p.unlink(missing_ok=True)
            say("not every compiled module was built; installing pure Python")
            return
        self.write_info(Path(self.get_ext_fullpath("virtnet._build")).parent)

    def write_info(self, package_dir: Path) -> None:
        from mypy.version import __version__ as mypyc_version

        modules = data_plane()
        sources = {m: hashlib.sha256((HERE / source(m)).read_bytes()).hexdigest() for m in modules}
        info = {"mypyc": mypyc_version, "sources": sources}
        (package_dir / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")
        say(f"compiled {len(modules)} data-plane modules with mypyc {mypyc_version}")


def remove_inplace_build() -> None:
    """Drop what an earlier editable compiled build left in src/ (its .so files and
    build record): a pure build must not leave them to be imported."""
    left = [*(HERE / "src").glob("virtnet__mypyc*.so"), *(HERE / "src/virtnet").rglob("*.so")]
    record = HERE / "src/virtnet/_build_info.json"
    for path in [*left, record]:
        path.unlink(missing_ok=True)
    if left:
        say(f"removed {len(left)} compiled modules an earlier build left in src/")


# Commands that build what gets installed; metadata-only runs (egg_info, dist_info,
# sdist) need no extensions, and mypyc type-checks the data plane each time it runs.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def ext_modules() -> list:
    if not BUILD_COMMANDS & set(sys.argv[1:]):
        return []
    reason = why_pure()
    if reason:
        say(f"installing pure Python: {reason}")
        remove_inplace_build()
        return []
    from mypyc.build import mypycify

    try:
        exts = mypycify(
            # The control plane is not compiled: its imports are types, not builds.
            ["--follow-imports=silent", *(source(m) for m in data_plane())],
            opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
            group_name="virtnet",
            multi_file=True,  # one C file per module, compiled in parallel (finalize_options)
        )
    except (Exception, SystemExit) as e:  # mypy found an error: say it, do not fail
        say(f"mypyc could not compile the data plane ({e}); installing pure Python")
        return []
    return exts


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildDataPlane})
