"""Process-level tuning of the model process (core/serving/procs.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Allocate and free a 48 MB tensor (a speech encoder call's largest activations are
# 9-37 MB) a few times, then count the page faults of five more.
PROBE = """
import resource, sys, torch
torch.set_num_threads(1)  # one thread touches the pages (see the test)
from core.serving.procs import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # glibc takes a few rounds to settle its heap
    x = torch.ones(48 << 18)
    del x
f0 = faults()
for _ in range(5):
    x = torch.ones(48 << 18)
    del x
print(faults() - f0)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_model_process_keeps_freed_memory_for_the_next_forward():
    """By default glibc unmaps a freed block this big and the next one faults in all of
    its 12,288 pages again; the model process keeps it."""
    assert faults("default") > 5 * 10_000
    assert faults("keep") < 1_000
