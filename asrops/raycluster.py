"""Ray for every process that needs it: start a local cluster (the embedded default) or join one.

A local cluster listens on 127.0.0.1 only. Ray itself takes the machine's network address as the
node address and binds its gRPC servers (GCS, raylet, object manager, workers, agents) to every
interface, and whoever reaches them can run code (Ray has no authorisation; CVE-2023-48022).
Ray's single-machine mode, its default on macOS and Windows, resolves the node address to
loopback instead; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` turns it on here too, and every process
Ray starts inherits it. On a cluster (RAY_ADDRESS, KubeRay) Ray's ports must be reachable by the
other nodes: keep them inside the cluster's network (k8s/README.md).
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import ray
from ray._private import ray_constants
from ray._private import services as ray_services

from asrops.audio_format import LONGEST_AUDIO_S, SAMPLE_RATE
from asrops.priority import idle_thread, lower_processes
from asrops.settings import RAY_METRICS_REPORT_INTERVAL_S, Settings

LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray's single-machine mode: node address and every port on 127.0.0.1."""
_RAY_METRICS_REPORT_INTERVAL_MS = str(round(RAY_METRICS_REPORT_INTERVAL_S * 1000))
MODEL_REQUEST_MAX_BYTES = round(LONGEST_AUDIO_S * SAMPLE_RATE * 2) + 2**20
"""The largest message Serve's gRPC hop carries to a model replica: the longest audio any setting
accepts, as 16-bit PCM, and a MiB for the options (a prompt of at most
settings.LONGEST_PROMPT_CHARS, 4 bytes each at most) and Serve's envelope. Serve's own default,
gRPC's 4 MiB, refused every request over 131 s of audio."""
RAY_TUNING = {
    # Ray starts its workers at nice 15, so on a small node any ordinary process (Ray's own GCS
    # and raylet, a load generator, a log shipper) takes the CPU from our replicas, which are the
    # node's whole purpose.
    "RAY_worker_niceness": "0",
    # Serve's hops (the proxy to the ingress, the ingress to a model replica) go over the
    # replicas' own gRPC servers instead of Ray actor calls: the transport of Ray's documented
    # throughput-optimised mode (RAY_SERVE_THROUGHPUT_OPTIMIZED, whose other parts are not all
    # wanted here; its direct ingress is `direct_ingress_env`, local clusters only). 4-7 ms less
    # per request on 2 cores.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # A replica runs our code and its router on its own event loop, not on two more threads
    # (also part of that mode): a request crosses fewer threads, about 5 ms less at c=1. Our
    # blocking work (decoding, the engine) runs in worker threads either way.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # What those gRPC hops may carry: a request's whole audio (MODEL_REQUEST_MAX_BYTES).
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(MODEL_REQUEST_MAX_BYTES),
    # Serve's controller reconciles every 0.1 s by default: 0.04 of a core at rest, taken from
    # the engine on a small node. Every 0.5 s it costs 0.01; a deploy or a replica's restart
    # waits at most that much longer to be acted on.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Serve's own log lines (an access line per request from the ingress and another from the
    # model replica) go to Serve's log files only (logs/serve/ in Ray's session directory), not
    # also to each process's stderr, from where Ray ships every line to the driver through its
    # log monitor and the GCS: about 45 wakeups of those three processes per request at c=1 on
    # 2 cores, taken from the engine (also part of that mode). Our replicas' warnings still reach
    # the console (serve/ray_shims.py `warnings_to_console`).
    "RAY_SERVE_LOG_TO_STDERR": "0",
    # No idle worker process waiting beside the service. Ray prestarts one when the first driver
    # connects and keeps idle ones up to a worker per CPU; each wakes about 150 times a second
    # (its task loop checks for signals every 10 ms) at the replicas' priority, 6-7 ms of CPU a
    # second. Serve's actors and a retrain's Ray Train actors start their own workers anyway.
    "RAY_prestart_worker_first_driver": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_num_workers_soft_limit": "0",
    # Ray's log monitor lists the session's log directory every 0.1 s while it holds fewer than
    # this many files, else every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S): 9 ms of CPU a second down
    # to 3.5 on an idle local service. A new worker's lines reach the console up to 0.5 s later.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    # Ray's metrics refresh at one pace (RAY_METRICS_REPORT_INTERVAL_S, which Prometheus's scrape
    # of them follows): the workers report theirs to the node's agent (Ray's default, pinned), and
    # the agent gathers the node's and every Ray process's CPU and memory with psutil, every 5 s
    # by default: 40 % of its idle CPU, for figures no one reads between two scrapes.
    "RAY_metrics_report_interval_ms": _RAY_METRICS_REPORT_INTERVAL_MS,
    "REPORTER_UPDATE_INTERVAL_MS": _RAY_METRICS_REPORT_INTERVAL_MS,
}
"""Ray's and Ray Serve's environment for every Ray process of the service: set before a local
cluster starts (an operator's own value wins), and in the Ray pods on KubeRay (k8s/, generated)."""
METRICS_AGENT_WAIT_S = 120.0
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def direct_ingress_env(port: int) -> dict[str, str]:
    """On a local cluster the ingress replica answers clients on the service's port itself
    (Ray Serve's direct ingress), so a request skips the proxy's hop: 7-8 ms less per request
    on 2 cores. Serve's proxy still runs, on `serve.proxy_port` (serve/launcher.py), and
    reaches the same ingress. One port for one ingress replica: nothing to drain for (no load
    balancer in front) and nothing to hold the port back for (no HAProxy). On a cluster
    (KubeRay) the proxy on every node stays the way in: the client-facing Service reaches it
    wherever the ingress replica runs. `RAY_SERVE_ENABLE_DIRECT_INGRESS=0` turns it off."""
    if os.environ.get(DIRECT_INGRESS, "1") != "1":
        return {}
    return {DIRECT_INGRESS: "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # Ray's pool is range(min, max)
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def serves_clients_directly() -> bool:
    """Whether Ray (as this process started or joined it) runs with direct ingress: then the
    ingress replica holds the service's port and Serve's proxy must take another."""
    return os.environ.get(DIRECT_INGRESS) == "1"

log = logging.getLogger(__name__)


def joining_a_cluster() -> bool:
    """RAY_ADDRESS is set: Ray runs elsewhere (a cluster, or inside a Ray job the job's own), and
    nothing of a local cluster (its ports, its processes' priorities) is ours to set up."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_ray(settings: Settings, worker_setup_hook: str | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray. `worker_setup_hook` (an import path) runs in every
    worker process Ray starts for this driver's job, Serve's controller and proxy included."""
    hook = {"worker_process_setup_hook": worker_setup_hook} if worker_setup_hook else {}
    for name, value in RAY_TUNING.items():  # an operator's explicit setting wins
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    if joining_a_cluster():
        ray.init(logging_level=logging.WARNING, configure_logging=True, runtime_env=hook or None)
        return
    os.environ.update(LOOPBACK_ONLY)  # for the processes Ray starts
    os.environ.update(direct_ingress_env(settings.serve.port))
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which read it when Ray was imported
    # The dashboard serves the Ray Jobs API that retrains go through (and, by default, nothing
    # else: Prometheus scrapes this node on the metrics port it is given, not the nodes Ray's
    # service-discovery file lists).
    with dashboard_modules(settings.serve.ray_dashboard_modules):
        ray.init(
            include_dashboard=True,
            _metrics_export_port=settings.monitoring.ray_metrics_port,
            logging_level=logging.WARNING,
            configure_logging=True,
            runtime_env={"env_vars": {"ASROPS_DATA_DIR": str(settings.data_dir)}, **hook},
        )
    _keep_token_private()
    _wait_for_metrics_agent(settings.monitoring.ray_metrics_port)


@contextmanager
def dashboard_modules(modules: list[str] | None) -> Iterator[None]:
    """The dashboard of a local cluster started meanwhile runs only `modules` (None: all of
    Ray's). Ray runs nine of them as processes of their own, each waking 15-45 times a second at rest;
    on 2 cores an engine's two threads wait at every parallel step for whichever one such a wakeup
    delayed. `ray.init` has no option for it (`include_dashboard=False` keeps none, the Jobs API
    included), so the dashboard's command line gets the `--modules-to-load` of Ray's own
    `dashboard.py` as Ray starts it (Ray pinned at 2.60, `tests/test_retrain_job.py` checks it)."""
    if modules is None:
        yield
        return
    start_ray_process = ray_services.start_ray_process

    def starting(command: list[str], process_type: str, *args, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_DASHBOARD:
            command = [*command, f"--modules-to-load={','.join(modules)}"]
        return start_ray_process(command, process_type, *args, **kwargs)

    ray_services.start_ray_process = starting
    try:
        yield
    finally:
        ray_services.start_ray_process = start_ray_process


def ray_token_file() -> Path:
    """Where Ray writes the token of a local cluster it starts (~/.ray/auth_token)."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    return _get_default_token_path()


def use_cluster_token() -> None:
    """Send the cluster's token from this process, as Ray's own CLI does: token mode when a
    token exists and RAY_AUTH_MODE does not say otherwise. Only the processes Ray starts inherit
    the mode it turns on for a local cluster; the drift monitor starts before Ray, and a CLI
    runs in another shell."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _keep_token_private() -> None:
    """Ray 2.60 turns token authentication on for a new local cluster and writes its token
    readable by every user of the machine (0644); whoever holds it can submit a job, that is
    run code as us. Only this user reads it (the drift monitor and the CLI do,
    retrain/trigger.py)."""
    token = ray_token_file()
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def _wait_for_metrics_agent(port: int) -> None:
    """Ray's metrics agent (in the dashboard agent) can take tens of seconds to start on a cold
    machine; a worker that starts first retries it for a bounded time and then drops its metrics
    for good, so replicas started too early would never be seen by Prometheus. Serve's actors
    start only once the agent answers."""
    url, deadline, noted = f"http://127.0.0.1:{port}/metrics", time.monotonic() + METRICS_AGENT_WAIT_S, 0.0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() - noted > 10:
            log.warning("waiting for Ray's metrics agent at %s", url)
            noted = time.monotonic()
        time.sleep(0.5)
    log.warning("Ray's metrics agent did not answer at %s within %.0f s: metrics may be missing", url,
                METRICS_AGENT_WAIT_S)


BACKGROUND_WORKERS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ServeController")
"""Processes the raylet starts that never serve a request: its agents and Serve's controller.
Its other workers (replicas, the proxy, idle workers that become replicas) keep their priority."""


def ray_background_processes(driver: psutil.Process) -> list[psutil.Process]:
    """What the local cluster this driver started runs beside the request path: the GCS, the
    dashboard, the autoscaler and log monitors (the driver's children but the raylet, and their
    children), the raylet's agents and Serve's controller. Not the raylet: every worker it forks
    would inherit its priority."""
    found: list[psutil.Process] = []
    for child in driver.children():
        try:
            if child.name() == "raylet":
                found += raylet_workers(child, BACKGROUND_WORKERS)
            else:
                found += [child, *child.children(recursive=True)]
        except psutil.Error:  # exited meanwhile
            continue
    return found


def raylet_workers(raylet: psutil.Process, titles: tuple[str, ...]) -> list[psutil.Process]:
    """The raylet's worker processes whose title (Ray sets it to `ray::<actor>`) starts with one
    of `titles`."""
    found = []
    for worker in raylet.children():
        try:
            if " ".join(worker.cmdline()).startswith(titles):
                found.append(worker)
        except psutil.Error:  # exited meanwhile
            continue
    return found


SERVE_ACTORS = ("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica")
"""Serve's actor processes: their main thread is Ray's task loop (`idle_task_loop`)."""


def idle_task_loop(pid: int) -> bool:
    """Ray's task loop in an actor's process (its main thread, whose thread id is the process
    id) to Linux's idle policy; True when it changed. The loop wakes every 10 ms to check for
    signals (hard-coded in Ray's core worker): 100 wakeups a second in each of Serve's actors,
    each one taking a core from one of the engine's two threads for a moment, and those threads
    wait for each other at every step. Requests never run on this thread: they reach a replica
    over its own gRPC server or HTTP port, on its event loop (RAY_TUNING). Only Ray's own calls
    do (health checks, reconfiguration), which run when a core has nothing else to do; under
    full load Linux still gives the thread a sliver, enough for a health check a few seconds
    apart. On 2 cores, in rounds alternated on one service: the engine in its replica 1-2 %
    faster at c=1, 3-5 % more throughput at c=16 (loadtests/RESULTS.md)."""
    try:
        return idle_thread(pid)
    except OSError:  # exited meanwhile, or a kernel without SCHED_IDLE
        log.warning("could not put Ray's task loop of process %d under the idle policy", pid, exc_info=True)
        return False


def idle_own_task_loop() -> None:
    """For a replica's constructor: `idle_task_loop` on its own process, when that is a Ray
    actor's (not a test that builds the class in its own process)."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        idle_task_loop(os.getpid())


def lower_ray_background_priority(niceness: int) -> None:
    """On a local cluster started by this process, Ray's and Serve's processes that serve no
    request, and this driver itself, run at `niceness`, as the side processes do: on 2 cores
    their idle work (0.15-0.2 of a core) preempts the engine's two threads; beside the idle
    service the engine took up to 1.3x its time alone (loadtests/service_bench.py measures both)."""
    if niceness <= 0 or joining_a_cluster() or not ray.is_initialized():
        return
    driver = psutil.Process()
    processes = ray_background_processes(driver)
    threads = lower_processes([*processes, driver], niceness)
    log.info("Ray's background processes (%s) and this driver at niceness %d (%d threads)",
             ", ".join(sorted({_label(p) for p in processes})), niceness, threads)
    loops = [p for p in serve_actor_processes(driver) if idle_task_loop(p.pid)]
    log.info("Ray's task loop under the idle policy in %s", ", ".join(sorted({_label(p) for p in loops})) or "none")


def serve_actor_processes(driver: psutil.Process) -> list[psutil.Process]:
    """Serve's actors on the local cluster this driver started (SERVE_ACTORS): its controller
    and proxy, whose task loops nothing else reaches, and the replicas running now (each also
    idles its own when it starts: a later replica, or one on KubeRay)."""
    return [worker for child in driver.children() if _label(child) == "raylet"
            for worker in raylet_workers(child, SERVE_ACTORS)]


def _label(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return str(process.pid)
