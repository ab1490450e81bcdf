"""benchmarks.common.tree_cpu_seconds: the receive benchmark's CPU per instance."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.common import tree_cpu_seconds

# burns CPU itself, then in a child it waits for (reaped: counted in cutime/cstime), then
# reports and waits for stdin so that its /proc entry is still there when read
_SCRIPT = r"""
import subprocess, sys, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
burn(0.3)
subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"], check=True)
print("done", flush=True)
sys.stdin.read()
"""


def test_counts_the_process_and_the_children_it_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        cpu = tree_cpu_seconds(proc.pid)
        # 0.3 s of its own and 0.3 s of the reaped child's, plus interpreter start-ups;
        # clock ticks are 10 ms, so the sum is at least 0.6 s less two ticks
        assert 0.58 <= cpu < 10, cpu
    finally:
        proc.communicate("", timeout=30)


def test_a_process_that_is_gone_counts_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.05)
    assert tree_cpu_seconds(proc.pid) == 0.0
