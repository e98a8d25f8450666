"""``scripts/device_check.sh --cpu-smoke``: the prepared GPU check runs end to end on the CPU (so it cannot rot
between sessions that have a GPU), without the packages the GPU machine lacks, and prints its one block."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from .conftest import REPO

#: Not installed on the GPU machine (docs: its image); the check must not need them.
ABSENT_THERE = ("datasets", "math_verify", "trl")


@pytest.mark.slow
def test_cpu_smoke_prints_the_block_without_the_packages_the_gpu_machine_lacks(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_THERE))
    env = {**os.environ, "PYTHONPATH": str(block), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--cpu-smoke", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    body = out[out.index("=== eopd device check"): out.index("=== end ===")]
    assert re.search(r"fused loss, .*summary: memory_ratio=\d", body), body
    rates = dict(re.findall(r"(sample|teacher|update)=(\d+)", body))
    assert set(rates) == {"sample", "teacher", "update"} and all(int(v) > 0 for v in rates.values()), body
    stats = {k: float(v) for k, v in re.findall(r"(ratio_mean|ratio_min|ratio_max|sampler_gap_max)=([-\d.e]+)", body)}
    assert abs(stats["ratio_mean"] - 1) < 1e-3 and stats["ratio_min"] <= 1 <= stats["ratio_max"], body
    assert stats["sampler_gap_max"] < 1e-4, body  # the learner's old log-probs are its own (fp32 on the CPU)
    sharded = body[body.index("sharded (parallel.strategy=fsdp"):].splitlines()[0]
    first = {k: float(v) for k, v in re.findall(r"(ratio_mean|sampler_gap_max)=([-\d.e]+)", sharded)}
    assert abs(first["ratio_mean"] - 1) < 1e-3 and first["sampler_gap_max"] < 1e-4, sharded  # the same path, sharded
