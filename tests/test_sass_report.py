"""profiling/sass_report.py's parsing, on a hand-written cuobjdump listing (no CUDA toolkit
needed): functions, predicated opcodes, the hot loop, resource usage, the table's grouping."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "profiling" / "sass_report.py")
sass_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_report)


def _line(address: int, text: str) -> str:
    return (f"        /*{address:04x}*/                   {text} ;     /* 0x0000000000000000 */\n"
            "                                                          /* 0x000fe20000000800 */\n")


LISTING = (
    "\n\tcode for sm_90\n\t.target\tsm_90\n\n"
    "\t\tFunction : _Z3twoPf\n"
    '\t.headerflags\t@"EF_CUDA_SM90"\n'
    + _line(0x00, "LDC R1, c[0x0][0x28]")
    # loop 1 (0x10-0x40): a copy loop, no FMA
    + _line(0x10, "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]")
    + _line(0x20, "STG.E.128 desc[UR4][R6.64], R4")
    + _line(0x30, "ISETP.GE.AND P0, PT, R0, R8, PT")
    + _line(0x40, "@!P0 BRA 0x10")
    # loop 2 (0x50-0xb0): the multiply-adds, predicated ones included
    + _line(0x50, "LDS.128 R12, [R9]")
    + _line(0x60, "LDS R16, [R9+0x10]")
    + _line(0x70, "FFMA R20, R12, R16, R20")
    + _line(0x80, "@P1 FFMA.FTZ R21, R13, R16, R21")   # -ftz=true: CuPy's, so ours too
    + _line(0x90, "BAR.SYNC.DEFER_BLOCKING 0x0")
    + _line(0xa0, "STS [R9], R20")
    + _line(0xb0, "@P2 BRA 0x50")
    + _line(0xc0, "EXIT")
    + _line(0xd0, "BRA 0xd0")          # the trailing self-loop every kernel ends with
    + "\t\tFunction : _Z3onePf\n"
    + _line(0x00, "LDG.E R2, desc[UR4][R2.64]")
    + _line(0x10, "STG.E desc[UR4][R4.64], R2")
    + _line(0x20, "EXIT")
)

RESOURCES = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z3twoPf:
  REG:40 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3onePf:
  REG:8 STACK:16 SHARED:0 LOCAL:4 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_sass_splits_functions_and_strips_predicates():
    functions = sass_report.parse_sass(LISTING)
    assert sorted(functions) == ["_Z3onePf", "_Z3twoPf"]
    two = functions["_Z3twoPf"]
    assert len(two) == 14 and two[0] == (0x00, "LDC R1, c[0x0][0x28]")
    assert [sass_report.opcode(t) for _, t in two[7:9]] == ["FFMA", "FFMA.FTZ"]
    assert sass_report.loops(two) == [(0x10, 0x40), (0x50, 0xb0)]   # BRA 0xd0 is no loop


def test_hot_loop_is_the_one_with_the_multiply_adds():
    loop = sass_report.hot_loop(sass_report.parse_sass(LISTING)["_Z3twoPf"])
    assert (loop["first"], loop["last"]) == ("0x50", "0xb0")
    assert loop["instructions"] == 7 and loop["fma"] == 2 and loop["fma_share"] == round(2 / 7, 3)
    assert loop["shared_loads"] == {"LDS": 1, "LDS.128": 1}
    assert loop["shared_stores"] == {"STS": 1} and loop["barriers"] == 1
    assert loop["global_loads"] == {} and loop["local"] == 0


def test_hot_loop_without_multiply_adds_is_the_memory_loop():
    two = sass_report.parse_sass(LISTING)["_Z3twoPf"]
    copy_only = [(a, t) for a, t in two if a < 0x50 or a > 0xb0]
    loop = sass_report.hot_loop(copy_only)
    assert (loop["first"], loop["fma"]) == ("0x10", 0)
    assert loop["global_loads"] == {"LDG.E.128.CONSTANT": 1}
    assert loop["global_stores"] == {"STG.E.128": 1}
    assert sass_report.hot_loop(sass_report.parse_sass(LISTING)["_Z3onePf"]) is None


def test_global_access_counts_the_whole_kernel():
    functions = sass_report.parse_sass(LISTING)
    assert sass_report.global_access(functions["_Z3onePf"]) == {"LDG.E": 1, "STG.E": 1}


def test_parse_resources():
    res = sass_report.parse_resources(RESOURCES)
    assert res["_Z3twoPf"]["REG"] == 40 and res["_Z3twoPf"]["SHARED"] == 1024
    assert (res["_Z3onePf"]["STACK"], res["_Z3onePf"]["LOCAL"]) == (16, 4)


def test_template_arguments_and_table_grouping():
    assert sass_report._template("f<a, G<1, 2>, b>") == ("f", ["a", "G<1, 2>", "b"])
    assert sass_report._template("plain") == ("plain", [])

    def kernel(name, regs, fma):
        loop = {"instructions": 10, "fma": fma, "fma_share": fma / 10, "shared_loads": {},
                "global_loads": {}, "shared_stores": {}, "barriers": 0}
        return {"kernel": name, "registers": regs, "stack": 0, "local": 0, "hot_loop": loop,
                "global_access": {"LDG.E": 1}}

    rows = sass_report.collapse([kernel("k<float, 0>", 30, 4), kernel("k<float, 1>", 32, 4),
                                 kernel("k<double, 0>", 40, 2)])
    assert [(name, regs) for name, regs, _ in rows] == [("k<float, *>", "30-32 (2)"),
                                                        ("k<double, 0>", "40 (1)")]
    table = sass_report.table({"kernels": [kernel("k<float, 0>", 30, 4)]})
    assert "| `k<float, 0>` | 30 (1) | 0/0 | 10 | 4 | 40% |" in table
