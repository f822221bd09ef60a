"""The sdist is a complete checkout: an unpacked one runs `python -m pytest` as a clone does
(conftest.py, tests/kernel_checks.py, the CPU kernel harness, the CuPy stand-in, the NVTX
injection library), has the Makefile and the profiling/ that README.md links to, and holds
no build output or cache; the wheel holds the packages and the kernels' sources only.

Both are built offline with setuptools' PEP 517 backend in this interpreter (no isolated
build environment, so nothing is downloaded), from a copy of the checkout into which build
outputs are planted. About 2 s."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

# What the sdist must hold beyond the package: the files the test suite imports or builds,
# and the ones README.md sends a reader to.
NEEDED = ["tests/conftest.py", "tests/kernel_checks.py", "tests/cuda_harness/harness.py",
          "tests/cuda_harness/src/runner.cpp", "tests/cuda_harness/include/cuda_shim.h",
          "tests/fake_cupy/cupy/__init__.py", "tests/nvtx_inject/nvtx_record.c",
          "Makefile", "README.md", "MATH.md", "LICENSE", "MANIFEST.in", "pyproject.toml",
          "profiling/README.md", "profiling/bench.py", "profiling/results/README.md"]

# Build outputs and caches planted in the copy (the wheel's own build/ comes on top).
PLANTED = ["tests/cuda_harness/build/gemm-0123/module.so", "tests/cuda_harness/src/runner.o",
           "tests/__pycache__/conftest.cpython-311-pytest-8.0.pyc",
           "tests/fake_cupy/cupy/__pycache__/linalg.cpython-311.pyc", "tests/stray.pyc",
           "profiling/__pycache__/bench.cpython-311.pyc", "tests/.hypothesis/examples/ab/cd",
           ".hypothesis/examples/ab/cd", ".pytest_cache/v/cache/lastfailed",
           "tests/.pytest_cache/README.md", "tests/fake_cupy/stray.so", "dist/old.tar.gz"]

BUILD_OUTPUT = re.compile(r"(^|/)(build|dist|__pycache__|\.hypothesis|\.pytest_cache)/"
                          r"|\.(pyc|pyo|so|o)$")

# Copied from the checkout: its top-level files and these folders, without build outputs.
COPIED_DIRS = ("cugrad", "kernels", "tests", "profiling")
IGNORED = shutil.ignore_patterns("build", "__pycache__", ".hypothesis", ".pytest_cache",
                                 "*.py[cod]", "*.so", "*.o")

BUILD = """\
import sys
from setuptools import build_meta
out = sys.argv[1]
wheel = build_meta.build_wheel(out)
sdist = build_meta.build_sdist(out)
print("BUILT", wheel, sdist)
"""


def _setuptools_or_skip() -> None:
    """Skip unless this interpreter's setuptools meets [build-system] requires: an older
    one cannot read pyproject.toml (its SPDX license), a newer one would be downloaded."""
    if not PYPROJECT.is_file():
        pytest.skip(f"pyproject.toml not found at {PYPROJECT} (installed-package test run)")
    need = re.search(r'"setuptools>=([\d.]+)"', PYPROJECT.read_text(encoding="utf-8"))
    assert need, "pyproject.toml's [build-system] requires names no setuptools>=N"
    try:
        have = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        have = None
    key = lambda v: tuple(int(p) for p in re.findall(r"\d+", v)[:3])   # noqa: E731
    if have is None or key(have) < key(need.group(1)):
        pytest.skip(f"setuptools {have or '(none)'} is installed here and pyproject.toml's build "
                    f"system needs setuptools>={need.group(1)}; an isolated build would "
                    "download it, and this test builds offline. The test extra brings it: "
                    "pip install '.[test]'")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(copied files, sdist member names, wheel member names), member names relative to the
    archive's top folder (the sdist) or root (the wheel)."""
    _setuptools_or_skip()
    src = tmp_path_factory.mktemp("checkout") / "cugrad"
    src.mkdir()
    for item in ROOT.iterdir():
        if item.is_file():
            shutil.copy2(item, src / item.name)
    for name in COPIED_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=IGNORED)
    copied = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    for rel in PLANTED:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"planted by tests/test_packaging.py\n")

    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM")}
    proc = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel_name, sdist_name = re.findall(r"^BUILT (\S+) (\S+)$", proc.stdout, re.M)[-1]
    with tarfile.open(out / sdist_name) as tar:
        top = sdist_name.removesuffix(".tar.gz") + "/"
        sdist = {m.name.removeprefix(top) for m in tar.getmembers() if m.isfile()}
    with zipfile.ZipFile(out / wheel_name) as whl:
        wheel = set(whl.namelist())
    return copied, sdist, wheel


def test_sdist_has_what_the_tests_and_the_readme_need(built):
    """Fails on an sdist without conftest.py, the harness sources, the stand-in, the
    Makefile or profiling/ (the old MANIFEST.in shipped tests/test_*.py alone, so an unpacked
    sdist's `python -m pytest tests/test_nn.py` died on `import conftest`)."""
    copied, sdist, _ = built
    missing = [f for f in NEEDED if f not in sdist]
    assert not missing, f"the sdist lacks {missing}"
    # every file of the checkout's tests/, profiling/, cugrad/ and kernels/
    missing = [f for f in copied if f.split("/")[0] in COPIED_DIRS and f not in sdist]
    assert not missing, f"the sdist lacks {len(missing)} files of the checkout: {missing[:20]}"


def test_sdist_has_no_build_output(built):
    """Fails if a compiled harness module, bytecode, a cache or an old build/ or dist/
    (planted in the copy, or left by the wheel's build) goes into the sdist."""
    _, sdist, _ = built
    leaked = sorted(f for f in sdist if BUILD_OUTPUT.search(f))
    assert not leaked, f"build outputs in the sdist: {leaked}"


def test_wheel_is_the_package_and_the_kernel_sources_only(built):
    """Fails if the wheel takes in tests/, profiling/ or anything beside the cugrad packages
    and their metadata, or lacks a kernel source of kernels/."""
    copied, _, wheel = built
    strays = sorted(f for f in wheel if not re.match(r"cugrad/|cugrad-[^/]+\.dist-info/", f))
    assert not strays, f"the wheel holds more than cugrad: {strays}"
    kernels = {"cugrad/kernels/" + f.removeprefix("kernels/") for f in copied
               if f.startswith("kernels/") and f.endswith((".cu", ".cuh"))}
    assert kernels and kernels <= wheel, sorted(kernels - wheel)
    data = sorted(f for f in wheel if f.startswith("cugrad/") and not f.endswith(".py")
                  and f not in kernels)
    assert not data, f"the wheel holds files other than modules and kernel sources: {data}"
    leaked = sorted(f for f in wheel if BUILD_OUTPUT.search(f))
    assert not leaked, f"build outputs in the wheel: {leaked}"
