"""Reads the kernel sources: ``kernels/*.cu`` of the source checkout, or the package data
``cugrad.kernels`` of an installed (non-editable) package.

NVRTC has no file system to search, so ``#include "common.cuh"`` lines are replaced by
the header's text here (once per header per file). nvcc and host compilers resolve the
same include next to the .cu file, so the sources stay valid C++ for every compiler.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


class KernelSourceError(FileNotFoundError):
    """A kernel source file cannot be found."""


def source_dir() -> Path | None:
    """``kernels/`` at the repository root when running from a source checkout."""
    candidate = Path(__file__).resolve().parents[3] / "kernels"
    return candidate if (candidate / "gemm.cu").is_file() else None


def _read_raw(file: str) -> str:
    directory = source_dir()
    if directory is not None:
        path = directory / file
        if path.is_file():
            return path.read_text(encoding="utf-8")
    try:
        return resources.files("cugrad.kernels").joinpath(file).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError) as exc:
        # Older importlib.resources cannot open a namespace package (kernels/ has no
        # __init__.py); the installed files are next to this package all the same.
        path = Path(__file__).resolve().parents[2] / "kernels" / file
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise KernelSourceError(
            f"cugrad: kernel source {file!r} not found (looked in {directory or 'no source checkout'} "
            f"and in the package data cugrad.kernels: {exc})") from None


def instantiation_unit(file: str, names) -> str:
    """C++ for an offline compiler (nvcc; the compile check, the SASS report): includes the
    checkout's ``kernels/file`` and takes the address of every kernel in ``names``, which
    forces nvcc to instantiate and compile each (NVRTC is given them as name expressions)."""
    kernels = source_dir()
    if kernels is None:
        raise KernelSourceError("cugrad: compiling kernels offline needs a source checkout "
                                "(kernels/ beside cugrad/)")
    refs = ",\n    ".join(f"(void*)&{name}" for name in names)
    return (f'#include "{(kernels / file).as_posix()}"\n\n'
            "// Taking each kernel's address forces its instantiation and device compilation.\n"
            f"void* cugrad_kernels[] = {{\n    {refs}\n}};\n")


@lru_cache(maxsize=None)
def read_source(file: str) -> str:
    """The text of ``file`` with its quoted includes pasted in (each header once)."""
    return inline_includes(_read_raw(file), _read_raw)


def inline_includes(code: str, read) -> str:
    seen: set[str] = set()

    def paste(match: re.Match) -> str:
        header = match.group(1)
        if header in seen:
            return f"// (already included: {header})"
        seen.add(header)
        body = _INCLUDE.sub(paste, read(header))
        return f"// ---- begin {header}\n{body}\n// ---- end {header}"

    return _INCLUDE.sub(paste, code)
