"""Shared pytest fixtures. Keep each fixture small and documented; add new ones below."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from asrops.settings import Settings
from loadtests import CHECKOUT_SPEECH
from loadtests.local_s3 import LOCAL_S3_CREDENTIALS, MotoServer
from loadtests.service_bench import free_port

SERVICE_GROUP = "ray-service"
"""The xdist group of every test that uses the session's service (see pytest_collection_modifyitems)."""
TRAINING_GROUP = "ray-training"
TRAINING_MODULES = {"tests.test_retrain_job", "tests.test_retrain_generalisation"}
"""The modules that train for minutes, each wanting both cores: in one group they train one after
the other, beside the service's group rather than inside it (the retrain job brings its own Ray,
`ray_node`)."""
FIRST_GROUPS = (SERVICE_GROUP, TRAINING_GROUP, "tests.test_engines", "tests.test_k8s")
"""The longest groups (minutes each on 2 cores), handed out first so that the short ones fill in
around them rather than one of them starting last (scripts/test.sh keeps this order:
--no-loadscope-reorder)."""


@pytest.hookimpl(tryfirst=True)  # the marks must be there when xdist reads them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for pytest-xdist's `--dist loadgroup` (scripts/test.sh runs one worker per core):
    every test on the session's service in one group, so that one worker starts Ray and Serve
    once and runs them in order; the training modules in one group (TRAINING_MODULES); every
    other module in a group of its own, so that its module fixtures (a Prometheus, a trained
    model) are built once. The longest groups go first (FIRST_GROUPS), with or without xdist
    (without it the marks do nothing). pytest 9.2 broke loadgroup (pytest-xdist#1386: every test
    became its own unit, and each worker started its own service): pyproject pins pytest < 9.2."""
    groups = {}
    for item in items:
        module = item.module.__name__
        group = SERVICE_GROUP if "service" in item.fixturenames else (
            TRAINING_GROUP if module in TRAINING_MODULES else module)
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item] = group
    rank = {group: i for i, group in enumerate(FIRST_GROUPS)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))  # stable: each group keeps its order


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a real moto S3 server (a separate process speaking HTTP on 127.0.0.1), started
    once per session. Tests create their own buckets. Sets dummy AWS credentials in the
    environment for the session so boto3 never reaches for real ones."""
    server = MotoServer()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in LOCAL_S3_CREDENTIALS.items():
                mp.setenv(name, value)
            yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def registry_settings(request, tmp_path, monkeypatch) -> Settings:
    """Settings from the environment, the way the services build theirs, with a fresh registry:
    a local directory, then a bucket on the moto server."""
    for name in ("ASROPS_REGISTRY__URI", "ASROPS_REGISTRY__S3_ENDPOINT_URL", "ASROPS_REGISTRY__CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ASROPS_DATA_DIR", str(tmp_path / "data"))
    if request.param == "s3":
        endpoint, bucket = new_moto_bucket(request)
        monkeypatch.setenv("ASROPS_REGISTRY__URI", f"s3://{bucket}/models")
        monkeypatch.setenv("ASROPS_REGISTRY__S3_ENDPOINT_URL", endpoint)
    return Settings()


def new_moto_bucket(request) -> tuple[str, str]:
    """(endpoint, bucket): a fresh bucket on the session's moto server."""
    import uuid

    import boto3

    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"asrops-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return endpoint, bucket


SPEECH_DIR = Settings().speech_data_dir or CHECKOUT_SPEECH
"""ASROPS_SPEECH_DATA_DIR, else the shared speech data beside the checkout."""


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    """Real recorded English speech with exact transcripts (../shared/data/speech)."""
    if not (SPEECH_DIR / "manifest.jsonl").exists():
        pytest.skip(f"real speech not found at {SPEECH_DIR}; tests that need it are skipped")
    return SPEECH_DIR


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, worker_id) -> Path:
    """One asrops data directory for each test process, holding the embedded default as `stable`.
    Importing it (conversion, ONNX export and quantisation) takes about a minute on 2 cores, so
    under xdist the first worker to ask imports it once into the run's shared temporary directory
    and every worker copies that (pytest-xdist's recipe for a session fixture made once)."""
    if worker_id == "master":
        return _import_embedded_default(tmp_path_factory.mktemp("asrops-data"))
    from filelock import FileLock

    imported = tmp_path_factory.getbasetemp().parent / "asrops-data-imported"
    with FileLock(f"{imported}.lock"):
        if not imported.exists():
            partial = imported.with_name(f"{imported.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            _import_embedded_default(partial).rename(imported)
    root = tmp_path_factory.mktemp("asrops-data")
    shutil.copytree(imported, root, dirs_exist_ok=True)
    return root


def _import_embedded_default(root: Path) -> Path:
    from asrops.models.importer import import_embedded_default
    from asrops.registry import ModelRegistry
    from asrops.settings import Settings

    root.mkdir(parents=True, exist_ok=True)
    import_embedded_default(ModelRegistry.from_settings(Settings(data_dir=root)))
    return root


@pytest.fixture(scope="session")
def stable_dir(data_dir) -> Path:
    """The verified local directory of the default `stable` version."""
    from asrops.registry import ModelRegistry
    from asrops.settings import Settings

    return ModelRegistry.from_settings(Settings(data_dir=data_dir)).fetch("stable")


@pytest.fixture(scope="session")
def engines(stable_dir) -> dict:
    """Each of our engines over the stable version, loaded once, 2 threads."""
    from asrops.engines import load_engine

    return {kind: load_engine(stable_dir, kind, "cpu", 2) for kind in ("torch", "onnx", "onnx-int8")}


ADMIN_TOKEN = "test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
"""What an operator sends the admin API of the session's service."""


def stable_replica_pid(service: str) -> int:
    """The pid of a replica serving the service's stable version now, asked of that replica
    itself (`ModelServer.info`, waiting up to a minute for one to be up): a replica just
    replaced, or a stable version just redeployed, is found once it serves."""
    import httpx
    from ray import serve

    stable = httpx.get(f"{service}/admin/rollout", headers=ADMIN_HEADERS).json()["view"]["aliases"]["stable"]
    return serve.get_app_handle(f"model-{stable}").info.remote().result(timeout_s=60)["pid"]


@pytest.fixture(scope="session")
def service_settings(data_dir):
    """The settings the session's service runs with (free ports, test admin token)."""
    from asrops.settings import Settings

    settings = Settings(data_dir=data_dir)
    settings.serve.port = free_port()
    settings.serve.proxy_port = free_port()
    settings.serve.max_batch_size = 8
    settings.serve.admin_tokens = [ADMIN_TOKEN]
    settings.serve.canary_timeout_s = 3.0  # a hung canary is given up on quickly
    settings.monitoring.ray_metrics_port = free_port()
    settings.monitoring.monitor_port = free_port()
    settings.promotion.metrics_port = free_port()
    settings.monitoring.production_log.flush_interval_s = 0.5
    return settings


def prometheus_settings(service_settings):
    """Settings for a test's own Prometheus beside the session's service: a free port, a 2-s
    scrape of every job, Ray's included (its timeout too), at the tests' priority. Ray's endpoint
    is large (about 900 kB and 2,300 series on a fresh node, more as replicas come and go): at a
    1-s timeout and `asrops serve`'s background niceness, with a retrain in the other xdist
    worker, Prometheus lost every Ray series for minutes, twice in CI."""
    settings = service_settings.model_copy(deep=True)
    settings.monitoring.prometheus_port = free_port()
    settings.monitoring.scrape_interval_s = 2
    settings.monitoring.ray_scrape_interval_s = 2
    settings.monitoring.background_niceness = 0
    return settings


@pytest.fixture(scope="module")
def ray_node(service_settings) -> Iterator[None]:
    """Ray on this machine, for a module that runs Ray jobs without Serve (a retrain): the
    session's service's Ray when this worker already runs it, else one of the module's own,
    stopped after it (an idle Ray takes a fifth of a core on 2)."""
    import ray

    from asrops.raycluster import init_ray

    started = not ray.is_initialized()
    init_ray(service_settings)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def service(service_settings) -> Iterator[str]:
    """The real service: local Ray, Serve's HTTP proxy, the stable model application and the
    ingress, on a free port. Yields the base URL; shuts Serve and Ray down at the end."""
    import ray
    from ray import serve

    from asrops.serve.launcher import run_local

    url = run_local(service_settings)
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
