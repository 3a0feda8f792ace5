"""Where one request's time goes: py-spy samples Serve's proxy, the ingress and the stable model
replica while requests are sent one at a time (concurrency 1, the same clips as the service
benchmark).

    python -m loadtests.profile_request [--ours URL] [--seconds 60] [--out-dir out/profile]

Started here unless `--ours` is given (`python -m asrops.cli serve`, ASROPS_DATA_DIR from the
environment). py-spy (`pip install py-spy`) must be able to attach to the processes (root, or
ptrace allowed). Writes each process's collapsed stacks (`<process>.txt`, flamegraph input) and
prints, per process, its CPU per request and the functions that held it (own time).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from pydantic import BaseModel

from loadtests.service_bench import ENDPOINT, Clip, load_clips, running_server

RATE_HZ = 200
"""py-spy samples per second of each process."""
PROCESSES = {"proxy": "ray::ProxyActor", "ingress": "ray::ServeReplica:asrops:ingress",
             "model": "ray::ServeReplica:model-"}
"""What we profile, by the start of its process title."""


class ProcessProfile(BaseModel):
    process: str
    pid: int
    samples: int
    cpu_ms_per_request: float
    top_functions: list[tuple[str, float]]
    """(function (file:line), ms per request of own time), most first."""


def find_pids() -> dict[str, int]:
    """The pid of each process in PROCESSES (the first model replica found)."""
    import psutil

    found: dict[str, int] = {}
    for proc in psutil.process_iter(["cmdline"]):
        head = (proc.info["cmdline"] or [""])[0]
        for name, prefix in PROCESSES.items():
            if head.startswith(prefix) and name not in found:
                found[name] = proc.pid
    return found


def summarise(name: str, pid: int, collapsed: str, requests: int, top: int = 12) -> ProcessProfile:
    """Own time per function from py-spy's raw (collapsed-stack) output."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if leaf.startswith("process ") or leaf.startswith("thread "):
            continue
        own[leaf] += int(count)
        total += int(count)
    per_request = 1000.0 / RATE_HZ / max(requests, 1)
    return ProcessProfile(process=name, pid=pid, samples=total, cpu_ms_per_request=round(total * per_request, 1),
                          top_functions=[(f, round(n * per_request, 2)) for f, n in own.most_common(top)])


def send_one_at_a_time(url: str, clips: list[Clip], seconds: float) -> int:
    """Requests one after another for `seconds`; returns how many were answered 200."""
    done, deadline = 0, time.monotonic() + seconds
    with httpx.Client(timeout=600) as client:
        while time.monotonic() < deadline:
            clip = clips[done % len(clips)]
            response = client.post(url + ENDPOINT, files={"file": (clip.name, clip.wav, "audio/wav")},
                                   data={"model": "whisper-1", "response_format": "json"})
            if response.status_code != 200:
                raise RuntimeError(f"{clip.name}: HTTP {response.status_code}: {response.text[:300]}")
            done += 1
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.profile_request", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", help="base URL of a running asrops (default: start one)")
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to profile")
    parser.add_argument("--out-dir", type=Path, default=Path("out/profile"))
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy not found: pip install py-spy")
    clips = load_clips(args.clips)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with running_server(args.ours, [sys.executable, "-m", "asrops.cli", "serve"], "/readyz",
                        args.out_dir / "ours.log", args.startup_timeout, say) as server:
        url = server.url
        send_one_at_a_time(url, clips, 5)  # warm every path before sampling
        pids = find_pids()
        if set(pids) != set(PROCESSES):
            sys.exit(f"found only {sorted(pids)} of {sorted(PROCESSES)} among this machine's processes")
        say(f"profiling {pids} for {args.seconds:.0f} s at {RATE_HZ} Hz, one request at a time")
        spies = {name: subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--duration", str(int(args.seconds)),
             "--format", "raw", "--nonblocking", "--output", str(args.out_dir / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name, pid in pids.items()}
        requests = send_one_at_a_time(url, clips, args.seconds)
        for name, spy in spies.items():
            _, err = spy.communicate(timeout=120)
            if spy.returncode != 0:
                sys.exit(f"py-spy on the {name} failed: {err[-1000:]}")
    profiles = [summarise(name, pids[name], (args.out_dir / f"{name}.txt").read_text(), requests)
                for name in PROCESSES]
    print(f"{requests} requests, one at a time, in {args.seconds:.0f} s; CPU per request (py-spy own time):")
    for p in profiles:
        print(f"\n{p.process} (pid {p.pid}): {p.cpu_ms_per_request:.1f} ms per request")
        for function, ms in p.top_functions:
            print(f"  {ms:7.2f} ms  {function}")
    (args.out_dir / "profile.json").write_text(
        "[" + ",\n".join(p.model_dump_json() for p in profiles) + "]\n")
    say(f"wrote {args.out_dir}/<process>.txt (collapsed stacks) and profile.json")


if __name__ == "__main__":
    main()
