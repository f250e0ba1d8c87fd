"""The lent-GPU tooling's mechanics, without a GPU or a network: wheels packed into parts and
joined again, and a phase's command stopped at its time limit."""

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = {"python_version": "3.12", "implementation": "cp", "platforms": ["manylinux_2_28_x86_64"]}


@pytest.fixture
def gpu():
    # benchmarks/ lives at the repository root and is not installed with smoothce.
    sys.path.insert(0, REPO_ROOT)
    try:
        import benchmarks.gpu.bundle
        import benchmarks.gpu.process

        yield benchmarks.gpu
    finally:
        sys.path.remove(REPO_ROOT)


def _wheels(tmp_path, sizes):
    folder = tmp_path / "download"
    folder.mkdir()
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"w{i}-1.0-py3-none-any.whl"
        path.write_bytes(os.urandom(size))
        paths.append(str(path))
    return paths


def test_parts_stay_under_the_limit_and_join_back(gpu, tmp_path):
    # Two small wheels and one larger than a part: the large one is cut across parts.
    wheels = _wheels(tmp_path, [10, 20, 150])
    parts = gpu.bundle.pack(wheels, str(tmp_path / "bundle"), 64, TARGET)
    assert [p.name for p in parts] == ["part1", "part2", "part3"]
    for part in parts:
        files = [f for f in os.listdir(tmp_path / "bundle" / part.name) if f != "MANIFEST.json"]
        assert sum(os.path.getsize(tmp_path / "bundle" / part.name / f) for f in files) <= 64
    # The small ones travel whole in the first part.
    assert {p["wheel"] for p in parts[0].pieces if p["count"] == 1} == {"w0-1.0-py3-none-any.whl",
                                                                        "w1-1.0-py3-none-any.whl"}

    got = gpu.bundle.unpack(str(tmp_path / "bundle"), str(tmp_path / "joined"))
    assert got.missing == [] and got.target == TARGET
    assert sorted(os.path.basename(w) for w in got.wheels) == sorted(os.path.basename(w) for w in wheels)
    for original in wheels:
        joined = tmp_path / "joined" / os.path.basename(original)
        assert joined.read_bytes() == open(original, "rb").read()


def test_a_part_not_yet_here_is_named(gpu, tmp_path):
    wheels = _wheels(tmp_path, [10, 150])
    gpu.bundle.pack(wheels, str(tmp_path / "bundle"), 64, TARGET)
    for f in (tmp_path / "bundle" / "part3").iterdir():
        f.unlink()
    (tmp_path / "bundle" / "part3").rmdir()
    got = gpu.bundle.unpack(str(tmp_path / "bundle"), str(tmp_path / "joined"))
    assert [os.path.basename(w) for w in got.wheels] == ["w0-1.0-py3-none-any.whl"]
    assert got.missing == ["w1-1.0-py3-none-any.whl: part3 not here"]


def test_a_damaged_piece_is_refused(gpu, tmp_path):
    wheels = _wheels(tmp_path, [100])
    gpu.bundle.pack(wheels, str(tmp_path / "bundle"), 64, TARGET)
    piece = tmp_path / "bundle" / "part2" / "w0-1.0-py3-none-any.whl.1"
    data = bytearray(piece.read_bytes())
    data[0] ^= 0xFF
    piece.write_bytes(bytes(data))
    got = gpu.bundle.unpack(str(tmp_path / "bundle"), str(tmp_path / "joined"))
    assert got.wheels == [] and got.missing == ["w0-1.0-py3-none-any.whl: sha256 mismatch after joining its pieces"]
    assert not (tmp_path / "joined" / "w0-1.0-py3-none-any.whl").exists()


def test_manifest_names_every_wheel_and_its_parts(gpu, tmp_path):
    wheels = _wheels(tmp_path, [10, 150])
    gpu.bundle.pack(wheels, str(tmp_path / "bundle"), 64, TARGET)
    manifest = json.loads((tmp_path / "bundle" / "part1" / "MANIFEST.json").read_text())
    assert manifest["wheels"] == {"w0-1.0-py3-none-any.whl": ["part1"],
                                  "w1-1.0-py3-none-any.whl": ["part1", "part2", "part3"]}


def test_a_phase_command_is_stopped_at_its_deadline(gpu, tmp_path):
    import time

    log = tmp_path / "phase.log"
    # The deadline has passed: the command gets the one-second minimum, then its group is ended.
    rc = gpu.process.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                       str(log), time.monotonic())
    assert rc is None
    text = log.read_text()
    assert "started" in text and "[stopped: time limit reached]" in text
