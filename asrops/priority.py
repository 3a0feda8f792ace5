"""Lowering the CPU priority of work beside the request path, thread by thread.

Linux keeps a niceness per thread: `setpriority` on a process id reaches its main thread only,
and a thread starts with the niceness of the thread that created it. Raising a niceness needs no
privilege; lowering it back does, so these only ever raise it.
"""

from __future__ import annotations

import os

import psutil


def lower_thread(thread_id: int, niceness: int) -> bool:
    """Raise one thread's niceness to at least `niceness`; True when it changed."""
    if os.getpriority(os.PRIO_PROCESS, thread_id) >= niceness:
        return False
    os.setpriority(os.PRIO_PROCESS, thread_id, niceness)
    return True


def lower_processes(processes: list[psutil.Process], niceness: int) -> int:
    """Every thread of `processes` to at least `niceness`; returns how many changed. A process
    or thread that exited meanwhile is skipped."""
    changed = 0
    for process in processes:
        try:
            threads = process.threads()
        except psutil.Error:
            continue
        for thread in threads:
            try:
                changed += lower_thread(thread.id, niceness)
            except OSError:
                continue
    return changed
