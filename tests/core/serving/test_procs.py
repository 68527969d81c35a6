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


SETTLE_PROBE = """
import gc, weakref
from core.serving.procs import settle_gc
class Node: pass
kept = [[i] for i in range(100_000)]  # start-up's objects (lists: always tracked)
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle that is already garbage at the freeze
gone = weakref.ref(a)
del a, b
settle_gc()
print(len(gc.get_objects()), gc.get_freeze_count(), gone() is None)
"""


def test_settle_gc_takes_start_up_objects_out_of_later_collections():
    """After the freeze a collection walks only what came after (the tracked objects
    ``gc.get_objects`` lists), and start-up's garbage was collected, not frozen."""
    out = subprocess.run([sys.executable, "-c", SETTLE_PROBE], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()
    walked, frozen, collected = int(out[0]), int(out[1]), out[2] == "True"
    assert walked < 1_000 and frozen > 100_000
    assert collected


def test_the_worker_settles_its_collector_once_ready():
    from celery import signals

    import workers.signals as ws

    assert ws._ready in [ref() for _, ref in signals.worker_ready.receivers]
