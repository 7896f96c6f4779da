"""The CPU kernels on arm64: cross-compiled and run under qemu-user, every SIMD path against a
float64 reference. Skips where the cross toolchain is not installed (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SOURCES = ["cpu/linear.cpp", "cpu/kernels.cpp", "model.cpp", "thread_pool.cpp"]


@pytest.fixture(scope="module")
def arm64_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which(CXX) and shutil.which(QEMU)):
        pytest.skip(f"no {CXX} and {QEMU} here (apt-get install g++-aarch64-linux-gnu qemu-user)")
    out = tmp_path_factory.mktemp("arm64") / "linear_check"
    csrc = REPO / "csrc"
    cmd = [CXX, "-O2", "-std=c++17", "-fopenmp-simd", "-Wall", "-Wextra", "-Werror",
           "-Wno-unused-parameter", f"-I{csrc}", str(REPO / "tests/native/linear_check.cpp"),
           *[str(csrc / s) for s in SOURCES], "-static", "-pthread", "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.mark.parametrize("path", ["neon", "generic"])
def test_arm64_linear_kernels_match_a_float64_reference(arm64_binary: Path, path: str) -> None:
    run = subprocess.run(
        [QEMU, str(arm64_binary)],
        capture_output=True,
        text=True,
        env={"FLASHMOE_SIMD": path},
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[path, "q4"], [path, "q8"], [path, "bf16"]]
