"""Put on PYTHONPATH of processes that bench/cluster.py runs under ``faketime``.

libfaketime 0.9.10 (Debian) with FAKETIME_DONT_FAKE_MONOTONIC=1 makes
``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ...)``, which CPython 3.11's
``time.sleep`` calls, fail with EINVAL: every ``time.sleep`` raises OSError (a
worker's retry backoff, its metrics thread). Faking the monotonic clock too is
worse (timed waits hang with a negative offset). So sleep on an Event's timed wait,
which libfaketime leaves working; only the wall clock is moved, as intended."""

import os
import threading
import time


def _sleep(seconds: float) -> None:
    if seconds > 0:
        threading.Event().wait(seconds)
    else:
        os.sched_yield()


time.sleep = _sleep
