"""listener.malloc_arenas: the cap reaches glibc and the children, and never overrides the operator."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_value is not None:
        env["MALLOC_ARENA_MAX"] = env_value
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


CHILD_SEES = """
    import os, subprocess, sys
    from listener.malloc_arenas import limit_malloc_arenas
    cap = limit_malloc_arenas()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(cap, child)
"""


def test_the_cap_is_applied_and_passed_to_children() -> None:
    assert _run(CHILD_SEES, None) == "2 2"


def test_an_operators_setting_wins() -> None:
    assert _run(CHILD_SEES, "4") == "4 4"
