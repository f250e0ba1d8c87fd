"""From a compiled kernel to what it can reach on a GPU: occupancy, instructions per logit,
memory traffic by construction, the share of a second read that L2 can serve, and ceilings.

All of it is arithmetic on the SASS (benchmarks/static/sass.py) and on datasheet or measured
constants (``GPUS``); none of it is a measurement. What each figure means:

- instructions per logit: what one thread executes per logit it owns, in the steady state of a
  row: each hot loop's body (an innermost loop that reads logits tiles) times the iterations a
  row takes, plus the rest of the loop over tiles once per tile, divided by the logits a thread
  owns in a tile. Code before the tile loop (once per program) is left out.
- issue bound: an SM issues 4 warp-instructions per clock (128 thread-instructions), so the SMs
  can process sms * 128 * clock / (instructions per logit) logits a second. Times the bytes the
  call must move per logit (one read of the logits, plus one write of the gradient where it
  writes one), as a share of the GPU's copy bandwidth: above 100% the kernel is memory-bound.
- MUFU bound: the same with 16 special-function results per SM and clock (ex2, lg2, rcp).
- HBM reads and writes per logit, by construction of the variant: ONE_PASS reads each logit once
  (a tile lives in registers), TWO_PASS twice (statistics, then the gradient), the second read
  served by L2 for the share below; writes are the gradient's.
- L2 share of the second read (TWO_PASS with a gradient): rows in flight R (the programs resident
  at once, or the persistent grid), each streaming its row twice, the second pass in reverse.
  Between the two reads of a block d bytes before the row's end, each row brings 2 d new bytes
  into L2 (the rest of its first pass, and its gradient written by the second), so all rows
  bring 2 d R. The block is still there when 2 d R fits in L2 (less the class weights' row,
  resident throughout): the share is min(1, L2 / (2 R row_bytes)). L2 is taken whole and LRU:
  an optimistic plan, to be checked against a measurement.
- ceiling: the smaller of the issue, MUFU and HBM bounds, as a share of copy bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    clock_hz: float  # boost clock
    copy_Bps: float  # bytes read + written per second by a device-to-device copy
    copy_source: str
    l2_bytes: int


GPUS = (
    Gpu("H100", 90, 132, 1.98e9, 3.02e12, "measured on an H100 SXM 80GB, 2026-11-23 (90% of its 3.35 TB/s)",
        50 << 20),
    Gpu("H200", 90, 132, 1.98e9, 4.32e12, "not measured: 90% of the H200's 4.8 TB/s, as the H100's copy is of its "
        "datasheet figure", 50 << 20),
)


@dataclass(frozen=True)
class Arch:
    regs: int = 65536
    threads: int = 2048
    ctas: int = 32
    shared_bytes: int = 233472  # 228 KiB
    shared_reserved: int = 1024  # per CTA


ARCHS = {80: Arch(shared_bytes=167936), 90: Arch(), 100: Arch()}


def occupancy(arch: int, registers: int, warps: int, shared: int) -> dict:
    """CTAs of ``warps`` warps resident per SM, and what limits them. Registers are allocated per
    warp in 256-register units from each of the 4 sub-partitions' quarter of the register file."""
    a = ARCHS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    warps_by_regs = 4 * ((a.regs // 4) // per_warp) if per_warp else a.threads // 32
    limits = {
        "registers": warps_by_regs // warps,
        "threads": a.threads // (32 * warps),
        "shared memory": a.shared_bytes // (shared + a.shared_reserved),
        "CTAs": a.ctas,
    }
    by = min(limits, key=limits.get)
    return {"ctas_per_sm": limits[by], "warps_per_sm": limits[by] * warps, "limited_by": by}


# ---------------------------------------------------------------------------------------------
# per logit, from the SASS
# ---------------------------------------------------------------------------------------------


def _innermost(loops):
    return [l for l in loops if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]


def _encloses(outer, inner) -> bool:
    return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]


def hot_loops(sass) -> list:
    """Innermost loops that read tiles of logits."""
    tiles = [a.addr for a in sass.accesses if a.role == "logits"]
    return [l for l in _innermost(sass.loops) if any(l[0] <= t <= l[1] for t in tiles)]


def per_logit(sass, block_r: int, V: int, itemsize: int, threads: int) -> dict:
    """Instructions and MUFU ops a thread executes per logit in a row of V (see the module doc),
    and the global accesses of the hot code by role and width. A kernel without a loop over
    logits (one tile per program) is hot as a whole, per logit it loads."""
    owned = block_r * V / threads  # logits a thread owns in one tile
    hot = hot_loops(sass)
    instrs = mufu = 0.0
    if not hot:
        hot = [(sass.instrs[0].addr, sass.instrs[-1].addr)]
        owned = _loaded(sass, hot[0], itemsize)
        instrs, mufu = len(sass.instrs), _mufu(sass.instrs)
    else:
        for lo, hi in hot:
            body = sass.within(lo, hi)
            runs = owned / _loaded(sass, (lo, hi), itemsize)  # iterations per tile: 1 for the tile loop itself
            instrs += len(body) * runs
            mufu += _mufu(body) * runs
        tile_loops = [o for o in sass.loops if any(_encloses(o, h) for h in hot)]
        if tile_loops:
            lo, hi = min(tile_loops, key=lambda o: o[1] - o[0])
            rest = [i for i in sass.within(lo, hi) if not any(h[0] <= i.addr <= h[1] for h in hot)]
            instrs += len(rest)
            mufu += _mufu(rest)
    widths = {}
    for a in sass.accesses:
        if any(lo <= a.addr <= hi for lo, hi in hot) and a.role != "row":
            key = f"{a.role} {a.kind}s"
            widths.setdefault(key, {}).setdefault(a.bits, 0)
            widths[key][a.bits] += 1
    return {"instr_per_logit": instrs / owned, "mufu_per_logit": mufu / owned, "hot_loops": len(hot),
            "hot_accesses": {k: dict(sorted(v.items())) for k, v in sorted(widths.items())}}


def _loaded(sass, region, itemsize: int) -> float:
    """Logits one thread loads in a region of the code."""
    lo, hi = region
    return sum(a.bits / (8 * itemsize) for a in sass.accesses
               if a.role == "logits" and a.kind == "load" and lo <= a.addr <= hi)


def _mufu(instrs) -> int:
    return sum(1 for i in instrs if i.op.startswith("MUFU"))


# ---------------------------------------------------------------------------------------------
# memory traffic and ceilings
# ---------------------------------------------------------------------------------------------


def rows_in_flight(block_r: int, programs_per_sm: int, ctas_per_sm: int, sms: int, rows: int) -> int:
    """Rows whose tiles are being streamed at once on the whole GPU."""
    programs = sms * (min(ctas_per_sm, programs_per_sm) if programs_per_sm else ctas_per_sm)
    return min(rows, programs * block_r)


def l2_share(row_bytes: int, rows: int, l2_bytes: int, resident_bytes: int = 0) -> float:
    """Share of a row's second read that L2 still holds (see the module doc)."""
    free = max(l2_bytes - resident_bytes, 0)
    return min(1.0, free / (2 * rows * row_bytes)) if rows and row_bytes else 1.0


def traffic(mode: str, grad: bool, share: float) -> tuple[float, float]:
    """(HBM reads, HBM writes) per logit, in logits' sizes, of a kernel in ``mode`` (a name of
    variants.config_of) that writes the gradient or not."""
    second = (1.0 - share) if (mode == "two_pass" and grad) else 0.0
    return 1.0 + second, 1.0 if grad else 0.0


def bounds(gpu: Gpu, instr_per_logit: float, mufu_per_logit: float, itemsize: int, grad: bool,
           reads: float, writes: float) -> dict:
    """Ceilings as shares of ``gpu``'s copy bandwidth, for a call that must move one read (and one
    write with a gradient) of each logit."""
    needed = itemsize * (2 if grad else 1)
    issue = gpu.sms * 128 * gpu.clock_hz / instr_per_logit * needed / gpu.copy_Bps
    mufu = gpu.sms * 16 * gpu.clock_hz / mufu_per_logit * needed / gpu.copy_Bps if mufu_per_logit else float("inf")
    hbm = (2.0 if grad else 1.0) / (reads + writes)
    return {"issue": issue, "mufu": mufu, "hbm": hbm, "ceiling": min(issue, mufu, hbm)}
