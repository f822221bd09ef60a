"""``python -m cugrad <command>``: demo (train an MLP), info (backends on this machine),
bench (the benchmark suite, GPU), compile (every kernel module ahead of use, GPU)."""

from __future__ import annotations

import os
import sys


def info(argv=()) -> int:
    import argparse

    import numpy as np

    argparse.ArgumentParser(prog="python -m cugrad info", description=COMMANDS["info"] +
                            " (cugrad and NumPy versions, the CUDA backend's state, NVTX "
                            "ranges); no options").parse_args(list(argv))

    import cugrad
    print(f"cugrad {cugrad.__version__}, NumPy {np.__version__}")
    if cugrad.cuda_available():
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        print(f"CUDA backend: available, CuPy {cupy.__version__}, device "
              f"{props['name'].decode()}")
    else:
        print(f"CUDA backend: unavailable ({cugrad.cuda_unavailable_reason()})")
    print(nvtx_line())
    return 0


def nvtx_line() -> str:
    """``info``'s NVTX line: whether ops emit NVTX ranges, as cugrad._trace decides it
    (CUGRAD_NVTX read by its env_flag, the nvtx package, an NVTX tool attached), and whether
    the nvtx package imports."""
    from importlib import metadata

    from . import _trace
    from ._backend import env_flag
    value = os.environ.get(_trace.NVTX_ENV)
    switch = f"{_trace.NVTX_ENV}={value}" if value is not None else f"{_trace.NVTX_ENV} unset"
    try:
        import nvtx  # noqa: F401
    except Exception as exc:           # ImportError, or a broken install
        return (f"NVTX ranges: off, the nvtx package is not importable ({type(exc).__name__}: "
                f"{exc}; install it with the nvtx extra) ({switch})")
    try:
        package = f"nvtx {metadata.version('nvtx')} importable"
    except metadata.PackageNotFoundError:
        package = "nvtx importable"
    if not env_flag(_trace.NVTX_ENV, default=True):
        return f"NVTX ranges: off, {switch} ({package})"
    if _trace.nvtx_enabled():
        return f"NVTX ranges: on, an NVTX tool is attached ({package}, {switch})"
    reason = _trace.nvtx_disabled_reason()
    if "no NVTX tool" in reason:
        return (f"NVTX ranges: on, emitted while an NVTX tool (Nsight Systems, Nsight Compute) "
                f"is attached; none is now ({package}, {switch})")
    return f"NVTX ranges: off, {reason} ({package}, {switch})"


COMMANDS = {"demo": "train an MLP on handwritten digits (GPU if available)",
            "info": "show which backends work here",
            "bench": "run the benchmark suite against cuBLAS, PyTorch and copies (GPU)",
            "compile": "compile every kernel module now, into CuPy's disk cache (GPU)"}


def main(argv=None) -> int:
    """The command line; exit status 141 (128 + SIGPIPE), quietly, when whoever reads stdout
    closes it early (`python -m cugrad --help | head -1`)."""
    # stdout is flushed here, where a closed pipe can be told apart, not at exit; only on the
    # way out of a command that ended normally (returned, or argparse's exit): an error's
    # traceback must not be replaced by the broken pipe it then meets.
    try:
        try:
            status = _main(argv)
        except SystemExit:
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        if not _stdout_is_closed():
            raise                     # another pipe broke (a worker's): a real error
        # Point stdout at /dev/null so that the interpreter's own flush at exit finds no
        # closed pipe either; then exit as a tool killed by SIGPIPE does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _stdout_is_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error or hang-up on
    it). Without poll (Windows) a BrokenPipeError is taken to be stdout's; a stdout without
    a file descriptor is no pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    try:
        import select
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        import cugrad
        print(f"cugrad {cugrad.__version__}")
        return 0
    if len(argv) > 1 and argv[0] in ("-h", "--help"):
        # `--help CMD`: CMD's own help (its parser prints it and exits 0); an unknown CMD
        # falls through to the unknown-command error below
        if argv[1] in COMMANDS:
            try:
                return _main([argv[1], "--help"])
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = not argv or argv[0] in ("-h", "--help")
        out = sys.stdout if asked else sys.stderr     # usage after an error goes with it
        if not asked:
            print(f"python -m cugrad: unknown command {argv[0]!r}; expected one of "
                  f"{', '.join(COMMANDS)}", file=out)
        print(f"usage: python -m cugrad [--version] {{{','.join(COMMANDS)}}} [options]\n",
              file=out)
        for name, text in COMMANDS.items():
            print(f"  {name:7s} {text}", file=out)
        print("\na command's options: python -m cugrad --help COMMAND (or COMMAND --help)",
              file=out)
        return 0 if asked else 2
    if argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if argv[0] == "compile":
        from .backends.cuda.precompile import main as compile_main
        return compile_main(argv[1:])
    return info(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
