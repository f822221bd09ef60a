"""Every kernel instantiation the CUDA backend can launch compiles with nvcc (no GPU needed).

For each module of ``config.instantiations()`` (a kernel file and its options) and each of
sm_80 and sm_90, one nvcc call compiles a generated translation unit that includes the .cu
and takes the address of every name expression, which forces nvcc to instantiate and
compile each kernel. Warnings are errors, and so is a register spill (ptxas
-warn-spills). Skipped, with the reason, where nvcc is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

from cugrad.backends.cuda import config
from cugrad.backends.cuda.loader import instantiation_unit, source_dir

ARCHS = ("sm_80", "sm_90")
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)

# Only the nvcc compiles need nvcc: the table checks below are Python, and the NVRTC check
# needs libnvrtc alone (a machine with CuPy's wheels and no toolkit has it).
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or put it on "
                                "PATH): the CUDA compile check needs the CUDA toolkit")

MODULES = config.instantiations()


def _module_id(module) -> str:
    """file, its -D options, and what all its kernels' names share (gemm.cu is several
    modules with the same options: one per dtype and tile, the split-K sum, the reference)."""
    file, options, names = module
    defines = [o[2:] for o in options if o.startswith("-D")]
    shared = os.path.commonprefix(list(names))
    shared = shared[:max(shared.rfind(","), shared.rfind("<"), 0)]
    return (file + ("[" + ",".join(defines) + "]" if defines else "")
            + (f"({shared})" if shared else ""))


def compile_module(module, arch: str, workdir: Path) -> subprocess.CompletedProcess:
    file, options, names = module
    tu = workdir / f"{re.sub(r'[^A-Za-z0-9.]+', '_', _module_id(module))}_{arch}.cu"
    tu.write_text(instantiation_unit(file, names))
    # -warn-spills: with -Werror, a kernel that spills registers to local memory fails
    # (launch bounds that squeeze a tile below its registers: config.py's tiles run without)
    cmd = [NVCC, "-c", f"-arch={arch}", "-Werror", "all-warnings", "-Xptxas", "-warn-spills",
           *options,
           "-o", str(tu.with_suffix(".o")), str(tu)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@lru_cache(maxsize=None)
def _compile_all(workdir: str) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """All (module, arch) compilations, run in parallel once for the whole test module."""
    jobs = [(module, arch) for module in MODULES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = pool.map(lambda job: compile_module(job[0], job[1], Path(workdir)), jobs)
        return {(_module_id(module), arch): r for (module, arch), r in zip(jobs, results)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile_all(str(tmp_path_factory.mktemp("nvcc")))


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES, ids=_module_id)
def test_instantiations_compile(module, arch, compiled):
    result = compiled[(_module_id(module), arch)]
    assert result.returncode == 0, (
        f"nvcc failed for {_module_id(module)} on {arch} "
        f"({len(module[2])} instantiations):\n{' '.join(result.args)}\n{result.stdout}\n{result.stderr}")
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def test_module_ids_are_unique():
    ids = [_module_id(m) for m in MODULES]
    assert len(ids) == len(set(ids)), ids


def test_every_kernel_file_is_compiled():
    kernels = source_dir()
    files = {f.name for f in kernels.glob("*.cu")}
    assert files == {file for file, _, _ in MODULES}, "a .cu file is missing from config.instantiations()"


# ------------------------------------------------------------------------------ NVRTC
# What runs at run time is NVRTC (through cupy.RawModule), not nvcc: the same modules, their
# name expressions registered and lowered as CuPy does it. Runs wherever libnvrtc is found
# (CUGRAD_NVRTC=/path/libnvrtc.so, the CUDA wheels' nvidia/*/lib, the toolkit's lib64 or the
# loader path), which includes every machine with a working CuPy; skipped elsewhere.

def _find_nvrtc() -> str | None:
    import ctypes.util
    import glob
    import site
    if os.environ.get("CUGRAD_NVRTC"):
        return os.environ["CUGRAD_NVRTC"]
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    patterns = [f"{r}/nvidia/*/lib/libnvrtc.so*" for r in roots]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    patterns.append(f"{home}/lib64/libnvrtc.so*")
    for pattern in patterns:
        hits = sorted(p for p in glob.glob(pattern) if "builtins" not in p)
        if hits:
            return hits[0]
    return ctypes.util.find_library("nvrtc")


def _nvrtc_compile(lib, file: str, options, names) -> tuple[int, str, list[str]]:
    """(NVRTC status, log, names that did not lower) for one module, sm_90."""
    import ctypes
    from cugrad.backends.cuda.loader import read_source
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), read_source(file).encode(), file.encode(),
                                  0, None, None) == 0
    try:
        for name in names:
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        opts = [o.encode() for o in (*options, "-arch=sm_90")]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(size.value, 1))
        lib.nvrtcGetProgramLog(prog, log)
        unlowered = []
        if status == 0:
            for name in names:
                lowered = ctypes.c_char_p()
                if lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) != 0 \
                        or not lowered.value:
                    unlowered.append(name)
        return status, log.value.decode(errors="replace"), unlowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_nvrtc_compiles_every_module_and_lowers_every_name():
    import ctypes
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (set CUGRAD_NVRTC, or install CuPy's CUDA wheels): "
                    "the NVRTC compile check is skipped (the nvcc check above runs where nvcc is)")
    lib = ctypes.CDLL(path)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda m: _nvrtc_compile(lib, *m), MODULES))
    for module, (status, log, unlowered) in zip(MODULES, results):
        assert status == 0, f"NVRTC ({path}) failed on {_module_id(module)}:\n{log}"
        assert "warning" not in log.lower(), f"NVRTC warnings in {_module_id(module)}:\n{log}"
        assert not unlowered, f"{_module_id(module)}: names NVRTC did not lower: {unlowered}"
