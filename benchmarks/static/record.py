"""The static report's record: one entry per compiled kernel, one row per (call, variant), the
figures derived for a GPU, and the targets each row is held to.

Targets (what a kernel variant that may run must show):
- no spill: no local-memory store or load in the code;
- 128-bit accesses: every load of a logits tile and every store of a gradient tile in the hot
  code moves 16 bytes a thread (at least one of each where the call has them);
- at most 40 SASS instructions per logit for plain and label-smoothed calls, 50 otherwise;
- at most two HBM reads and one write of each logit (by construction of the variant).
"""

from __future__ import annotations

from benchmarks.static import model, sass, variants

INSTR_LIMIT = {"plain": 40, "smoothing": 40}
INSTR_LIMIT_OTHERWISE = 50


def kernel_record(kernel, arch: int) -> dict:
    """What one compiled kernel is, independent of the V it runs at."""
    cfg = variants.config_of(kernel)
    cubin = kernel.asm["cubin"]
    code = sass.parse(sass.disassemble(cubin))
    res = sass.resources(cubin)
    spill_st, spill_ld = sass.spill_bytes(code)
    shared = kernel.metadata.shared
    return {
        "config": config_name(cfg),
        "mode": cfg.mode,
        "writes_gradient": cfg.writes_gradient,
        "block_r": cfg.block_r,
        "block_c": cfg.block_c,
        "programs_per_sm": cfg.programs_per_sm,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        **res,
        "spill_store_bytes": spill_st,
        "spill_load_bytes": spill_ld,
        "shared_bytes": shared,
        "occupancy": model.occupancy(arch, res["registers"], cfg.num_warps, shared),
        "sass_instructions": len(code.instrs),
        "counts": dict(sorted(sass.counts(code.instrs).items())),
        "specialisation": variants.specialisation(kernel),
        "_code": code,  # dropped from the JSON
        "_cfg": cfg,
    }


def config_name(cfg) -> str:
    name = f"{cfg.mode} {cfg.block_r}x{cfg.block_c} {cfg.num_warps}w"
    if cfg.num_stages != 1:
        name += f" {cfg.num_stages}st"
    if cfg.reverse:
        name += " rev"
    if cfg.programs_per_sm:
        name += f" {cfg.programs_per_sm}/SM"
    return name


def row(call: variants.Call, arch: int, kid: str, k: dict) -> dict:
    """One variant of one call: per-logit figures at its V, traffic, the L2 plan, ceilings."""
    cfg = k["_cfg"]
    per = model.per_logit(k["_code"], cfg.block_r, call.V, call.itemsize, 32 * cfg.num_warps)
    out = {
        "target": f"sm_{arch}", "entry": call.entry, "dtype": call.dtype, "V": call.V, "features": call.features,
        "choice": call.choice, "rows": variants.rows(call), "kernel": kid, "config": k["config"], **per,
    }
    features = (variants.SOFT_FEATURES if call.entry.startswith("soft") else variants.FEATURES)[call.features]
    weights_bytes = call.V * 4 if features.get("weight") else 0
    if arch == 90:
        out["gpus"] = {}
        for gpu in model.GPUS:
            in_flight = model.rows_in_flight(cfg.block_r, cfg.programs_per_sm,
                                             k["occupancy"]["ctas_per_sm"], gpu.sms, variants.plan_rows(call))
            share = model.l2_share(call.V * call.itemsize, in_flight, gpu.l2_bytes, weights_bytes)
            reads, writes = model.traffic(cfg.mode, cfg.writes_gradient, share)
            reads *= variants.tensors_read(call)  # a soft call reads its target as often as its logits
            out["gpus"][gpu.name] = {
                "rows_in_flight": in_flight, "l2_share_of_second_read": share if reads > 1 or share < 1 else None,
                "hbm_reads_per_logit": reads, "hbm_writes_per_logit": writes,
                **model.bounds(gpu, per["instr_per_logit"], per["mufu_per_logit"], call.itemsize, cfg.writes_gradient,
                               reads, writes),
            }
    else:
        reads, writes = model.traffic(cfg.mode, cfg.writes_gradient, 0.0)
        out["hbm_reads_per_logit"], out["hbm_writes_per_logit"] = reads * variants.tensors_read(call), writes
    out["checks"] = checks(call, k, out)
    return out


def checks(call: variants.Call, k: dict, r: dict) -> dict:
    """Each target: True when met."""
    acc = r["hot_accesses"]
    loads = acc.get("logits loads", {})
    stores = acc.get("gradient stores", {})
    grad = k["_cfg"].writes_gradient
    vector = (bool(loads) and set(loads) == {128} and (set(stores) == {128} if grad else not stores)
              and not any(key.startswith("unresolved") for key in acc))
    limit = INSTR_LIMIT.get(call.features, INSTR_LIMIT_OTHERWISE)
    reads, writes = model.traffic(k["_cfg"].mode, grad, 0.0)  # the second read all from HBM
    return {
        "no_spill": k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0,
        "vector_128": vector,
        "instructions": r["instr_per_logit"] <= limit,
        "traffic": reads <= 2 and writes <= 1,
    }


def public(k: dict) -> dict:
    return {key: v for key, v in k.items() if not key.startswith("_")}
