"""The two builds: which one a process runs, VIRTNET_PURE=1, and stale compiled modules."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import virtnet
from virtnet import _build
from virtnet._build import DATA_PLANE, PURE_ENV, read_info, source_hashes, stale_modules

PACKAGE = Path(virtnet.__file__).resolve().parent
COMPILED = read_info() is not None


def _run(code: str, env: dict[str, str] | None = None, path: Path | None = None):
    import os

    full = dict(os.environ)
    full.pop(PURE_ENV, None)
    full.update(env or {})
    if path is not None:
        full["PYTHONPATH"] = str(path)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=60)


def _loaded_from(module: str, env: dict[str, str] | None = None, path: Path | None = None):
    proc = _run(f"import {module} as m, virtnet._build as b; print(m.__file__); "
                "print(b.build_name())", env, path)
    assert proc.returncode == 0, proc.stderr
    file, name = proc.stdout.splitlines()
    return file, name, proc.stderr


def test_every_data_plane_module_has_a_source():
    for module in DATA_PLANE:
        assert _build.source_path(module).is_file(), module


def test_pure_env_loads_every_module_from_source():
    for module in ("virtnet.virtio.ring.split", "virtnet.net.rx"):
        file, name, _ = _loaded_from(module, {PURE_ENV: "1"})
        assert file.endswith(".py"), file
        assert name == "pure Python"


def test_the_label_says_what_is_loaded():
    file, name, _ = _loaded_from("virtnet.virtio.ring.split")
    if COMPILED:
        assert file.endswith(".so"), file
        assert name.startswith("compiled (mypyc "), name
    else:
        assert file.endswith(".py"), file
        assert name == "pure Python"


def test_version_names_the_build():
    proc = subprocess.run([sys.executable, "-m", "virtnet", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    expected = "compiled (mypyc" if COMPILED else "pure Python"
    assert expected in proc.stdout


def test_stale_modules_compares_source_hashes(tmp_path: Path):
    pkg = tmp_path / "virtnet"
    (pkg / "net").mkdir(parents=True)
    (pkg / "net" / "rx.py").write_text("x = 1\n")
    info: dict[str, object] = {"sources": source_hashes(["virtnet.net.rx"], pkg)}
    assert stale_modules(info, pkg) == []
    (pkg / "net" / "rx.py").write_text("x = 2\n")
    assert stale_modules(info, pkg) == ["virtnet.net.rx"]
    assert stale_modules({}, pkg) == ["(no source hashes recorded)"]


@pytest.mark.needs(None if COMPILED else "needs a compiled install (pip install . with a C "
                   "compiler); tools/test-all.sh installs one and checks it is compiled")
def test_an_edited_source_is_never_shadowed_by_its_older_compiled_module(tmp_path: Path):
    # A copy of the installed package (and mypyc's group library beside it), one
    # source edited after the build: the whole package must run from source, loudly.
    shutil.copytree(PACKAGE, tmp_path / "virtnet")
    for lib in PACKAGE.parent.glob("virtnet__mypyc*"):
        shutil.copy2(lib, tmp_path / lib.name)
    split = tmp_path / "virtnet" / "virtio" / "ring" / "split.py"
    split.write_text(split.read_text() + "\nEDITED = True\n")
    file, name, err = _loaded_from("virtnet.virtio.ring.split", path=tmp_path)
    assert file == str(split)
    assert name == "pure Python"
    assert "stale" in err and "virtnet.virtio.ring.split" in err
    # ... and the unedited copy still runs compiled.
    split.write_text(split.read_text().replace("\nEDITED = True\n", ""))
    file, name, _ = _loaded_from("virtnet.virtio.ring.split", path=tmp_path)
    assert file.endswith(".so")
    assert json.loads((tmp_path / "virtnet" / "_build_info.json").read_text())["mypyc"] in name


def test_compiled_modules_with_no_build_record_are_never_imported(tmp_path: Path):
    # A .so beside its source but no _build_info.json (left by an earlier compiled build
    # under a pure install): nothing says which source it came from, so it is never
    # loaded. The stand-in .so is not even a shared object: importing it would fail.
    from importlib.machinery import EXTENSION_SUFFIXES

    pkg = tmp_path / "virtnet"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so", "_build_info.json"))
    split = pkg / "virtio" / "ring" / "split.py"
    (split.parent / ("split" + EXTENSION_SUFFIXES[0])).write_bytes(b"not a shared object")
    file, name, err = _loaded_from("virtnet.virtio.ring.split", path=tmp_path)
    assert file == str(split)
    assert name == "pure Python"
    assert "no build record" in err
