"""``python -m cugrad <command>``: demo (train an MLP), info (backends on this machine),
bench (the benchmark suite, GPU), compile (every kernel module ahead of use, GPU)."""

from __future__ import annotations

import sys


def info(argv=()) -> int:
    import argparse

    import numpy as np

    argparse.ArgumentParser(prog="python -m cugrad info", description=COMMANDS["info"] +
                            " (cugrad and NumPy versions, the CUDA backend's state); "
                            "no options").parse_args(list(argv))

    import cugrad
    print(f"cugrad {cugrad.__version__}, NumPy {np.__version__}")
    if cugrad.cuda_available():
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        print(f"CUDA backend: available, CuPy {cupy.__version__}, device "
              f"{props['name'].decode()}")
    else:
        print(f"CUDA backend: unavailable ({cugrad.cuda_unavailable_reason()})")
    return 0


COMMANDS = {"demo": "train an MLP on handwritten digits (GPU if available)",
            "info": "show which backends work here",
            "bench": "run the benchmark suite against cuBLAS, PyTorch and copies (GPU)",
            "compile": "compile every kernel module now, into CuPy's disk cache (GPU)"}


def main(argv=None) -> int:
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
                return main([argv[1], "--help"])
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
