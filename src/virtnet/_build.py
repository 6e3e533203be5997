"""Which build of virtnet runs: the data plane compiled by mypyc, or pure Python.

One source, two builds. ``pip install .`` compiles the modules named in
``DATA_PLANE`` with mypyc where the machine has a C compiler and Python's
headers (setup.py), and installs the same modules as plain Python where it has
not; either way every ``.py`` file is installed, so the pure modules stay
importable beside the compiled ones.

Which one Python imports is decided here, once, before any data-plane module
loads (``virtnet/__init__.py`` calls :func:`choose`):

- ``VIRTNET_PURE=1`` makes a compiled install import the pure modules, so both
  builds can be measured side by side from one install;
- a compiled module whose source has changed since it was built (an edited
  ``.py`` in an editable install, next to an older ``.so``) is never used: the
  build recorded each source's sha256 in ``_build_info.json``, and on any
  mismatch the whole package falls back to its sources with a warning.

The fallback is all or nothing: mypyc compiles the data plane as one group that
calls its own functions directly, so one module from source beside compiled
callers would still run the old code through them.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PURE_ENV = "VIRTNET_PURE"
INFO_FILE = "_build_info.json"
PURE = "pure Python"

# What a packet passes through: compiled by mypyc, checked with mypy --strict
# (tools/typecheck.sh). Everything else (the vhost-user sessions, cli, the rest
# of bench, conform, netns) is control plane and stays interpreted.
DATA_PLANE: tuple[str, ...] = (
    "virtnet.virtio.errors",
    "virtnet.virtio.dirtylog",
    "virtnet.virtio.memory",
    "virtnet.virtio.features",
    "virtnet.virtio.ring.layout",
    "virtnet.virtio.ring.chain",
    "virtnet.virtio.ring.shadow",
    "virtnet.virtio.ring.inflight",
    "virtnet.virtio.ring.split",
    "virtnet.virtio.ring.packed",
    "virtnet.virtio.ring.queue",
    "virtnet.net.constants",
    "virtnet.net.header",
    "virtnet.net.features",
    "virtnet.net.stats",
    "virtnet.net.skb",
    "virtnet.net.faults",
    "virtnet.net.ratelimit",
    "virtnet.net.xdp",
    "virtnet.net.rx.queue",
    "virtnet.net.rx.base",
    "virtnet.net.rx.deferred",
    "virtnet.net.rx.prealloc",
    "virtnet.net.rx.ewma",
    "virtnet.net.rx.nonmergeable",
    "virtnet.net.rx.xdp",
    "virtnet.net.driver",
    "virtnet.net.device",
    "virtnet.net.coalesce",
    "virtnet.net.mq",
    "virtnet.net.ctrl",
    "virtnet.net.layout",
    "virtnet.net.guest",
    "virtnet.ports.synthetic",
    "virtnet.ports.tapio",
    "virtnet.ports.backends",
    "virtnet.vhost_user.polling",
    "virtnet.vhost_user.device_loop",
    "virtnet.vhost_user.driver_loop",
    "virtnet.bench.embedded",  # the in-process bench's loops are part of what it measures
)

_PACKAGE_DIR = Path(__file__).resolve().parent
_reason = ""  # why a compiled install runs its sources ("" when it does not)


def source_path(module: str, package_dir: Path = _PACKAGE_DIR) -> Path:
    """The ``.py`` file of a ``virtnet.*`` module name."""
    parts = module.split(".")[1:]
    return package_dir.joinpath(*parts[:-1], parts[-1] + ".py")


def source_hashes(modules: Sequence[str], package_dir: Path = _PACKAGE_DIR) -> dict[str, str]:
    return {
        m: hashlib.sha256(source_path(m, package_dir).read_bytes()).hexdigest() for m in modules
    }


def read_info(package_dir: Path = _PACKAGE_DIR) -> dict[str, object] | None:
    """What setup.py recorded of a compiled build, or None for a pure install."""
    try:
        info = json.loads((package_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _leftover_compiled(package_dir: Path = _PACKAGE_DIR) -> bool:
    """Whether a compiled data-plane module lies beside its source (one is enough)."""
    ring = package_dir / "virtio" / "ring"
    return any(ring.glob("split.*.so"))


def stale_modules(info: dict[str, object], package_dir: Path = _PACKAGE_DIR) -> list[str]:
    """Compiled modules whose source differs from the one they were built from."""
    built = info.get("sources")
    if not isinstance(built, dict):
        return ["(no source hashes recorded)"]
    now = source_hashes([m for m in built if source_path(m, package_dir).exists()], package_dir)
    return sorted(m for m, digest in built.items() if now.get(m) != digest)


class SourceFinder(importlib.abc.MetaPathFinder):
    """Load every ``virtnet.*`` module from its ``.py``, never a compiled sibling."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("virtnet."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return spec
        assert spec.origin is not None
        py = Path(spec.origin).parent / (fullname.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(fullname, py)


def choose() -> None:
    """Decide, before any data-plane import, which build this process runs."""
    global _reason
    info = read_info()
    if info is None:
        if not _leftover_compiled():
            return
        # Compiled modules with no record of their build: left by an earlier compiled
        # install under a pure one (``VIRTNET_BUILD=pure pip install -e .`` over an
        # in-place build). Nothing says which sources they came from: never use them.
        _reason = "compiled modules with no build record (left by an earlier build)"
        warnings.warn(
            f"virtnet: running the pure modules ({_reason}); remove src/virtnet's *.so "
            "files or rebuild with `pip install .`",
            RuntimeWarning,
            stacklevel=3,
        )
    elif os.environ.get(PURE_ENV) == "1":
        _reason = f"{PURE_ENV}=1"
    else:
        stale = stale_modules(info)
        if not stale:
            return
        _reason = "sources changed since the build: " + ", ".join(stale)
        warnings.warn(
            f"virtnet: running the pure modules, the compiled ones are stale ({_reason}); "
            "rebuild with `pip install .` (or `pip install -e .` again)",
            RuntimeWarning,
            stacklevel=3,
        )
    if not any(isinstance(f, SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder())


def compiled_modules() -> list[str]:
    """The data-plane modules this process runs compiled (imports them)."""
    out = []
    for name in DATA_PLANE:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader):
            out.append(name)
    return out


def build_name() -> str:
    """``compiled (mypyc X)`` or ``pure Python``, for --version, bench titles and JSON."""
    info = read_info()
    if info is None or _reason:
        return PURE
    n = len(compiled_modules())
    if n == 0:
        return PURE
    part = "" if n == len(DATA_PLANE) else f"; {n} of {len(DATA_PLANE)} data-plane modules"
    return f"compiled (mypyc {info.get('mypyc', '?')}{part})"


def describe() -> str:
    """build_name() and, for a compiled install running its sources, why."""
    name = build_name()
    if _reason:
        return f"{name}; compiled install, sources used: {_reason}"
    return name
