"""``python -m cugrad compile``: compile every kernel module the CUDA backend can launch.

The backend compiles a module the first time one of its kernels is launched, so a program's
first steps pay for NVRTC (seconds per GEMM tile module). This command pays it up front, on
the current device, and reports each module's time; CuPy keeps the binaries in its kernel
cache on disk (``~/.cupy/kernel_cache`` or ``CUPY_CACHE_DIR``), where later processes find
them. ``--jobs N`` compiles in N processes at once (each fills the disk cache; the command then
loads every module itself, from the cache), which is what a test run with many workers wants
before it starts: otherwise every worker compiles the same modules.

A compile failure is reported with the file, the options and NVRTC's log (exit status 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
import time

from ... import _backend
from . import config
from .context import KernelCompileError, current_context
from .loader import read_source


def compile_module(module: tuple[str, list[str], list[str]]) -> float:
    """Compile one ``(file, options, names)`` entry of ``config.instantiations()`` in this
    process; its seconds."""
    file, options, names = module
    start = time.perf_counter()
    current_context().module(file, read_source(file), options, names)
    return time.perf_counter() - start


def _compile_in_child(module) -> tuple[float, str | None]:
    """compile_module for a pool process: (seconds, the error's message or None); a
    KernelCompileError does not survive pickling back to the parent, its message does."""
    try:
        return compile_module(module), None
    except KernelCompileError as exc:
        return 0.0, str(exc)


def _label(module) -> str:
    file, options, names = module
    defines = "".join(f" {o[2:]}" for o in options if o.startswith("-D"))
    return f"{file}{defines}: {len(names)} kernels ({names[0]}, ...)"


def compile_all(jobs: int = 1, log=print) -> list[tuple[str, float]]:
    """Compile every module, ``jobs`` processes at once; [(module label, seconds)] of the
    compilation (or of the load from the disk cache, in this process, when jobs > 1)."""
    modules = config.instantiations()
    seconds: list[float | None] = [None] * len(modules)
    if jobs > 1:
        # spawn: a forked child would inherit this process's CUDA context, which CUDA forbids.
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for index, (secs, error) in enumerate(pool.map(_compile_in_child, modules)):
                if error is not None:
                    raise RuntimeError(error)
                seconds[index] = secs
    results = []
    for module, secs in zip(modules, seconds):
        loaded = compile_module(module)
        results.append((_label(module), loaded if secs is None else secs))
        log(f"  {results[-1][1]:7.2f} s  {results[-1][0]}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cugrad compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="compile in N processes at once (default 1)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if not _backend.cuda_available():
        print(f"python -m cugrad compile: the CUDA backend does not work here: "
              f"{_backend.cuda_unavailable_reason()}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    modules = config.instantiations()
    print(f"compiling {len(modules)} kernel modules "
          f"({sum(len(names) for _, _, names in modules)} kernels), "
          f"{args.jobs} process{'es' if args.jobs > 1 else ''}:")
    try:
        results = compile_all(args.jobs)
    except RuntimeError as exc:   # a KernelCompileError, or its message from a pool process
        print(exc, file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s "
          f"(module times sum to {sum(s for _, s in results):.1f} s)")
    return 0
