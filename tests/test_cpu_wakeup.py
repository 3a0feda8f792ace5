"""The CPU wake-up latency request a model replica holds (asrops/cpu_wakeup.py), on Linux's real
PM QoS device: held while open, let go after, refused quietly without the right, and held by the
running service's model replica."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from asrops.cpu_wakeup import (
    PM_QOS_DEVICE,
    cpu_wakeup_latency_held,
    cpuidle_driver,
    current_cpu_wakeup_latency_us,
)
from asrops.settings import load_settings
from tests.conftest import stable_replica_pid

needs_the_device = pytest.mark.skipif(
    not os.access(PM_QOS_DEVICE, os.R_OK | os.W_OK),
    reason=f"{PM_QOS_DEVICE} is not readable and writable here (not root, or no such device)")


def open_files(pid: int | str = "self") -> set[Path]:
    """What a process's file descriptors point at (devices included, unlike psutil's open_files)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(Path(os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:  # closed meanwhile
            continue
    return found


@needs_the_device
def test_the_bound_holds_while_held_and_the_device_is_let_go_after():
    with cpu_wakeup_latency_held(3) as held:
        assert held and PM_QOS_DEVICE in open_files()
        # The kernel applies the lowest bound of all holders (a service in another test worker
        # may hold 0), so ours shows as an upper bound.
        assert current_cpu_wakeup_latency_us() <= 3
    assert PM_QOS_DEVICE not in open_files()


def test_null_in_the_environment_asks_for_nothing(monkeypatch):
    monkeypatch.setenv("ASROPS_SERVE__CPU_WAKEUP_LATENCY_US", "null")
    bound = load_settings().serve.cpu_wakeup_latency_us
    assert bound is None
    with cpu_wakeup_latency_held(bound) as held:
        assert not held and PM_QOS_DEVICE not in open_files()


def test_a_device_that_cannot_be_opened_is_logged_and_serving_goes_on(tmp_path, caplog):
    missing = tmp_path / "no-such-device"
    with caplog.at_level(logging.INFO, logger="asrops.cpu_wakeup"), cpu_wakeup_latency_held(0, missing) as held:
        assert not held
    assert "left to the machine" in caplog.text and str(missing) in caplog.text
    assert current_cpu_wakeup_latency_us(missing) is None


@pytest.mark.parametrize(("driver", "has_effect"), [("haltpoll", True), ("none", False), (None, False)])
def test_the_log_says_whether_the_kernel_applies_the_bound(tmp_path, caplog, driver, has_effect):
    """Only a cpuidle driver reads the request: without one (`none`, or no cpuidle in sysfs at all)
    the bound is held for nothing, and the log must not claim otherwise."""
    device = tmp_path / "cpu_dma_latency"  # a plain file takes the write as the device would
    device.touch()
    driver_file = tmp_path / "current_driver"
    if driver is not None:
        driver_file.write_text(driver + "\n")
    with caplog.at_level(logging.INFO, logger="asrops.cpu_wakeup"), \
            cpu_wakeup_latency_held(0, device, driver_file) as held:
        assert held and device.read_bytes() == (0).to_bytes(4, sys.byteorder)
    assert cpuidle_driver(driver_file) == (driver or "none")
    assert ("no cpuidle driver" not in caplog.text) == has_effect
    assert ("held at 0 us" in caplog.text) == has_effect


@pytest.mark.slow
@needs_the_device
def test_the_services_model_replica_holds_the_bound_for_its_life(service, service_settings):
    assert httpx.get(f"{service}/readyz").status_code == 200
    pid = stable_replica_pid(service)
    assert PM_QOS_DEVICE in open_files(pid), psutil.Process(pid).cmdline()[:1]
    assert current_cpu_wakeup_latency_us() <= service_settings.serve.cpu_wakeup_latency_us
