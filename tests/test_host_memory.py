"""mlm/speed/host_memory.py: with keep_freed_memory, freed large tensors stay resident and are reused (glibc only).

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into the other tests.
"""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings only"
)

PROBE = r"""
import json, resource, sys
import torch
from mlm.speed.host_memory import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

size = 40 * 2**20 // 4  # 40 MiB of float32: above glibc's largest default mmap threshold (32 MiB)
faults = []
for _ in range(24):  # the same allocation again and again, as training steps do
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(size)  # touches every page: fresh ones from the kernel, or reused ones
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident = rss_mib()
    del tensor
released = resident - rss_mib()
print(json.dumps({"applied": applied, "faults": faults, "released_mib": released}))
"""
PAGES = 40 * 2**20 // 4096


def run_probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_glibc_default_returns_each_freed_tensor_and_faults_the_next_one_in():
    default = run_probe("default")
    assert all(count >= 0.9 * PAGES for count in default["faults"])  # (fewer only with transparent huge pages)
    assert default["released_mib"] > 36


def test_keep_freed_memory_keeps_freed_tensors_resident_and_reuses_their_pages():
    kept = run_probe("keep")
    assert kept["applied"] is True
    assert kept["released_mib"] < 1
    # torch's aligned allocations need slightly more than the block just freed, so glibc's heap grows by a few
    # blocks before freed ones coalesce into one that fits; from then on no allocation faults a page in.
    assert max(kept["faults"][-8:]) < 100
    assert sum(count > PAGES // 2 for count in kept["faults"]) <= 12
