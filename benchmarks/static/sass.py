"""What a compiled kernel says about itself: resources, and its SASS read instruction by instruction.

Everything comes from the binary Triton built (``CompiledKernel.asm["cubin"]``) through the tools
its wheel bundles: ``cuobjdump -res-usage`` for registers and stack, ``nvdisasm -g`` for the SASS
with each instruction's source line. Spills are the local-memory stores and loads in the SASS
(``STL`` / ``LDL``), in bytes, as ptxas counts them. A global access gets its role from the jit
function whose source holds the ``tl.load`` / ``tl.store`` it came from (``ROLES``): which loads
read the logits' tiles is read from the code, never guessed from widths or order. An access
whose line holds no such call is "unresolved", and fails every check that looks for its role.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import triton

# jit helper -> the role of the global accesses in its body
ROLES = {
    "logits_tile": "logits",  # a tile of the logits (kernels/triton_tiles.py, both ops' kernels)
    "store_gradient_tile": "gradient",  # a tile of the gradient
    "class_weights_tile": "weights",  # a tile of the class weights
    "_target_tile": "target",  # a tile of the target distribution (kernels/soft_cross_entropy_triton.py)
}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def tool(name: str) -> str:
    return os.path.join(_BIN, name)


@dataclass(frozen=True)
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. LDG.E.128
    operands: str
    file: str
    line: int
    labels: tuple = ()


@dataclass
class Access:
    """A global memory instruction: what it moves (role), how wide (bits), where (address)."""

    kind: str  # "load" or "store"
    role: str
    bits: int
    addr: int


@dataclass
class Sass:
    instrs: list
    loops: list  # (first address, last address) of each loop, from its backward branch
    accesses: list = field(default_factory=list)

    def within(self, lo: int, hi: int) -> list:
        return [i for i in self.instrs if lo <= i.addr <= hi]


# ---------------------------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------------------------

def _run(args, data: bytes, suffix: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        return subprocess.run(args + [path], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes per thread of the kernel in ``cubin``."""
    text = _run([tool("cuobjdump"), "-res-usage"], cubin, ".cubin")
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK line:\n{text}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}


# ---------------------------------------------------------------------------------------------
# SASS
# ---------------------------------------------------------------------------------------------

_FILE = re.compile(r'//## File "(.*)", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def disassemble(cubin: bytes) -> str:
    return _run([tool("nvdisasm"), "-g", "-c"], cubin, ".cubin")


def parse(text: str) -> Sass:
    instrs, pending, where = [], [], ("", 0)
    for line in text.splitlines():
        if m := _FILE.search(line):
            where = (m.group(1), int(m.group(2)))
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.search(line):
            if m.group(2) == "NOP":
                continue
            instrs.append(Instr(int(m.group(1), 16), m.group(2), m.group(3).strip(), where[0], where[1],
                                tuple(pending)))
            pending = []
    at = {label: i.addr for i in instrs for label in i.labels}
    loops = set()
    for i in instrs:
        if i.op.startswith("BRA") and (m := re.search(r"\.L_x_\d+", i.operands)):
            target = at.get(m.group(0))
            if target is not None and target < i.addr:
                loops.add((target, i.addr))
    sass = Sass(instrs, sorted(loops))
    sass.accesses = [a for i in instrs if (a := _access(i)) is not None]
    return sass


def width_bits(op: str) -> int:
    """Bits one thread moves with a memory instruction (LDG.E.128: 128; LDG.E.U16: 16; LDG.E: 32)."""
    parts = op.split(".")[1:]
    for p, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if p in parts:
            return bits
    return 32


def _access(i: Instr):
    base = i.op.split(".")[0]
    if base not in ("LDG", "STG", "LDGSTS"):
        return None
    return Access("store" if base == "STG" else "load", role_of(i.file, i.line), width_bits(i.op), i.addr)


@functools.cache
def _source(path: str) -> tuple:
    """(lines, (first line, last line, name) of every function) of a source file."""
    try:
        with open(path) as f:
            text = f.read()
        tree = ast.parse(text)
    except (OSError, SyntaxError):
        return (), ()
    return tuple(text.splitlines()), tuple((n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
                                           if isinstance(n, ast.FunctionDef))


# Triton gives the element i of a masked vector load the line of its tl.load plus i: the line
# reported for a 4-register load may be 3 below the call.
_LINE_SLACK = 7


def role_of(path: str, line: int) -> str:
    """The role of a memory access reported at ``path:line``: that of the innermost function
    holding the tl.load / tl.store it came from (the nearest such call at or above the line), or
    "row" for the other accesses (labels, scales, per-row results)."""
    lines, functions = _source(path)
    for at in range(line, max(line - _LINE_SLACK, 1) - 1, -1):
        if at <= len(lines) and ("tl.load(" in lines[at - 1] or "tl.store(" in lines[at - 1]):
            holding = [(lo, name) for lo, hi, name in functions if lo <= at <= hi]
            return ROLES.get(max(holding)[1], "row") if holding else "row"
    return "unresolved"


def counts(instrs) -> Counter:
    """Opcode classes of interest: MUFU ops, spills (STL/LDL), shared memory, barriers, atomics."""
    c = Counter()
    for i in instrs:
        base = i.op.split(".")[0]
        if base == "MUFU":
            c["mufu"] += 1
        elif base in ("STL", "LDL", "LDS", "STS", "BAR", "ATOMG", "ATOM", "RED", "REDG", "MEMBAR", "SHFL"):
            c[base.lower()] += 1
    return c


def spill_bytes(sass: Sass) -> tuple[int, int]:
    """(bytes of local-memory stores, of loads) in the code: ptxas's spill stores and loads."""
    st = sum(width_bits(i.op) // 8 for i in sass.instrs if i.op.startswith("STL"))
    ld = sum(width_bits(i.op) // 8 for i in sass.instrs if i.op.startswith("LDL"))
    return st, ld
