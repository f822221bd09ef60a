"""Run the real ``kernels/*.cu`` on the CPU: build, cache, launch, and a CPU ``Context``.

A kernel file is compiled unchanged by the host C++ compiler (``g++``) against
``include/cuda_shim.h`` into a shared module, together with a generated table of launch
entries, one per name expression (the same instantiations and ``-D`` options the CUDA
backend's loader uses). Modules are built with AddressSanitizer and run inside a separate,
ASan-built runner process (``src/runner.cpp``) that ``Runner`` drives over pipes: each array
argument is copied into a fresh allocation of exactly its size, so a kernel touching one
byte past an array is reported, and the report (or a harness fault such as a deadlock) is
raised here as ``KernelFault`` without taking pytest down.

``CpuContext`` plugs all this into the CUDA backend: its ``function(file, name_expression)``
returns a ``CpuKernel`` with the CuPy launch signature, so the backend's own Python launch
code (grid sizes, argument packing, dtypes) runs unchanged against numpy arrays.

See README.md in this directory.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HARNESS_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = HARNESS_DIR / "include"
SRC_DIR = HARNESS_DIR / "src"
REPO_ROOT = HARNESS_DIR.parent.parent
# CUGRAD_HARNESS_KERNELS_DIR runs the tests against a copy of kernels/ (e.g. a planted bug).
KERNELS_DIR = Path(os.environ.get("CUGRAD_HARNESS_KERNELS_DIR", REPO_ROOT / "kernels")).resolve()
BUILD_DIR = Path(os.environ.get("CUGRAD_HARNESS_BUILD_DIR", HARNESS_DIR / "build"))

SCHEDULES = {"random": 0, "forward": 1, "reverse": 2}
DYN_SMEM_CAPACITY = 227 * 1024
LAUNCH_TIMEOUT_S = float(os.environ.get("CUGRAD_HARNESS_TIMEOUT", "120"))


class HarnessError(RuntimeError):
    """The harness cannot do what was asked (no compiler, a build failed, bad arguments)."""


class BuildError(HarnessError):
    """g++ rejected a kernel module; the message holds the compiler output."""


class LaunchError(HarnessError):
    """A launch the CUDA runtime would refuse (bad grid/block/shared memory)."""


class KernelFault(HarnessError):
    """The kernel crashed the runner: an AddressSanitizer/UBSan report, a deadlock, a bad
    warp mask, a trap. The message holds the runner's report."""


class HarnessWarning(UserWarning):
    """Something the kernel printed, or a warning of the harness (e.g. a shuffle that read
    an exited lane)."""


# ----------------------------------------------------------------------------- toolchain

def compiler() -> str | None:
    """The host C++ compiler, or None where there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def unavailable() -> str | None:
    """Why the harness cannot run here (no g++; or, in the ThreadSanitizer build, a g++
    without a working libtsan), or None. Test modules skip with this reason."""
    cxx = compiler()
    if cxx is None:
        return "no host C++ compiler (g++): the CPU kernel harness cannot build kernels/*.cu here"
    return _tsan_problem(cxx) if sanitizer() == "thread" else None


@functools.lru_cache(maxsize=None)
def _tsan_problem(cxx: str) -> str | None:
    """None if `cxx` builds and runs a ThreadSanitizer program, else what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text("int main() { return 0; }\n")
        build = subprocess.run([cxx, "-fsanitize=thread", str(src), "-o", str(exe)],
                               capture_output=True, text=True)
        run = subprocess.run([str(exe)], capture_output=True, text=True) if build.returncode == 0 else build
    if run.returncode == 0:
        return None
    return ("CUGRAD_HARNESS_SANITIZE=thread, but g++ cannot build and run a ThreadSanitizer "
            f"program here: {(run.stdout + run.stderr).strip()[-400:]}")


def sanitizer() -> str | None:
    """The sanitizer the modules and the runner are built with, from CUGRAD_HARNESS_SANITIZE:
    "address" (the default, also "1": AddressSanitizer + UBSan(alignment)), "thread"
    (ThreadSanitizer: races between the threads of a block, the harness's racecheck; see
    README.md) or None ("0": no sanitizer). Unset or empty is the default, as with the
    project's other variables."""
    value = os.environ.get("CUGRAD_HARNESS_SANITIZE", "").strip().lower() or "1"
    if value == "0":
        return None
    if value in ("1", "address"):
        return "address"
    if value == "thread":
        return "thread"
    raise HarnessError(f"CUGRAD_HARNESS_SANITIZE={value!r}: expected 1 or address (the default), "
                       "thread, or 0")


def sanitize() -> bool:
    """Built with AddressSanitizer + UBSan(alignment) (out-of-bounds accesses are reported)?"""
    return sanitizer() == "address"


def opt_level() -> str:
    """g++ optimisation of the modules: CUGRAD_HARNESS_OPT, default -O1 (a balance of build
    and run time; -g1 keeps file:line in sanitizer reports)."""
    return os.environ.get("CUGRAD_HARNESS_OPT", "-O1")


def _base_flags() -> list[str]:
    flags = ["-std=c++20", opt_level(), "-g1", "-fno-strict-aliasing", "-fno-omit-frame-pointer",
             f"-I{INCLUDE_DIR}", f"-I{SRC_DIR}"]
    mode = sanitizer()
    if mode == "address":
        flags += ["-fsanitize=address,alignment", "-fno-sanitize-recover=all"]
    elif mode == "thread":
        flags += ["-fsanitize=thread"]
    return flags


_compiler_id_cache: str | None = None


def _compiler_id() -> str:
    global _compiler_id_cache
    if _compiler_id_cache is None:
        cxx = compiler()
        if cxx is None:
            raise HarnessError("no host C++ compiler (g++) found")
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        _compiler_id_cache = f"{cxx}\n{out.splitlines()[0] if out else ''}"
    return _compiler_id_cache


def _harness_sources_digest() -> str:
    h = hashlib.sha256()
    for d in (INCLUDE_DIR, SRC_DIR):
        for p in sorted(d.iterdir()):
            if p.is_file():
                h.update(p.name.encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def _run_compiler(cmd: list[str], out: Path, what: str) -> None:
    """Run g++ writing to a temporary name, then move it into place (safe under xdist)."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}.{threading.get_ident()}")
    proc = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        log = (proc.stdout + proc.stderr).strip()
        raise BuildError(f"building {what} failed:\n$ {' '.join(cmd)}\n{log[-8000:]}")
    os.replace(tmp, out)


_runner_lock = threading.Lock()


def build_runner() -> Path:
    """The runner executable, built once per harness version and compiler."""
    with _runner_lock:
        key = hashlib.sha256(f"{_compiler_id()}\n{_base_flags()}\n{_harness_sources_digest()}".encode())
        out = BUILD_DIR / f"runner-{key.hexdigest()[:16]}"
        if not out.exists():
            BUILD_DIR.mkdir(parents=True, exist_ok=True)
            _run_compiler([compiler(), *_base_flags(), str(SRC_DIR / "runner.cpp"), "-ldl"], out,
                          "the harness runner")
        return out


# ----------------------------------------------------------------------------- sources

_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_STRING_RE = re.compile(r'"(?:\\.|[^"\\\n])*"')
_EXTERN_SHARED_RE = re.compile(r"\bextern\s+__shared__\b[^;]*?\b([A-Za-z_]\w*)\s*\[\s*\]")
_ASM_RE = re.compile(r"\b(?:asm|__asm__|__asm)\b")
_ARCH_RE = re.compile(r"\b__CUDA_ARCH__\b")
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "static_assert", "decltype",
             "alignof", "catch", "__launch_bounds__", "__align__", "__attribute__", "defined"}


@dataclass
class SourceInfo:
    """What a static scan of one .cu file finds."""

    path: Path
    extern_shared: list[str]          # names of `extern __shared__ T name[]` arrays
    ptx_functions: dict[str, str]     # function name -> why it is GPU-only
    uses_cuda_arch: bool              # has `#if __CUDA_ARCH__` device-specific paths

    def gpu_only_reason(self, name_expression: str) -> str | None:
        base = re.split(r"[<(\s]", name_expression.strip(), maxsplit=1)[0].split("::")[-1]
        return self.ptx_functions.get(base)


def _strip(text: str) -> str:
    return _STRING_RE.sub('""', _COMMENT_RE.sub(" ", text))


def _top_level_functions(code: str) -> list[tuple[str, int, int]]:
    """(name, body_start, body_end) of every function body at namespace scope: a `{` at
    brace depth 0 (namespaces and extern "C" blocks are transparent) preceded by `)`."""
    out = []
    depth = 0
    transparent: list[int] = []   # depths whose braces opened a namespace / extern "C" block
    i = 0
    n = len(code)
    while i < n:
        c = code[i]
        if c == "{":
            head = code[max(0, i - 300):i]
            if re.search(r"\bnamespace\b[^;{}()]*$|\bextern\s*\"\"\s*$", head):
                transparent.append(depth)
                depth += 1
                i += 1
                continue
            if depth == len(transparent):
                # a top-level brace: find the matching close
                j, d = i + 1, 1
                while j < n and d:
                    d += {"{": 1, "}": -1}.get(code[j], 0)
                    j += 1
                m = re.search(r"([A-Za-z_]\w*)\s*(?:<[^;{}]*>)?\s*\([^;{}]*\)\s*[^;{}()]*$", head)
                if m and m.group(1) not in _KEYWORDS:
                    out.append((m.group(1), i, j))
                i = j
                continue
            depth += 1
        elif c == "}":
            depth -= 1
            if transparent and transparent[-1] == depth:
                transparent.pop()
        i += 1
    return out


_scan_cache: dict[tuple[str, int, int], SourceInfo] = {}


def scan_source(path: Path) -> SourceInfo:
    """Scan a kernel file (cached per file version)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _scan_cache:
        _scan_cache[key] = _scan(path)
    return _scan_cache[key]


def _scan(path: Path) -> SourceInfo:
    code = _strip(path.read_text())
    functions = _top_level_functions(code)
    bodies = {}
    for name, lo, hi in functions:
        bodies.setdefault(name, []).append(code[lo:hi])
    ptx: dict[str, str] = {}
    for name, parts in bodies.items():
        if any(_ASM_RE.search(b) for b in parts):
            ptx[name] = f"inline PTX (asm) in {name}()"
    # Anything that calls a PTX function is GPU-only too (to a fixed point).
    changed = True
    while changed:
        changed = False
        for name, parts in bodies.items():
            if name in ptx:
                continue
            used = set(_IDENT_RE.findall(" ".join(parts)))
            hit = sorted(used & set(ptx))
            if hit:
                ptx[name] = f"calls {hit[0]}(), which uses inline PTX (asm)"
                changed = True
    return SourceInfo(path=path, extern_shared=sorted(set(_EXTERN_SHARED_RE.findall(code))),
                      ptx_functions=ptx, uses_cuda_arch=bool(_ARCH_RE.search(code)))


# ----------------------------------------------------------------------------- modules

def host_options(options) -> tuple[list[str], list[str]]:
    """Split the loader's NVRTC options into those g++ understands (-D/-U/-I) and the rest."""
    kept, dropped = [], []
    it = iter(options)
    for opt in it:
        if opt in ("-D", "-U", "-I", "--define-macro", "--undefine-macro", "--include-path"):
            val = next(it, "")
            kept.append({"--define-macro": "-D", "--undefine-macro": "-U",
                         "--include-path": "-I"}.get(opt, opt) + val)
        elif opt.startswith(("-D", "-U", "-I")):
            kept.append(opt)
        elif opt.startswith(("--define-macro=", "--undefine-macro=", "--include-path=")):
            flag, val = opt.split("=", 1)
            kept.append({"--define-macro": "-D", "--undefine-macro": "-U", "--include-path": "-I"}[flag] + val)
        else:
            dropped.append(opt)
    return kept, dropped


@dataclass
class ModuleSpec:
    """One compilation: a source file, its options, the name expressions to instantiate."""

    source: Path
    options: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    def __post_init__(self):
        self.source = Path(self.source).resolve()
        self.options = tuple(self.options)
        self.names = tuple(self.names)

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(_compiler_id().encode())
        h.update(json.dumps([_base_flags(), list(self.options), list(self.names)]).encode())
        h.update(_harness_sources_digest().encode())
        src_dir = self.source.parent
        for p in sorted(src_dir.iterdir()):   # the file and whatever it may #include beside it
            if p.is_file() and (p == self.source or p.suffix in (".cuh", ".h", ".hpp", ".inc")):
                h.update(p.name.encode())
                h.update(p.read_bytes())
        return h.hexdigest()[:20]


def build_module(spec: ModuleSpec) -> Path:
    """Compile spec into a shared module (cached by content hash) and return its path."""
    cxx = compiler()
    if cxx is None:
        raise HarnessError("no host C++ compiler (g++) found")
    out_dir = BUILD_DIR / f"{spec.source.stem}-{spec.key()}"
    out = out_dir / "module.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    info = scan_source(spec.source)
    main_tu = out_dir / "module.cpp"
    lines = ['#include "cuda_shim.h"', f"#include {json.dumps(str(spec.source))}",
             '#include "cuh_module.h"', "CUH_BEGIN_ENTRIES"]
    lines += [f"CUH_ENTRY({json.dumps(n)}, {n})" for n in spec.names]
    lines += ["CUH_END_ENTRIES", ""]
    main_tu.write_text("\n".join(lines))
    dyn_tu = out_dir / "dyn_smem.cpp"
    dyn = [f"#define CAP {DYN_SMEM_CAPACITY}",
           "// The dynamic shared memory: every `extern __shared__` name is this buffer.",
           "alignas(256) thread_local unsigned char cuh_dyn_smem[CAP];"]
    dyn += [f'extern thread_local unsigned char {n}[CAP] __attribute__((alias("cuh_dyn_smem")));'
            for n in info.extern_shared if n != "cuh_dyn_smem"]
    dyn_tu.write_text("\n".join(dyn) + "\n")
    kept, _ = host_options(spec.options)
    cmd = [cxx, *_base_flags(), "-fPIC", "-shared", "-fvisibility=hidden",
           f"-I{spec.source.parent}", *kept, str(main_tu), str(dyn_tu)]
    _run_compiler(cmd, out, f"{spec.source.name} ({len(spec.names)} instantiations)")
    return out


def build_modules(specs, jobs: int | None = None) -> dict[int, Path | BaseException]:
    """Build several modules in parallel (one g++ per core); index -> path or the error."""
    jobs = jobs or max(1, os.cpu_count() or 1)
    results: dict[int, Path | BaseException] = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futs = {pool.submit(build_module, s): i for i, s in enumerate(specs)}
        for fut in concurrent.futures.as_completed(futs):
            try:
                results[futs[fut]] = fut.result()
            except BaseException as exc:   # noqa: BLE001 - reported per module
                results[futs[fut]] = exc
    return results


# ----------------------------------------------------------------------------- runner

_OP_LOAD, _OP_LAUNCH = 1, 2


class Runner:
    """The ASan-built runner process; restarted transparently after a fault."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._stderr_pos = 0
        self._modules: dict[Path, tuple[int, dict[str, tuple[int, str]]]] = {}
        self._lock = threading.RLock()
        atexit.register(self.close)

    def close(self):
        with self._lock:
            if self._proc is not None:
                try:
                    self._proc.stdin.close()
                    self._proc.wait(timeout=5)
                except Exception:  # noqa: BLE001
                    self._proc.kill()
            self._proc = None
            self._modules.clear()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def _start(self):
        exe = build_runner()
        env = dict(os.environ)
        env["ASAN_OPTIONS"] = ("detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=66:"
                               "detect_stack_use_after_return=0:allocator_may_return_null=0:"
                               + env.get("ASAN_OPTIONS", ""))
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=67:" + env.get("UBSAN_OPTIONS", "")
        env["TSAN_OPTIONS"] = ("halt_on_error=1:exitcode=68:report_signal_unsafe=0:"
                               + env.get("TSAN_OPTIONS", ""))
        env.pop("LD_PRELOAD", None)
        # The runner appends to a file this process reads through its own descriptor (a
        # shared descriptor would share the file offset).
        fd, path = tempfile.mkstemp(prefix="cuda_harness_", suffix=".log")
        os.close(fd)
        with open(path, "ab") as child_err:
            self._proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=child_err, env=env)
        self._stderr = open(path, "rb")
        os.unlink(path)
        self._stderr_pos = 0

    def _new_stderr(self) -> str:
        self._stderr.seek(self._stderr_pos)
        data = self._stderr.read()
        self._stderr_pos += len(data)
        return data.decode(errors="replace")

    def _died(self, what: str) -> KernelFault:
        proc = self._proc
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        report = self._new_stderr().strip()
        rc = proc.returncode
        self._proc = None
        self._modules.clear()
        cause = {66: "AddressSanitizer", 67: "UndefinedBehaviorSanitizer",
                 68: "ThreadSanitizer: a data race between threads of one block",
                 86: "harness fault"}.get(rc, f"exit status {rc}")
        return KernelFault(f"{what}: the kernel runner died ({cause}).\n{report[-12000:]}")

    def _exchange(self, payload: list, reply, what: str, timeout: float = LAUNCH_TIMEOUT_S):
        """Send the request pieces, then call reply(read) under a watchdog."""
        if self._proc is None:
            self._start()
        proc = self._proc
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for piece in payload:
                proc.stdin.write(piece)
            proc.stdin.flush()
            def read(n: int) -> bytes:
                buf = bytearray()
                while len(buf) < n:
                    chunk = proc.stdout.read(n - len(buf))
                    if not chunk:
                        raise EOFError
                    buf += chunk
                return bytes(buf)
            return reply(read)
        except (EOFError, BrokenPipeError, OSError):
            timed_out = not timer.is_alive() and proc.poll() is not None and proc.returncode == -9
            fault = self._died(what)
            if timed_out:
                fault = KernelFault(f"{what}: no answer within {timeout:.0f} s (an endless loop?); killed.\n{fault}")
            raise fault from None
        finally:
            timer.cancel()

    def load(self, path: Path) -> tuple[int, dict[str, tuple[int, str]]]:
        """Load a module once per runner: (module id, {name: (entry index, signature)})."""
        with self._lock:
            if self._proc is not None and path in self._modules:
                return self._modules[path]
            p = str(path).encode()

            def reply(read):
                status = struct.unpack("<I", read(4))[0]
                if status:
                    msg = read(struct.unpack("<I", read(4))[0]).decode()
                    raise HarnessError(f"loading {path}: {msg}")
                mod, n = struct.unpack("<II", read(8))
                entries = {}
                for i in range(n):
                    name = read(struct.unpack("<I", read(4))[0]).decode()
                    sig = read(struct.unpack("<I", read(4))[0]).decode()
                    entries[name] = (i, sig)
                return mod, entries

            result = self._exchange([struct.pack("<II", _OP_LOAD, len(p)), p], reply, f"loading {path.name}")
            self._modules[path] = result
            return result

    def launch(self, path: Path, name: str, grid, block, shared_mem: int, args: list,
               buffers: list, schedule: int, seed: int) -> list[bytes]:
        """args: ("s", bytes) | ("b", buffer index) | ("n", None); buffers: (memoryview, copy_back)."""
        with self._lock:
            mod, entries = self.load(path)
            entry = entries[name][0]
            pieces = [struct.pack("<III", _OP_LAUNCH, mod, entry),
                      struct.pack("<8IQ", *grid, *block, shared_mem, schedule, seed),
                      struct.pack("<I", len(buffers))]
            for data, copy_back in buffers:
                pieces += [struct.pack("<QB", data.nbytes, int(copy_back)), data]
            pieces.append(struct.pack("<I", len(args)))
            for kind, val in args:
                if kind == "s":
                    pieces += [struct.pack("<BI", 0, len(val)), val]
                else:
                    pieces.append(struct.pack("<BI", 1, 0xFFFFFFFF if val is None else val))

            def reply(read):
                status = struct.unpack("<I", read(4))[0]
                if status:
                    msg = read(struct.unpack("<I", read(4))[0]).decode()
                    raise LaunchError(f"{name}: {msg} (grid {tuple(grid)}, block {tuple(block)}, "
                                      f"shared_mem {shared_mem})")
                return [read(data.nbytes) if cb else None for data, cb in buffers]

            out = self._exchange(pieces, reply, f"launching {name} grid {tuple(grid)} block {tuple(block)}")
            extra = self._new_stderr().strip()
            if extra:
                warnings.warn(HarnessWarning(f"{name}: {extra[-4000:]}"), stacklevel=3)
            return out


_runner: Runner | None = None


def runner() -> Runner:
    global _runner
    if _runner is None:
        _runner = Runner()
    return _runner


# ----------------------------------------------------------------------------- kernels

def _dtype_code(dt: np.dtype) -> str:
    return f"{dt.kind}{dt.itemsize}" if dt.kind in "fiub" else f"V{dt.itemsize}"


def _dim3(v) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    v = tuple(int(x) for x in v) + (1,) * (3 - len(v))
    if len(v) != 3:
        raise LaunchError(f"a grid/block needs at most 3 dimensions, got {v}")
    return v


@dataclass
class CpuKernel:
    """One launchable instantiation, called like a CuPy kernel."""

    module: Path
    name: str
    signature: str
    schedule: str = "random"   # CpuContext passes its own (CUGRAD_HARNESS_SCHEDULE / _SEED)
    seed: int = 12345
    launches: int = 0

    @property
    def params(self) -> list[str]:
        return self.signature.split(",") if self.signature else []

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid, block = _dim3(grid), _dim3(block)
        params = self.params
        if len(args) != len(params):
            raise TypeError(f"{self.name} takes {len(params)} arguments ({self.signature}), "
                            f"got {len(args)}")
        packed, buffers, regions = [], [], []
        arrays: list[np.ndarray] = []
        for i, (a, code) in enumerate(zip(args, params)):
            where = f"{self.name}: argument {i} ({code})"
            if code.startswith("*"):
                is_const = code.startswith("*c")
                pointee = code[2:] if is_const else code[1:]
                if a is None or (isinstance(a, np.integer) and int(a) == 0):
                    packed.append(("n", None))
                    continue
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{where}: a pointer parameter needs a numpy array, got {type(a).__name__}")
                if not a.flags.c_contiguous:
                    raise TypeError(f"{where}: the array is not C-contiguous (the kernel would read it as if it were)")
                if pointee not in ("v",) and not pointee.startswith("V") and _dtype_code(a.dtype) != pointee:
                    raise TypeError(f"{where}: array of dtype {a.dtype} for a pointer to {pointee}")
                lo = a.__array_interface__["data"][0]
                hi = lo + a.nbytes
                idx = None
                for j, (rlo, rhi) in enumerate(regions):
                    if (rlo, rhi) == (lo, hi):
                        idx = j
                    elif lo < hi and rlo < rhi and lo < rhi and rlo < hi:   # empty: no overlap
                        raise HarnessError(f"{where}: partially overlaps another array argument; "
                                           "the harness supports only identical aliases")
                if idx is None:
                    regions.append((lo, hi))
                    arrays.append(a)
                    buffers.append([memoryview(a.reshape(-1).view(np.uint8)), False])
                    idx = len(buffers) - 1
                if not is_const:
                    buffers[idx][1] = True
                packed.append(("b", idx))
            else:
                if not isinstance(a, np.generic):
                    raise TypeError(f"{where}: scalars must be explicit numpy scalars (np.int32, "
                                    f"np.float32, ...): CuPy would guess the C type; got {type(a).__name__}")
                if not code.startswith("V") and _dtype_code(a.dtype) != code:
                    raise TypeError(f"{where}: numpy scalar of dtype {a.dtype} for a parameter of type {code}")
                packed.append(("s", a.tobytes()))
        if shared_mem < 0 or shared_mem > DYN_SMEM_CAPACITY:
            raise LaunchError(f"{self.name}: {shared_mem} bytes of dynamic shared memory")
        seed = (self.seed * 1_000_003 + self.launches) & (2**64 - 1)
        self.launches += 1
        results = runner().launch(self.module, self.name, grid, block, int(shared_mem), packed,
                                  [tuple(b) for b in buffers], SCHEDULES[self.schedule], seed)
        for a, (_, copy_back), data in zip(arrays, buffers, results):
            if not copy_back:
                continue
            new = np.frombuffer(data, dtype=np.uint8)
            flat = a.reshape(-1).view(np.uint8)
            if a.flags.writeable:
                flat[...] = new
            elif not np.array_equal(flat, new):
                raise HarnessError(f"{self.name} wrote into a read-only array argument")


# ----------------------------------------------------------------------------- context

def _poison(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind in "fc":
        arr.fill(np.nan)
    elif arr.dtype.kind in "iu":
        arr.fill(np.iinfo(arr.dtype).max // 3)   # a sentinel no index or count should be
    elif arr.dtype.kind == "b":
        arr.fill(True)
    return arr


try:  # the CUDA backend's context protocol, where it exists
    from cugrad.backends.cuda.context import Context as _ContextBase
except Exception:  # noqa: BLE001 - the harness also runs before the backend lands
    _ContextBase = object


class CpuContext(_ContextBase):
    """A cugrad CUDA-backend context whose arrays are numpy and whose kernels run on the CPU.

    instantiations: the backend's ``config.instantiations()`` (file, options, name
    expressions); kernels_dir: where the .cu files are (a copy, for planted-bug runs).
    Names not in any instantiation are built on demand with the file's first options.
    """

    xp = np

    def __init__(self, instantiations=None, kernels_dir: Path | str | None = None,
                 schedule: str | None = None, seed: int | None = None):
        self.kernels_dir = Path(kernels_dir) if kernels_dir is not None else KERNELS_DIR
        if instantiations is None:
            from cugrad.backends.cuda import config
            instantiations = config.instantiations()
        self.instantiations = [(f, tuple(opts), tuple(names)) for f, opts, names in instantiations]
        self.schedule = schedule or os.environ.get("CUGRAD_HARNESS_SCHEDULE", "random")
        if self.schedule not in SCHEDULES:
            raise HarnessError(f"unknown schedule {self.schedule!r}; one of {sorted(SCHEDULES)}")
        self.seed = int(os.environ.get("CUGRAD_HARNESS_SEED", "12345")) if seed is None else seed
        self._kernels: dict[tuple[str, str], CpuKernel] = {}
        self.calls: list[tuple[str, str]] = []            # every function() call, in order
        self.build_failures: dict[str, BaseException] = {}
        self.build_seconds = 0.0

    def prebuild(self, jobs: int | None = None) -> None:
        """Build every module of the instantiation table in parallel (one g++ per core);
        failures are kept and raised by the first function() call that needs the module."""
        import time
        t0 = time.perf_counter()
        build_runner()
        specs = self.module_specs()
        for i, result in build_modules(specs, jobs).items():
            if isinstance(result, BaseException):
                self.build_failures[specs[i].key()] = result
        self.build_seconds = time.perf_counter() - t0

    @property
    def launched(self) -> set[tuple[str, str]]:
        return set(self.calls)

    # the Context protocol ---------------------------------------------------
    def empty(self, shape, dtype):
        return _poison(np.empty(shape, dtype=dtype))

    def function(self, file: str, name_expression: str) -> "CpuKernel":
        key = (file, name_expression)
        kern = self._kernels.get(key)
        if kern is None:
            spec = self.spec_for(file, name_expression)
            info = scan_source(spec.source)
            reason = info.gpu_only_reason(name_expression)
            if reason:
                raise GpuOnly(f"{file}: {name_expression}: {reason}")
            failure = self.build_failures.get(spec.key())
            if failure is not None:
                raise failure
            path = build_module(spec)
            _, entries = runner().load(path)
            kern = CpuKernel(path, name_expression, entries[name_expression][1],
                             schedule=self.schedule, seed=self.seed)
            self._kernels[key] = kern
        self.calls.append(key)
        return kern

    # helpers ------------------------------------------------------------------
    def source(self, file: str) -> Path:
        return self.kernels_dir / file

    def spec_for(self, file: str, name_expression: str) -> ModuleSpec:
        """The module that holds name_expression: its instantiation's options and names,
        less the GPU-only names (they cannot be compiled for the host)."""
        info = scan_source(self.source(file))
        chosen = None
        for f, opts, names in self.instantiations:
            if f == file and name_expression in names:
                chosen = (opts, names)
                break
        if chosen is None:
            first = next((opts for f, opts, _ in self.instantiations if f == file), ())
            chosen = (first, (name_expression,))
        opts, names = chosen
        names = tuple(n for n in names if not info.gpu_only_reason(n))
        return ModuleSpec(self.source(file), tuple(opts), names)

    def module_specs(self) -> list[ModuleSpec]:
        specs = []
        for f, opts, names in self.instantiations:
            info = scan_source(self.source(f))
            runnable = tuple(n for n in names if not info.gpu_only_reason(n))
            if runnable:
                specs.append(ModuleSpec(self.source(f), opts, runnable))
        return specs

    def gpu_only(self) -> list[tuple[str, str, str]]:
        """(file, name expression or '*', reason) for everything the harness will not run."""
        out = []
        seen_arch = set()
        for f, _, names in self.instantiations:
            info = scan_source(self.source(f))
            for n in names:
                reason = info.gpu_only_reason(n)
                if reason:
                    out.append((f, n, reason))
            if info.uses_cuda_arch and f not in seen_arch:
                seen_arch.add(f)
                out.append((f, "*", "code under `#if __CUDA_ARCH__` (the harness leaves __CUDA_ARCH__ "
                                    "undefined, so only the generic path runs)"))
        return out


class GpuOnly(HarnessError):
    """The requested kernel uses inline PTX; it runs only on a GPU."""
