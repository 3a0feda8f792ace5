"""Keeping idle CPUs quick to wake while an engine serves: Linux's PM QoS CPU latency request.

A lone request crosses about eleven threads between the client and the engine (the ingress's
event loop, gRPC's threads on both sides of Serve's hop, the model replica's loop and lane), and
the engine's own threads hand work to each other hundreds of times a second. Each hand-off to a
CPU that went idle waits for it to wake. On a virtual machine whose idle vCPUs halt, that costs
about 100 us a time: measured on the 2-core VMs this project runs on, a ping-pong between two
processes after 20-80 ms of idle took 105-119 us, and 11-25 us with the request below held.

Writing a latency bound to /dev/cpu_dma_latency asks the kernel's idle governor to use no idle
state slower to leave than that; at 0 an idle CPU polls instead of halting. The request lasts
while the file stays open and ends with the process that holds it, however it ends. It costs
power (idle CPUs spin), which a host dedicated to serving pays for speed;
`ASROPS_SERVE__CPU_WAKEUP_LATENCY_US=null` leaves the machine's power management alone. It needs
root (or the device opened up to the service's user); in a container the node's tuning decides.

Only a cpuidle driver reads the request: on a kernel without one (`current_driver` below reads
`none`, as on some of the 2-core VMs this project runs on) an idle CPU halts whatever is asked.
The request is still held (it costs nothing) and the log says it has no effect, so that a reader
of a benchmark knows which machine it met (loadtests/RESULTS.md, 2026-12-05 evening: there a
ping-pong between two processes after 20-80 ms of idle took 90-294 us, held or not).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PM_QOS_DEVICE = Path("/dev/cpu_dma_latency")
"""Linux's CPU latency QoS request: a 32-bit bound in microseconds, written in native order."""
_BOUND = struct.Struct("=i")
CPUIDLE_DRIVER = Path("/sys/devices/system/cpu/cpuidle/current_driver")
"""The kernel's cpuidle driver, which applies the request; `none` (or no such file) when there is none."""
NO_CPUIDLE_DRIVER = "none"


def cpuidle_driver(driver_file: Path = CPUIDLE_DRIVER) -> str:
    """The cpuidle driver's name (`haltpoll`, `intel_idle`, ...), or `none` when the kernel has none."""
    try:
        return driver_file.read_text().strip() or NO_CPUIDLE_DRIVER
    except OSError:
        return NO_CPUIDLE_DRIVER


def hold_cpu_wakeup_latency(max_us: int | None, device: Path = PM_QOS_DEVICE,
                            driver_file: Path = CPUIDLE_DRIVER) -> int | None:
    """Ask that no CPU take longer than `max_us` to wake, for as long as the returned file
    descriptor stays open (the process's life, unless closed); None when `max_us` is None (the
    setting's `null`: nothing asked), or, logged with why, when this process may not ask. Held
    on a kernel without a cpuidle driver too, logged as having no effect there."""
    if max_us is None:
        return None
    try:
        fd = os.open(device, os.O_WRONLY)
    except OSError as exc:
        log.info("CPU wake-up latency left to the machine (%s: %s): a lone request may wait for idle CPUs to "
                 "wake", device, exc.strerror)
        return None
    try:
        os.write(fd, _BOUND.pack(max_us))
    except OSError as exc:
        os.close(fd)
        log.info("CPU wake-up latency left to the machine (writing %s: %s)", device, exc.strerror)
        return None
    driver = cpuidle_driver(driver_file)
    if driver == NO_CPUIDLE_DRIVER:
        log.info("CPU wake-up latency asked at %d us (PM QoS, %s), but this kernel has no cpuidle driver "
                 "(%s: %s): idle CPUs halt whatever is asked, and a lone request may wait for them to wake",
                 max_us, device, driver_file, driver)
    else:
        log.info("CPU wake-up latency held at %d us while this process runs (PM QoS, %s; cpuidle driver %s)",
                 max_us, device, driver)
    return fd


def current_cpu_wakeup_latency_us(device: Path = PM_QOS_DEVICE) -> int | None:
    """The bound the kernel applies now (the lowest of every holder's), or None when unreadable."""
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _BOUND.unpack(os.read(fd, _BOUND.size))[0]
    finally:
        os.close(fd)


@contextmanager
def cpu_wakeup_latency_held(max_us: int | None, device: Path = PM_QOS_DEVICE,
                            driver_file: Path = CPUIDLE_DRIVER) -> Iterator[bool]:
    """`hold_cpu_wakeup_latency` for the block; yields whether it is held."""
    fd = hold_cpu_wakeup_latency(max_us, device, driver_file)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)
