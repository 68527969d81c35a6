"""`mmq up`'s supervision (producer/ops/supervise.py), over trivial `python -c` children:
a child that exits is restarted with backoff, the others keep running, and SIGTERM
still stops them all."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from producer.ops.supervise import Supervisor

ROOT = Path(__file__).parents[3]


def spawn(code: str):
    return lambda: subprocess.Popen([sys.executable, "-c", code])


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_exit(proc: subprocess.Popen) -> None:
    proc.wait(timeout=60)


@pytest.fixture
def sup():
    clock = FakeClock()
    logs: list[str] = []
    s = Supervisor(backoff_s=1.0, backoff_max_s=4.0, stable_s=10.0, clock=clock,
                   log=logs.append)
    s.fake_clock, s.logs = clock, logs
    yield s
    s.stop(timeout=10)


def test_an_exiting_child_is_restarted_with_backoff_and_the_others_keep_running(sup):
    clock = sup.fake_clock
    sleeper = sup.add("sleeper", spawn("import time; time.sleep(600)"))
    crasher = sup.add("crasher", spawn("import sys; sys.exit(3)"))
    first_sleeper_pid, pids, delays = sleeper.proc.pid, {crasher.proc.pid}, []
    for _ in range(4):  # exits at once every time: 1, 2, 4, then capped at 4
        wait_exit(crasher.proc)
        sup.poll()  # notices the exit, schedules the restart
        delays.append(crasher.delay)
        clock.now += crasher.delay - 0.5
        sup.poll()  # not yet due
        assert crasher.restart_at is not None
        clock.now += 0.5
        sup.poll()  # due: restarted
        assert crasher.restart_at is None
        pids.add(crasher.proc.pid)
    assert delays == [1.0, 2.0, 4.0, 4.0]
    assert crasher.restarts == 4 and len(pids) == 5
    assert sleeper.proc.pid == first_sleeper_pid and sleeper.proc.poll() is None
    assert sleeper.restarts == 0
    assert any("crasher exited with code 3" in line and "restarting in 4 s" in line
               for line in sup.logs), sup.logs
    assert sum("crasher restarted" in line for line in sup.logs) == 4


def test_backoff_resets_after_a_stable_run(sup):
    clock = sup.fake_clock
    child = sup.add("worker text", spawn("pass"))
    for _ in range(3):  # fast failures: 1, 2, 4
        wait_exit(child.proc)
        sup.poll()
        clock.now = child.restart_at
        sup.poll()
    assert child.delay == 4.0
    clock.now += 10.0  # this run lasted stable_s
    wait_exit(child.proc)
    sup.poll()
    assert child.delay == 1.0 and child.restart_at == clock.now + 1.0


def test_stop_terminates_every_child_and_restarts_nothing(sup):
    a = sup.add("a", spawn("import time; time.sleep(600)"))
    b = sup.add("b", spawn("import time; time.sleep(600)"))
    sup.stop(timeout=30)
    assert a.proc.returncode == -signal.SIGTERM and b.proc.returncode == -signal.SIGTERM
    sup.fake_clock.now += 100
    sup.poll()
    assert a.restarts == b.restarts == 0


def test_a_real_supervisor_thread_restarts_a_child(tmp_path):
    """The background thread with the real clock (mmq up's configuration, smaller)."""
    marks = tmp_path / "starts"
    code = f"open({str(marks)!r}, 'a').write('x'); import sys; sys.exit(1)"
    s = Supervisor(backoff_s=0.05, backoff_max_s=0.2, log=lambda _m: None)
    s.add("flaky", spawn(code))
    s.start(interval=0.05)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and len(marks.read_text() if marks.exists() else "") < 3:
            time.sleep(0.1)
        assert len(marks.read_text()) >= 3
    finally:
        s.stop(timeout=10)


def test_sigterm_stops_the_supervised_children(tmp_path):
    """`mmq up` turns SIGTERM into the Ctrl-C path: no child is left orphaned."""
    script = tmp_path / "up.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from producer.ops.supervise import run_supervised

        def setup(sup):
            for name in ("worker text", "flower"):
                c = sup.add(name, lambda: subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(600)"]))
                print(c.proc.pid, flush=True)

        sys.exit(run_supervised(setup))
    """))
    up = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(up.stdout.readline()) for _ in range(2)]
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0
    # The supervisor waited for (reaped) each one before exiting: no process left.
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
