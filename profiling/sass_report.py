"""Static report on the machine code (SASS) of cugrad's kernels: no GPU needed.

For every kernel instantiation the CUDA backend can launch (``config.instantiations()``), or
those whose name contains --filter, compiles its module with nvcc to a cubin for --arch,
disassembles it with cuobjdump and reports, per kernel:

  * the resources ptxas gave it: registers, local memory (spills show up as LOCAL > 0 or a
    stack frame), static shared memory;
  * its hot loop: of the loops in the code (a backward branch and the instructions it jumps
    over), the one with the most floating-point multiply-adds, and that loop's instruction
    mix (FFMA/DFMA, shared loads by width, global loads by width, shared stores, barriers,
    the share of FMAs among all its instructions).

What it answers for the GEMM (issue 8's ladder, profiling/NOTES.md): are the shared-memory
operand loads 16-byte (LDS.128), is the inner loop FFMA-dense, are there spills. It does not
measure speed: that needs the GPU (``python -m cugrad bench``).

    python profiling/sass_report.py [--arch sm_90] [--filter gemm_tiled] [--out DIR]

Writes DIR/sass-<arch>-<yyyymmdd>.json (every kernel) and .md (a table) when --out is given,
and prints the table. Needs nvcc and cuobjdump from the CUDA toolkit (NVCC=..., CUOBJDUMP=...
where they are not on PATH); c++filt, where present, turns the symbols back into the
template names the backend uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cugrad.backends.cuda import config  # noqa: E402
from cugrad.backends.cuda.loader import instantiation_unit  # noqa: E402

FMA_OPS = ("FFMA", "DFMA", "HFMA2")     # with their modifiers: FFMA.FTZ under -ftz=true


def _fmas(ops: Counter) -> int:
    return sum(n for o, n in ops.items() if o.split(".")[0] in FMA_OPS)


def find_tool(name: str) -> str | None:
    env = os.environ.get(name.upper().replace("+", "X"))
    if env:
        return env
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / name
    return str(candidate) if candidate.exists() else None


def tool_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else out.strip().splitlines()[-1]


# ---------------------------------------------------------------------------- parsing

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass output -> {symbol: [(address, instruction without predicate)]}."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = functions.setdefault(head.group(1), [])
            continue
        m = _INSTRUCTION.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2).strip()))
    return functions


def opcode(instruction: str) -> str:
    return _PREDICATE.sub("", instruction).split()[0] if instruction else ""


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop: a branch back to an earlier address."""
    found = []
    for address, text in instructions:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            found.append((int(m.group(1), 16), address))
    return found


FP_OPS = ("FADD", "FMUL", "DADD", "DMUL", "FMNMX", "DMNMX", "MUFU")


def _family(ops: Counter, prefix: str) -> dict[str, int]:
    return {o: n for o, n in sorted(ops.items()) if o == prefix or o.startswith(prefix + ".")}


def hot_loop(instructions: list[tuple[int, str]]) -> dict | None:
    """The loop with the most multiply-adds; where no loop has any (a reduction, an
    element-wise kernel), the one with the most floating-point and global-memory
    instructions; the innermost one on a tie. Its instruction mix, or None without loops."""
    best = None
    for first, last in loops(instructions):
        ops = Counter(opcode(t) for a, t in instructions if first <= a <= last)
        fmas = _fmas(ops)
        work = sum(n for o, n in ops.items() if o.split(".")[0] in FP_OPS + ("LDG", "STG"))
        key = (fmas, work, -(last - first))
        if best is None or key > best[0]:
            best = (key, first, last, ops)
    if best is None:
        return None
    _, first, last, ops = best
    total = sum(ops.values())
    fmas = _fmas(ops)
    return {
        "first": hex(first), "last": hex(last), "instructions": total, "fma": fmas,
        "fma_share": round(fmas / total, 3),
        "shared_loads": _family(ops, "LDS"), "shared_stores": _family(ops, "STS"),
        "global_loads": _family(ops, "LDG"), "global_stores": _family(ops, "STG"),
        "barriers": sum(n for o, n in ops.items() if o.startswith("BAR")),
        "local": sum(n for o, n in ops.items() if o.startswith(("LDL", "STL"))),
    }


def global_access(instructions: list[tuple[int, str]]) -> dict[str, int]:
    """Every global load and store of the kernel, by opcode (the width is in the opcode:
    LDG.E is 4 bytes, .64 8, .128 16)."""
    ops = Counter(opcode(t) for _, t in instructions)
    return {**_family(ops, "LDG"), **_family(ops, "STG")}


def parse_resources(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage output -> {symbol: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*Function (\S+):", line)
        if head:
            current = head.group(1)
            continue
        if current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return out


def demangle(symbols: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not symbols:
        return {s: s for s in symbols}
    out = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True).stdout
    names = out.splitlines()
    if len(names) != len(symbols):
        return {s: s for s in symbols}
    # "void gemm_tiled<float, ...>(float const*, ...)" -> "gemm_tiled<float, ...>"
    return {s: re.sub(r"^void ", "", n).split("(")[0] for s, n in zip(symbols, names)}


# ---------------------------------------------------------------------------- compiling

def compile_module(nvcc: str, cuobjdump: str, module, arch: str, workdir: Path, index: int):
    file, options, names = module
    tu = workdir / f"m{index}_{arch}.cu"
    tu.write_text(instantiation_unit(file, names))
    cubin = tu.with_suffix(".cubin")
    done = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *options, "-o", str(cubin), str(tu)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sass_report: nvcc -arch={arch} failed on {file}:\n"
                         f"{(done.stderr or done.stdout).strip()}")
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], check=True, capture_output=True,
                         text=True).stdout
    return file, options, sass, res


def report(arch: str, name_filter: str) -> dict:
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    missing = [n for n, t in (("nvcc", nvcc), ("cuobjdump", cuobjdump)) if t is None]
    if missing:
        raise SystemExit(f"sass_report: {', '.join(missing)} not found (set NVCC/CUOBJDUMP or put "
                         "the CUDA toolkit's bin on PATH)")
    modules = [(f, o, [n for n in names if name_filter in n]) for f, o, names in config.instantiations()]
    modules = [m for m in modules if m[2]]
    kernels = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        jobs = [pool.submit(compile_module, nvcc, cuobjdump, m, arch, Path(tmp), i)
                for i, m in enumerate(modules)]
        for job in jobs:
            file, options, sass, res = job.result()
            functions, resources = parse_sass(sass), parse_resources(res)
            names = demangle(sorted(functions))
            for symbol, instructions in sorted(functions.items()):
                r = resources.get(symbol, {})
                kernels.append({
                    "kernel": names[symbol], "file": file, "options": list(options),
                    "registers": r.get("REG"), "stack": r.get("STACK"), "local": r.get("LOCAL"),
                    "shared_static": r.get("SHARED"), "instructions": len(instructions),
                    "global_access": global_access(instructions),
                    "hot_loop": hot_loop(instructions),
                })
    return {
        "arch": arch, "filter": name_filter, "date": datetime.date.today().isoformat(),
        "nvcc": tool_version(nvcc), "cuobjdump": tool_version(cuobjdump), "kernels": kernels,
    }


def _template(name: str) -> tuple[str, list[str]]:
    """"f<a, G<1, 2>, b>" -> ("f", ["a", "G<1, 2>", "b"]) (top-level template arguments)."""
    head, _, rest = name.partition("<")
    args, depth, cur = [], 0, ""
    for ch in rest[:-1] if rest.endswith(">") else rest:
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "<") - (ch == ">")
        cur += ch
    if cur.strip():
        args.append(cur.strip())
    return head, args


def collapse(kernels: list[dict]) -> list[tuple[str, str, dict]]:
    """Rows of the table: instantiations of one template whose spills and hot loop are the same
    are one row, the template arguments that differ among them shown as *, registers as a range."""
    groups: dict[tuple, list[dict]] = {}
    for k in kernels:
        head, args = _template(k["kernel"])
        key = (head, len(args), k["stack"], k["local"],
               json.dumps([k["hot_loop"], k["global_access"]], sort_keys=True))
        groups.setdefault(key, []).append(k)
    rows = []
    for members in groups.values():
        head, _ = _template(members[0]["kernel"])
        columns = list(zip(*(_template(m["kernel"])[1] for m in members)))
        args = [c[0] if len(set(c)) == 1 else "*" for c in columns]
        name = f"{head}<{', '.join(args)}>" if columns else head
        regs = sorted({m["registers"] for m in members if m["registers"] is not None})
        reg_text = (f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}-{regs[-1]}") if regs else "?"
        rows.append((name, f"{reg_text} ({len(members)})", members[0]))
    return rows


def table(result: dict) -> str:
    rows = ["| kernels (* = varies) | regs (count) | stack/local B | hot loop: instructions | FMA | "
            "FMA share | shared loads | global loads | shared stores | barriers | "
            "whole kernel: global loads and stores |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda d: ", ".join(f"{o} {n}" for o, n in d.items()) or "-"  # noqa: E731
    for name, regs, k in collapse(result["kernels"]):
        loop = k["hot_loop"]
        loop_cells = (f"{loop['instructions']} | {loop['fma']} | {loop['fma_share']:.0%} | "
                      f"{fmt(loop['shared_loads'])} | {fmt(loop['global_loads'])} | "
                      f"{fmt(loop['shared_stores'])} | {loop['barriers']}") if loop else "- | - | - | - | - | - | -"
        rows.append(f"| `{name}` | {regs} | {k['stack']}/{k['local']} | {loop_cells} | "
                    f"{fmt(k['global_access'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--filter", default="", help="only kernels whose template name contains this")
    p.add_argument("--out", type=Path, help="write sass-<arch>-<date>.json and .md here")
    args = p.parse_args(argv)
    result = report(args.arch, args.filter)
    if not result["kernels"]:
        why = (f"no kernel's template name contains {args.filter!r}" if args.filter else
               "cuobjdump listed no kernel in the compiled modules")
        print(f"sass_report: {why}", file=sys.stderr)
        return 2
    text = (f"SASS of {len(result['kernels'])} kernels, {result['arch']}, {result['nvcc']}, "
            f"cuobjdump {result['cuobjdump']}, {result['date']}\n\n{table(result)}\n")
    print(text)
    spilled = [k["kernel"] for k in result["kernels"] if (k["stack"] or 0) or (k["local"] or 0)]
    print(f"kernels with a stack frame or local memory: {len(spilled)}" + (f": {spilled}" if spilled else ""))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"sass-{args.arch}-{result['date'].replace('-', '')}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(text)
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
