"""Wheels packed into parts of bounded size, and joined again on the other side.

A bundle is a folder of parts ``part1/``, ``part2/``, ... Each part holds whole wheels or pieces
of a wheel too large for one part, and a ``MANIFEST.json`` naming what it holds:

    {"target": {"python_version": "3.12", "implementation": "cp", "platforms": [...]},
     "wheels": {"x-1.0-py3-none-any.whl": ["part1", "part2"], ...},
     "pieces": [{"wheel": "x-1.0-py3-none-any.whl", "sha256": ..., "size": ..., "index": 0,
                 "count": 2, "file": "x-1.0-py3-none-any.whl.0", "offset": 0, "length": ...}, ...]}

where ``sha256`` and ``size`` are the whole wheel's, ``wheels`` names every wheel of the bundle and
the parts that hold it. Parts can arrive one at a time: :func:`unpack` joins every wheel whose
pieces have all arrived and checks it against its hash, and names the parts still missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

MANIFEST = "MANIFEST.json"
MIB = 2**20


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Part:
    name: str
    pieces: list = dataclasses.field(default_factory=list)  # manifest entries
    size: int = 0


def plan_parts(wheels: list[str], part_bytes: int) -> list[Part]:
    """Assign wheels (in the given order, most wanted first) to parts of at most ``part_bytes``:
    each wheel goes whole into the first part with room for it; one too large for any part is cut
    into pieces that fill the last part and as many new parts as it needs."""
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    parts: list[Part] = []

    def new_part() -> Part:
        parts.append(Part(f"part{len(parts) + 1}"))
        return parts[-1]

    for path in wheels:
        size = os.path.getsize(path)
        entry = {"wheel": os.path.basename(path), "sha256": sha256(path), "size": size}
        room = next((p for p in parts if p.size + size <= part_bytes), None)
        if room is not None or size <= part_bytes:
            part = room or new_part()
            part.pieces.append({**entry, "index": 0, "count": 1, "file": entry["wheel"], "offset": 0,
                                "length": size})
            part.size += size
            continue
        cuts, offset = [], 0
        part = parts[-1] if parts and parts[-1].size < part_bytes else new_part()
        while offset < size:
            length = min(part_bytes - part.size, size - offset)
            cuts.append((part, offset, length))
            part.size += length
            offset += length
            if offset < size:
                part = new_part()
        for index, (part, offset, length) in enumerate(cuts):
            part.pieces.append({**entry, "index": index, "count": len(cuts), "file": f"{entry['wheel']}.{index}",
                                "offset": offset, "length": length})
    return parts


def pack(wheels: list[str], out_dir: str, part_bytes: int, target: dict) -> list[Part]:
    """Write the parts of ``wheels`` under ``out_dir`` (replacing earlier parts there)."""
    sources = {os.path.basename(p): p for p in wheels}
    parts = plan_parts(wheels, part_bytes)
    for old in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        if old.startswith("part") and os.path.isdir(os.path.join(out_dir, old)):
            shutil.rmtree(os.path.join(out_dir, old))
    holders: dict[str, list[str]] = {}
    for part in parts:
        for piece in part.pieces:
            holders.setdefault(piece["wheel"], []).append(part.name)
    for part in parts:
        folder = os.path.join(out_dir, part.name)
        os.makedirs(folder)
        for piece in part.pieces:
            with open(sources[piece["wheel"]], "rb") as src, open(os.path.join(folder, piece["file"]), "wb") as dst:
                src.seek(piece["offset"])
                dst.write(src.read(piece["length"]))
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump({"target": target, "wheels": holders, "pieces": part.pieces}, f, indent=1)
            f.write("\n")
    return parts


@dataclasses.dataclass
class Unpacked:
    wheels: list  # paths of whole, verified wheels
    missing: list  # "name: part2 not here" / "name: sha256 mismatch ..."
    target: dict | None  # the interpreter the wheels were fetched for


def unpack(bundle_dir: str, out_dir: str) -> Unpacked:
    """Join the wheels whose pieces are all under ``bundle_dir`` into ``out_dir``."""
    found: dict[str, dict[int, tuple[str, dict]]] = {}
    holders: dict[str, list[str]] = {}
    target = None
    parts = sorted(p for p in os.listdir(bundle_dir) if os.path.isfile(os.path.join(bundle_dir, p, MANIFEST))) \
        if os.path.isdir(bundle_dir) else []
    for part in parts:
        with open(os.path.join(bundle_dir, part, MANIFEST)) as f:
            manifest = json.load(f)
        target = target or manifest.get("target")
        holders.update(manifest.get("wheels", {}))
        for piece in manifest["pieces"]:
            path = os.path.join(bundle_dir, part, piece["file"])
            found.setdefault(piece["wheel"], {})
            if os.path.isfile(path) and os.path.getsize(path) == piece["length"]:
                found[piece["wheel"]][piece["index"]] = (path, piece)
    os.makedirs(out_dir, exist_ok=True)
    wheels, missing = [], []
    for name in sorted(set(found) | set(holders)):
        pieces = found.get(name, {})
        count = next(iter(pieces.values()))[1]["count"] if pieces else None
        if count is None or len(pieces) != count:
            absent = sorted(set(holders.get(name, [])) - set(parts)) or ["a piece"]
            missing.append(f"{name}: {', '.join(absent)} not here")
            continue
        dest = os.path.join(out_dir, name)
        with open(dest, "wb") as out:
            for index in range(count):
                with open(pieces[index][0], "rb") as src:
                    shutil.copyfileobj(src, out)
        if sha256(dest) != pieces[0][1]["sha256"]:
            os.remove(dest)
            missing.append(f"{name}: sha256 mismatch after joining its pieces")
            continue
        wheels.append(dest)
    return Unpacked(wheels, missing, target)
