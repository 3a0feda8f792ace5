"""Rollout operations on a real registry: canary, traffic, promote, roll back, audit, conflicts."""

from pathlib import Path

import pytest

from asrops.errors import ConflictError, RolloutRefusedError
from asrops.promotion import rollout
from asrops.registry import Aliases, LocalStore, ModelRegistry
from asrops.serve.routing import plan_route


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    registry = ModelRegistry(LocalStore(tmp_path / "registry"), tmp_path / "cache")
    for i, version in enumerate(["v1", "v2", "v3"]):
        src = tmp_path / version
        src.mkdir()
        (src / "model.bin").write_bytes(bytes([i]) * 64)
        registry.publish(src, id=version, family="test", parent=None, source="test")
    registry.write_aliases(Aliases(stable="v1"), None)
    return registry


def test_canary_then_promote_makes_it_stable_and_the_old_stable_the_fallback(registry):
    rollout.deploy_canary(registry, "v2", weight=10, shadow_share=0.2, actor="alice", reason="retrained on drift")
    view = rollout.current(registry)
    assert view.aliases == Aliases(stable="v1", canary="v2")
    assert (view.rollout.canary_version, view.rollout.canary_weight, view.rollout.shadow_share) == ("v2", 10, 0.2)
    rollout.set_traffic(registry, weight=50, shadow_share=None, actor="alice", reason="step")
    assert rollout.current(registry).rollout.canary_weight == 50
    rollout.promote(registry, actor="bob", reason="checks passed")
    view = rollout.current(registry)
    assert view.aliases == Aliases(stable="v2", canary=None, fallback="v1")
    assert view.rollout.canary_version is None and view.rollout.canary_weight == 0


def test_rollback_puts_all_traffic_back_on_stable_and_keeps_the_aliases(registry):
    registry.write_aliases(Aliases(stable="v1", fallback="v3"), registry.read_aliases().token)
    rollout.deploy_canary(registry, "v2", weight=25, shadow_share=0.0, actor="alice", reason="try")
    rollout.rollback(registry, actor="controller", reason="error ratio out of range")
    view = rollout.current(registry)
    assert view.aliases == Aliases(stable="v1", fallback="v3")
    assert view.rollout.canary_weight == 0 and view.rollout.canary_version is None
    plan = plan_route("stable", view.aliases, view.rollout, "anyone", "r", {"v1", "v2", "v3"})
    assert plan.version == "v1"


def test_rollback_right_after_a_promotion_restores_the_old_aliases(registry):
    registry.write_aliases(Aliases(stable="v1", fallback="v3"), registry.read_aliases().token)
    rollout.deploy_canary(registry, "v2", weight=50, shadow_share=0.0, actor="a", reason="r")
    rollout.promote(registry, actor="a", reason="r")
    assert rollout.current(registry).aliases == Aliases(stable="v2", fallback="v1")
    rollout.rollback(registry, actor="b", reason="complaints")
    assert rollout.current(registry).aliases == Aliases(stable="v1", fallback="v3")
    with pytest.raises(RolloutRefusedError):  # a promotion is undone once
        rollout.rollback(registry, actor="b", reason="again")


def test_every_change_is_audited_with_who_why_before_and_after(registry):
    rollout.deploy_canary(registry, "v2", weight=5, shadow_share=0.0, actor="alice", reason="new data")
    rollout.promote(registry, actor="bob", reason="good")
    entries = rollout.read_audit(registry)
    assert [(e.action, e.actor, e.reason) for e in entries] == [
        ("deploy_canary", "alice", "new data"), ("promote", "bob", "good")]
    assert entries[1].before.aliases.stable == "v1" and entries[1].after.aliases.stable == "v2"


def test_nonsense_changes_are_refused_and_change_nothing(registry):
    before = rollout.current(registry)
    for change in (
        lambda: rollout.promote(registry, "a", "r"),
        lambda: rollout.rollback(registry, "a", "r"),
        lambda: rollout.set_traffic(registry, 10, None, "a", "r"),
        lambda: rollout.deploy_canary(registry, "v1", 10, 0.0, "a", "r"),
    ):
        with pytest.raises(RolloutRefusedError):
            change()
    assert rollout.current(registry) == before and rollout.read_audit(registry) == []


def test_a_concurrent_writer_gets_a_conflict_not_a_lost_update(registry, monkeypatch):
    rollout.deploy_canary(registry, "v2", weight=5, shadow_share=0.0, actor="alice", reason="r")
    real_read = registry.read_rollout
    stale = real_read()

    raced = []

    def read_then_lose_the_race():
        if not raced:  # another writer lands right after our read
            raced.append(registry.write_rollout(stale.value.model_copy(update={"canary_weight": 7}), stale.token))
        return stale

    monkeypatch.setattr(registry, "read_rollout", read_then_lose_the_race)
    with pytest.raises(ConflictError):
        rollout.set_traffic(registry, weight=50, shadow_share=None, actor="bob", reason="r")
    monkeypatch.setattr(registry, "read_rollout", real_read)
    assert raced and rollout.current(registry).rollout.canary_weight == 7  # the winner's write stands
    # The loser's entry, written before it tried, says it failed.
    assert [(e.action, e.outcome) for e in rollout.read_audit(registry)] == [
        ("deploy_canary", "applied"), ("set_traffic", "failed")]
    assert "ConflictError" in rollout.read_audit(registry)[-1].error


def test_concurrent_changes_take_turns_and_the_audit_is_one_serial_history(registry):
    """The controller, operators and retrain jobs act at once: each change's `before` is the
    previous change's `after`, and at rest the aliases and the rollout agree."""
    import threading

    def operator(name: str, act) -> None:
        for _ in range(12):
            try:
                act(name)
            except RolloutRefusedError:
                pass

    actors = [
        threading.Thread(target=operator, args=("deployer", lambda n: rollout.deploy_canary(
            registry, "v2", weight=10, shadow_share=0.0, actor=n, reason="r"))),
        threading.Thread(target=operator, args=("stepper", lambda n: rollout.set_traffic(
            registry, 50, None, actor=n, reason="r", expected_canary="v2"))),
        threading.Thread(target=operator, args=("promoter", lambda n: rollout.promote(
            registry, actor=n, reason="r", expected_canary="v2"))),
        threading.Thread(target=operator, args=("roller", lambda n: rollout.rollback(
            registry, actor=n, reason="r", expected_canary="v2"))),
        threading.Thread(target=operator, args=("undoer", lambda n: rollout.rollback(registry, actor=n, reason="r"))),
    ]
    for t in actors:
        t.start()
    for t in actors:
        t.join()
    entries = rollout.read_audit(registry, 1000)
    assert entries and all(e.outcome == "applied" for e in entries)
    assert len(entries) >= 2  # the deployer's first try, and others' (which ones: the race decides)
    for earlier, later in zip(entries, entries[1:], strict=False):
        assert later.before == earlier.after, (earlier.action, later.action)
    view = rollout.current(registry)
    assert view == entries[-1].after
    assert view.aliases.canary == view.rollout.canary_version


def test_a_change_is_audited_before_it_is_made(registry, monkeypatch):
    """A process that dies during a change leaves its entry behind (pending)."""
    def die(*args, **kwargs):
        assert [e.outcome for e in rollout.read_audit(registry)] == ["pending"]
        raise SystemExit("killed")

    monkeypatch.setattr(registry, "update_rollout", die)
    with pytest.raises(SystemExit):
        rollout.deploy_canary(registry, "v2", weight=5, shadow_share=0.0, actor="a", reason="r")
    [entry] = rollout.read_audit(registry)
    assert entry.action == "deploy_canary" and entry.outcome == "pending" and entry.after is None
    # and its lease was let go: the next change is not blocked.
    monkeypatch.undo()
    rollout.rollback(registry, actor="b", reason="clean up")


def test_read_audit_path_is_inside_the_registry(registry, tmp_path):
    rollout.deploy_canary(registry, "v3", weight=1, shadow_share=0.0, actor="a", reason="r")
    assert list(Path(tmp_path / "registry").rglob("audit/*.json"))


# --- the admin API over the same operations ----------------------------------------------
def _admin_client(registry, tokens=("adm-secret",)):
    from fastapi.testclient import TestClient

    from asrops.serve.admin import build_admin
    from asrops.serve.api import build_api
    from asrops.settings import Settings
    from tests.test_api import FakeTranscriber

    settings = Settings(data_dir="/nonexistent")
    admin = build_admin(registry, list(tokens), lambda: {"running": ["v1"]})
    return TestClient(build_api(FakeTranscriber(), settings, admin=admin))


def test_admin_calls_without_the_admin_token_get_401_and_change_nothing(registry):
    client = _admin_client(registry)
    before = rollout.current(registry)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sk-client-key"}):
        assert client.get("/admin/rollout", headers=headers).status_code == 401
        r = client.post("/admin/rollout/canary", json={"version": "v2", "weight": 50}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/admin/rollout/promote", json={}, headers=headers).status_code == 401
    assert rollout.current(registry) == before and rollout.read_audit(registry) == []


def test_with_no_admin_token_configured_the_admin_api_is_off(registry):
    client = _admin_client(registry, tokens=())
    r = client.post("/admin/rollout/canary", json={"version": "v2"}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and "ASROPS_SERVE__ADMIN_TOKENS" in r.json()["error"]["message"]


def test_admin_api_runs_a_rollout_and_audits_it(registry):
    client = _admin_client(registry)
    auth = {"Authorization": "Bearer adm-secret", "X-Actor": "carol"}
    r = client.post("/admin/rollout/canary", json={"version": "v2", "weight": 10, "reason": "drift"}, headers=auth)
    assert r.status_code == 200 and r.json()["after"]["rollout"]["canary_weight"] == 10
    assert client.post("/admin/rollout/traffic", json={"weight": 150}, headers=auth).status_code in (400, 422)
    assert client.post("/admin/rollout/traffic", json={"weight": 40}, headers=auth).status_code == 200
    status = client.get("/admin/rollout", headers=auth).json()
    assert status["view"]["rollout"]["canary_weight"] == 40 and status["serving"] == {"running": ["v1"]}
    assert client.post("/admin/rollout/promote", json={"reason": "good"}, headers=auth).status_code == 200
    r = client.post("/admin/rollout/promote", json={}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "rollout_refused"
    r = client.post("/admin/rollout/canary", json={"version": "v9"}, headers=auth)
    assert r.status_code == 404
    audit = client.get("/admin/audit", headers=auth).json()
    assert [e["action"] for e in audit] == ["deploy_canary", "set_traffic", "promote"]
    assert audit[0]["actor"].startswith("carol (token ") and "adm-secret" not in audit[0]["actor"]
    assert rollout.current(registry).aliases == Aliases(stable="v2", fallback="v1")


def test_the_audit_limit_is_bounded(registry):
    client = _admin_client(registry)
    auth = {"Authorization": "Bearer adm-secret"}
    for bad in (0, -1, 100_000):
        r = client.get(f"/admin/audit?limit={bad}", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text
    assert client.get("/admin/audit?limit=1", headers=auth).status_code == 200
    with pytest.raises(ValueError):
        rollout.read_audit(registry, 0)


def test_the_admin_api_on_its_own_port_is_the_same_api_and_the_client_port_has_none(registry):
    from fastapi.testclient import TestClient

    from asrops.serve.admin import build_admin, build_admin_app
    from asrops.serve.api import build_api
    from asrops.settings import Settings
    from tests.test_api import FakeTranscriber

    admin = TestClient(build_admin_app(build_admin(registry, ["adm-secret"], lambda: {"running": ["v1"]}), 2))
    auth = {"Authorization": "Bearer adm-secret"}
    assert admin.post("/admin/rollout/canary", json={"version": "v2", "weight": 10}, headers=auth).status_code == 200
    r = admin.post("/admin/rollout/canary", json={"version": "v2"}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [e.action for e in rollout.read_audit(registry)] == ["deploy_canary"]
    # With serve.admin_port set, the ingress builds its client app without the admin router.
    client = TestClient(build_api(FakeTranscriber(), Settings(data_dir="/nonexistent"), admin=None))
    assert client.get("/admin/rollout", headers=auth).status_code == 404
