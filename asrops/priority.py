"""Lowering the CPU priority of work beside the request path, thread by thread.

Linux keeps a niceness and a scheduling policy per thread: `setpriority` or `sched_setscheduler`
on a process id reaches its main thread only, and a thread starts with the niceness and policy of
the thread that created it. Lowering needs no privilege; raising back does, so these only lower.
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


def idle_thread(thread_id: int) -> bool:
    """One thread to Linux's idle policy (SCHED_IDLE): it runs only on a core that has nothing
    else to run, and its wakeups never preempt a thread of the normal policy (a niced one's
    still do). True when it changed. Only for a thread that wakes often for little and never
    starts threads of the request path, which would inherit it."""
    if os.sched_getscheduler(thread_id) == os.SCHED_IDLE:
        return False
    os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
    return True
