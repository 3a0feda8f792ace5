"""The Kubernetes manifests (k8s/): every overlay renders with `kubectl kustomize`, and every object
validates: core kinds against Kubernetes' own schemas (kubernetes-validate bundles them), the
KubeRay and Prometheus Operator kinds against their CRDs' schemas (with unknown fields refused,
as the API server would silently prune them), serveConfigV2 against Serve's schema. Each
generated part equals its one source; the images and setup.sh install alike; nothing secret is
written. No cluster and no network. The last test deploys the rendered serveConfigV2 on a local
Ray (slow)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from asrops.k8s import render as k8s
from asrops.serve.deploy_config import serve_deploy_config
from asrops.settings import MonitoringSettings, PromotionSettings, ServeSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "data" / "k8s-crds"
"""The KubeRay and Prometheus Operator CRDs, copied unchanged (see its README)."""
KUBERNETES_VERSION = "1.31"
"""The oldest Kubernetes the manifests are checked against (kubernetes-validate's bundled schemas)."""
CUSTOM_KINDS = {"RayService", "RayCluster", "RayJob", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
SECRET_ENV = re.compile(r"API_KEYS|ADMIN_TOKENS|SECRET|PASSWORD|ACCESS_KEY|TOKEN", re.I)
"""Env var names whose value is a secret: only ever from a Secret, never written down."""

def _no_usable_kubectl() -> str | None:
    """Why the overlays cannot be rendered here (no kubectl, or one whose kustomize is too old), or None."""
    try:
        k8s.render_tool()
    except k8s.KubectlMissing as exc:
        return str(exc)
    return None


NO_KUBECTL = _no_usable_kubectl()
requires_kubectl = pytest.mark.skipif(NO_KUBECTL is not None, reason=NO_KUBECTL or "")


@cache
def _objects(overlay: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(k8s.render(overlay)) if d)


@pytest.fixture(params=k8s.OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay) -> tuple[dict, ...]:
    """Every object the overlay renders to."""
    if NO_KUBECTL is not None:
        pytest.skip(NO_KUBECTL)
    return _objects(overlay)


def _of(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in _of(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _ray_groups(rayservice: dict) -> dict[str, dict]:
    """Group name ("head" for the head) -> its group spec."""
    config = rayservice["spec"]["rayClusterConfig"]
    return {"head": config["headGroupSpec"], **{g["groupName"]: g for g in config["workerGroupSpecs"]}}


def _pod_specs(objects) -> dict[str, dict]:
    """Every pod template's spec, by where it is."""
    specs = {f"Deployment/{d['metadata']['name']}": d["spec"]["template"]["spec"] for d in _of(objects, "Deployment")}
    for rs in _of(objects, "RayService"):
        specs |= {f"RayService/{group}": spec["template"]["spec"] for group, spec in _ray_groups(rs).items()}
    return specs


def _containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


# --- one source each -------------------------------------------------------------------------
def test_the_generated_files_are_up_to_date():
    """serve/serve_config.yaml and k8s/components/{generated,images}/ are what the code gives now."""
    stale = [str(p.relative_to(ROOT)) for p in k8s.stale()]
    assert not stale, f"stale generated files {stale}: run `asrops k8s generate` and commit them"


def test_the_serve_config_file_is_the_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(k8s.SERVE_CONFIG_FILE.read_text())
    assert data == serve_deploy_config()
    ServeDeploySchema.model_validate(data)


def test_serve_config_v2_is_the_deploy_config(objects):
    from ray.serve.schema import ServeDeploySchema

    for rayservice in _of(objects, "RayService"):
        config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        assert config == serve_deploy_config()
        ServeDeploySchema.model_validate(config)
        assert config["http_options"]["port"] == ServeSettings().port


def test_every_ray_process_gets_the_ray_tuning_a_local_cluster_gets(objects):
    """The Ray containers of every group (head, CPU and GPU workers) read Ray's and Ray Serve's
    environment from the generated ConfigMap, which holds what `asrops serve` sets on a local cluster: a
    worker group without it would serve at nice 15, over actor calls, with a busier controller."""
    from asrops.raycluster import RAY_TUNING

    assert _one(objects, "ConfigMap", k8s.RAY_TUNING_CONFIGMAP)["data"] == RAY_TUNING
    for group, spec in _ray_groups(_one(objects, "RayService")).items():
        for c in spec["template"]["spec"]["containers"]:
            refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
            assert k8s.RAY_TUNING_CONFIGMAP in refs, f"{group}/{c['name']}"


def test_ray_version_and_image_tags_follow_the_pyproject_pin(objects):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in pyproject["dependencies"] if d.startswith("ray[")).split("==")[1]
    custom = [o for o in objects if o["kind"] in {"RayService", "RayCluster", "RayJob"}]
    assert custom
    for o in custom:
        config = o["spec"].get("rayClusterConfig") or o["spec"].get("rayClusterSpec") or o["spec"]
        assert config["rayVersion"] == ray_pin, f"{o['kind']}/{o['metadata']['name']}"
    ours = [c["image"] for pod in _pod_specs(objects).values() for c in _containers(pod)
            if c["image"].split(":")[0] == k8s.IMAGE_REPOSITORY]
    assert ours, "no container runs the asrops image"
    assert all(image.rsplit("-", 1)[0] == f"{k8s.IMAGE_REPOSITORY}:{pyproject['version']}-ray{ray_pin}"
               for image in ours), sorted(set(ours))
    for name, spec in _ray_groups(_one(objects, "RayService")).items():
        variant = "cuda" if name == "gpu" else "cpu"
        assert spec["template"]["spec"]["containers"][0]["image"] == k8s.pins().image(variant), name


def test_the_prometheus_rule_is_the_alert_rules_file_and_passes_promtool(objects, tmp_path):
    from asrops.monitoring.prometheus import ALERT_RULES_FILE

    groups = _one(objects, "PrometheusRule")["spec"]["groups"]
    assert groups == yaml.safe_load(ALERT_RULES_FILE.read_text())["groups"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_config_map_is_the_dashboard_file(objects):
    from asrops.monitoring.dashboards import DASHBOARD_FILE

    dashboard = _one(objects, "ConfigMap", "asrops-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {DASHBOARD_FILE.name: DASHBOARD_FILE.read_text()}


def _setting_exists(name: str) -> bool:
    """ASROPS_A__B_C names the field b_c of the nested model a of Settings."""
    model = Settings
    for part in name.removeprefix("ASROPS_").lower().split("__"):
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation if isinstance(field.annotation, type) else None
    return True


def test_every_asrops_variable_names_a_real_setting(objects):
    """Settings ignore unknown ASROPS_ variables, so a typo here would be a setting silently not set."""
    names = {k for cm in _of(objects, "ConfigMap") for k in cm.get("data", {}) if k.startswith("ASROPS_")}
    names |= {e["name"] for pod in _pod_specs(objects).values() for c in _containers(pod)
              for e in c.get("env", []) if e["name"].startswith("ASROPS_")}
    assert names
    assert not [n for n in sorted(names) if not _setting_exists(n)]
    assert not _setting_exists("ASROPS_SERVE__NO_SUCH_SETTING")


def test_the_settings_config_map_loads(objects, monkeypatch):
    """What the pods read gives valid settings (a wrong value fails at start-up, not here otherwise)."""
    data = _one(objects, "ConfigMap", "asrops-settings")["data"]
    for name in [n for n in os.environ if n.startswith("ASROPS_")]:
        monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.registry_uri.startswith("s3://") and settings.production_log_uri.startswith("s3://")
    assert settings.serve.admin_port is not None
    assert settings.monitoring.metrics_host == "0.0.0.0"  # the PodMonitors scrape the pod's address


def test_ports_probes_and_job_names_match_the_code(objects):
    from asrops.monitoring.prometheus import CONTROLLER_JOB, MONITOR_JOB, RAY_JOB

    ray_port, serve_port = MonitoringSettings().ray_metrics_port, ServeSettings().port
    rayservice = _one(objects, "RayService")
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True  # clients reach probed workers only
    for name, group in _ray_groups(rayservice).items():
        assert group["rayStartParams"]["metrics-export-port"] == str(ray_port), name
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == ray_port and ports["serve"] == serve_port, name
        if name != "head":  # the head's readiness gates KubeRay's deploy of the applications
            ray = group["template"]["spec"]["containers"][0]
            assert ray["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": serve_port}, name
            assert ray["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": serve_port}, name
    api = (ROOT / "serve" / "api.py").read_text()
    assert '@app.get("/readyz")' in api and '@app.get("/healthz")' in api

    served = {"drift-monitor": MonitoringSettings().monitor_port,
              "promotion-controller": PromotionSettings().metrics_port}
    for component, port in served.items():  # on the pod's address (METRICS_HOST), for the PodMonitors
        pod = _one(objects, "Deployment", f"asrops-{component}")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["ports"] == [{"name": "metrics", "containerPort": port}]
        assert container["livenessProbe"]["httpGet"]["port"] == port

    settings = MonitoringSettings()
    every = f"{settings.scrape_interval_s:g}s"
    intervals = {"asrops-ray": f"{settings.ray_scrape_interval_s:g}s", "asrops-drift-monitor": every,
                 "asrops-promotion-controller": every}
    jobs = {"asrops-ray": RAY_JOB, "asrops-drift-monitor": MONITOR_JOB, "asrops-promotion-controller": CONTROLLER_JOB}
    pod_labels = [spec["template"]["metadata"]["labels"] for spec in _ray_groups(rayservice).values()]
    pod_labels += [d["spec"]["template"]["metadata"]["labels"] for d in _of(objects, "Deployment")]
    for monitor in _of(objects, "PodMonitor"):
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics" and endpoint["interval"] == intervals[monitor["metadata"]["name"]]
        assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": jobs[monitor["metadata"]["name"]]}]
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        assert any(wanted <= labels.items() for labels in pod_labels), f"{monitor['metadata']['name']} selects no pod"


def test_the_monitor_and_the_controller_run_real_commands_once_each(objects):
    from typer.testing import CliRunner

    from asrops.cli.main import app

    for component in ("drift-monitor", "promotion-controller"):
        deployment = _one(objects, "Deployment", f"asrops-{component}")
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
        command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[0] == "asrops"
        result = CliRunner().invoke(app, [*command[1:], "--help"])
        assert result.exit_code == 0, f"{command}: {result.output}"
    for pod in _pod_specs(objects).values():
        for c in _containers(pod):
            if c.get("command", [""])[0] == "asrops":
                assert CliRunner().invoke(app, [*c["command"][1:], "--help"]).exit_code == 0, c["command"]


def test_retrains_go_to_the_clusters_jobs_api_and_gpus_scale_from_zero(objects, overlay):
    settings = _one(objects, "ConfigMap", "asrops-settings")["data"]
    rayservice = _one(objects, "RayService")
    head_service = f"{rayservice['metadata']['name']}-head-svc"  # the Service KubeRay makes for a RayService
    assert settings["ASROPS_RETRAIN__TRIGGER__JOBS_ADDRESS"] == f"http://{head_service}:8265"
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    groups = _ray_groups(rayservice)
    assert groups["head"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    if overlay != "gpu":
        assert "gpu" not in groups
        return
    gpu, cpu = groups["gpu"], groups["cpu"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    assert settings["ASROPS_RETRAIN__TRAIN__USE_GPU"] == "yes"  # asks for a GPU that is not up yet
    share = float(settings["ASROPS_SERVE__MODEL_NUM_GPUS"])  # stable, canary and fallback on one GPU
    assert share > 0 and 3 * share <= 1
    pod = gpu["template"]["spec"]
    ray = pod["containers"][0]
    assert ray["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]

    def same_part(spec: dict) -> dict:
        spec = copy.deepcopy(spec)
        for key in ("nodeSelector", "tolerations"):
            spec.pop(key, None)
        for key in ("image", "resources"):
            spec["containers"][0].pop(key)
        return spec

    assert same_part(pod) == same_part(cpu["template"]["spec"]), "the GPU group's pod has drifted from the CPU group's"
    assert gpu["rayStartParams"] == cpu["rayStartParams"]


# --- validity --------------------------------------------------------------------------------
def test_core_objects_validate_against_kubernetes_schemas(objects):
    import kubernetes_validate

    core = [o for o in objects if o["kind"] not in CUSTOM_KINDS]
    assert {o["kind"] for o in objects} - {o["kind"] for o in core} <= CUSTOM_KINDS
    for o in core:
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {path}: {exc.message}")


@cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema, made strict (see `_strict`)."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _strict(schema):
    """An object schema listing its properties admits no others: the API server prunes unknown
    fields silently, so a misspelt field would otherwise pass here and vanish there."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def test_custom_resources_validate_against_their_crds(objects):
    import jsonschema

    if not CRD_DIR.is_dir():
        pytest.skip(f"the CRD schemas are not at {CRD_DIR} (../shared/data/k8s-crds beside the checkout)")
    custom = [o for o in objects if o["kind"] in CUSTOM_KINDS]
    assert {o["kind"] for o in custom} >= {"RayService", "PodMonitor", "PrometheusRule"}
    for o in custom:
        schema = _crd_schemas().get((o["apiVersion"], o["kind"]))
        assert schema is not None, f"no CRD in {CRD_DIR} for {o['apiVersion']} {o['kind']}"
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=lambda e: list(e.path))
        assert not errors, f"{o['kind']}/{o['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5])


def test_the_crd_check_refuses_an_unknown_field(objects):
    """The strict schema above can fail: a misspelt field of a RayService is caught."""
    import jsonschema

    if not CRD_DIR.is_dir():
        pytest.skip(f"the CRD schemas are not at {CRD_DIR}")
    rayservice = copy.deepcopy(_one(objects, "RayService"))
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscalng"] = True
    assert list(jsonschema.Draft7Validator(_crd_schemas()[("ray.io/v1", "RayService")]).iter_errors(rayservice))


# --- security and resources ------------------------------------------------------------------
def test_no_secret_is_written(objects):
    assert not [o["metadata"]["name"] for o in _of(objects, "Secret")], "Secrets are created by the user, not here"
    for cm in _of(objects, "ConfigMap"):
        assert not [k for k in cm.get("data", {}) if SECRET_ENV.search(k)], cm["metadata"]["name"]
    secret_refs = set()
    for where, pod in _pod_specs(objects).items():
        for c in _containers(pod):
            for env in c.get("env", []):
                if SECRET_ENV.search(env["name"]):
                    assert "value" not in env, f"{where}/{c['name']}: {env['name']} is written in the manifest"
                    secret_refs.add(env["valueFrom"]["secretKeyRef"]["name"])
            secret_refs |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
    assert {"asrops-serve", "asrops-s3"} <= secret_refs


def test_every_pod_is_hardened_and_bounded(objects):
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities; requests and
    limits on every container; writable emptyDirs only, each mounted by something."""
    for where, pod in _pod_specs(objects).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        mounted = set()
        for c in _containers(pod):
            name = f"{where}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][bound].keys(), f"{name}: {bound}"
            mounted |= {m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert set(volumes) == mounted, f"{where}: volumes {sorted(volumes)} vs mounted {sorted(mounted)}"
        assert all("emptyDir" in v or "persistentVolumeClaim" in v for v in volumes.values()), where
    for rs in _of(objects, "RayService"):
        autoscaler = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]
        assert {"cpu", "memory"} <= autoscaler["resources"]["limits"].keys()
        assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        head_volumes = {v["name"] for v in head["volumes"]}
        assert {m["name"] for m in autoscaler["volumeMounts"]} <= head_volumes
        # KubeRay's names: it then shares the head's /tmp/ray with the autoscaler it injects
        assert {"ray-logs", "shared-mem"} <= head_volumes


def test_ray_pods_write_only_where_a_volume_is(objects):
    for group, spec in _ray_groups(_one(objects, "RayService")).items():
        mounts = {m["mountPath"] for m in spec["template"]["spec"]["containers"][0]["volumeMounts"]}
        data_dir = _one(objects, "ConfigMap", "asrops-settings")["data"]["ASROPS_DATA_DIR"]
        assert {"/tmp", "/tmp/ray", data_dir, "/dev/shm"} <= mounts, group


def test_network_policies_keep_ray_and_the_admin_api_inside(objects):
    policies = {p["metadata"]["name"]: p["spec"] for p in _of(objects, "NetworkPolicy")}
    deny = policies["asrops-default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    ray = policies["asrops-ray"]
    open_to_all = [rule for rule in ray["ingress"] if "from" not in rule]
    serve_only = [{"ports": [{"port": ServeSettings().port, "protocol": "TCP"}]}]
    assert open_to_all == serve_only, "only Serve's proxy is open to every source"
    for rule in ray["ingress"]:
        if rule.get("ports") and rule["ports"][0]["port"] == 8265:
            assert all("podSelector" in peer for peer in rule["from"]), "the Jobs API is for named pods only"
    admin_port = _one(objects, "ConfigMap", "asrops-settings")["data"]["ASROPS_SERVE__ADMIN_PORT"]
    assert int(admin_port) != ServeSettings().port, "the admin API must be off the client port"
    assert not [o for o in objects if o["kind"] in ("Ingress", "Service") and "admin" in str(o)]


def test_every_object_is_in_the_namespace_and_labelled(objects):
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "asrops", f"{o['kind']}/{o['metadata']['name']}"
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "asrops", f"{o['kind']}/{o['metadata']['name']}"


def test_the_local_overlay_brings_its_object_store(objects, overlay):
    if overlay != "local":
        assert not [d for d in _of(objects, "Deployment") if d["metadata"]["name"] == "minio"]
        return
    minio = _one(objects, "Deployment", "minio")["spec"]["template"]["spec"]["containers"][0]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in minio["env"] if "valueFrom" in e} == {"asrops-s3"}
    settings = _one(objects, "ConfigMap", "asrops-settings")["data"]
    service = _one(objects, "Service", "minio")
    endpoint = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert settings["ASROPS_REGISTRY__S3_ENDPOINT_URL"] == endpoint
    assert settings["ASROPS_MONITORING__PRODUCTION_LOG__S3_ENDPOINT_URL"] == endpoint
    init = [c["name"] for c in _one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
            ["spec"]["initContainers"]]
    assert init == ["ensure-buckets", "seed-registry"], "the bucket first, then the stable version in it"


# --- images ----------------------------------------------------------------------------------
DOCKERFILES = {v: ROOT / "k8s" / "images" / f"Dockerfile.{v}" for v in k8s.IMAGE_VARIANTS}


def test_the_images_and_setup_sh_install_alike():
    """One Python install script and one list of Debian packages, called by setup.sh and both
    images; the same Python base for both images (Ray needs one Python on every node)."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "bash scripts/install-python.sh .venv/bin/python" in setup
    assert "scripts/apt-packages.txt" in setup
    assert "-m pip" not in setup, "setup.sh's pip steps belong in scripts/install-python.sh"
    folders = {"asrops", *tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
               .values()}
    bases = set()
    for variant, path in DOCKERFILES.items():
        text = path.read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, f"{path.name}: multi-stage"
        assert re.search(r"^USER 1000:1000$", text, re.M), f"{path.name}: a non-root user"
        assert "scripts/install-python.sh /opt/venv/bin/python" in text, path.name
        assert "/tmp/apt-packages.txt" in text and "COPY scripts/apt-packages.txt" in text, path.name
        copied = {src.rstrip("/") for line in re.findall(r"^COPY (?!--)(.+)$", text, re.M)
                  for src in line.split()[:-1]}
        assert folders | {"pyproject.toml", "README.md"} <= copied, f"{path.name} copies {sorted(copied)}"
        assert ("\".[gpu]\"" in text) == (variant == "cuda"), path.name
        bases |= set(re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M))
    assert len(bases) == 1, f"the images' Python bases differ: {bases}"


def test_the_image_tags_name_the_ray_pin():
    pins = k8s.pins()
    assert pins.image("cpu") == f"asrops:{pins.asrops_version}-ray{pins.ray_version}-cpu"
    with pytest.raises(ValueError, match="cpu, cuda"):
        pins.tag("rocm")


# --- the command -----------------------------------------------------------------------------
def test_the_generate_and_image_commands():
    from typer.testing import CliRunner

    from asrops.cli.main import app

    check = CliRunner().invoke(app, ["k8s", "generate", "--check"])
    assert check.exit_code == 0 and "up to date" in check.output, check.output
    image = CliRunner().invoke(app, ["k8s", "image", "cuda"])
    assert image.exit_code == 0 and image.stdout.strip() == k8s.pins().image("cuda")
    assert CliRunner().invoke(app, ["k8s", "image", "rocm"]).exit_code == 2


def test_render_without_kubectl_says_what_to_do(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from asrops.cli.main import app

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(k8s.KubectlMissing, match="kubectl"):
        k8s.render("cpu")
    result = CliRunner().invoke(app, ["k8s", "render", "--overlay", "gpu"])
    assert result.exit_code == 1 and "kubectl is not on PATH" in result.output
    # Debian 12's kubectl 1.20 embeds kustomize 2, which knows no Components: said, not a kustomize error.
    old = tmp_path / "kubectl"
    old.write_text('#!/bin/sh\necho \'Client Version: version.Info{Major:"1", Minor:"20", GitVersion:"v1.20.2"}\'\n')
    old.chmod(0o755)
    with pytest.raises(k8s.KubectlMissing, match="Components.*kubectl 1.21"):
        k8s.render("cpu")


@requires_kubectl
def test_render_prints_the_overlay():
    from typer.testing import CliRunner

    from asrops.cli.main import app

    result = CliRunner().invoke(app, ["k8s", "render", "--overlay", "gpu"])
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout) if d] == [o["kind"] for o in _objects("gpu")]
    assert CliRunner().invoke(app, ["k8s", "render", "--overlay", "nope"]).exit_code == 2


def test_ensure_buckets_makes_the_missing_ones(moto_endpoint):
    import uuid

    from asrops.k8s.buckets import ensure_buckets

    registry, log = f"reg-{uuid.uuid4().hex[:8]}", f"log-{uuid.uuid4().hex[:8]}"
    settings = Settings(registry={"uri": f"s3://{registry}/registry", "s3_endpoint_url": moto_endpoint},
                        monitoring={"production_log": {"uri": f"s3://{log}/prodlog", "s3_endpoint_url": moto_endpoint}})
    assert sorted(ensure_buckets(settings, timeout_s=10)) == sorted([registry, log])
    assert ensure_buckets(settings, timeout_s=10) == []


# --- the rendered serve config, running ------------------------------------------------------
@pytest.mark.slow
@requires_kubectl
def test_the_rayservice_serve_config_runs(data_dir, speech_dir, tmp_path):
    """The RayService's serveConfigV2 as rendered, deployed on a local Ray by `asrops serve
    --config` (serve/launcher.py run_config), answers a real clip through the openai SDK. Only
    the proxy's address is changed, to 127.0.0.1 and a free port (tests listen on loopback only,
    and 8000 may be taken); the applications are the rendered ones, unchanged."""
    from openai import OpenAI

    from asrops.textnorm import normalize_english
    from loadtests.service_bench import _stop, _wait_ready, free_port

    rendered = yaml.safe_load(_one(_objects("cpu"), "RayService")["spec"]["serveConfigV2"])
    port = free_port()
    config = {**rendered, "http_options": {**rendered["http_options"], "host": "127.0.0.1", "port": port}}
    assert config["applications"] == rendered["applications"]
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "ASROPS_DATA_DIR": str(data_dir),
        "ASROPS_SERVE__PORT": str(port),
        "ASROPS_MONITORING__PRODUCTION_LOG__URI": str(tmp_path / "prodlog"),
        "ASROPS_MONITORING__RAY_METRICS_PORT": str(free_port()),
        "ASROPS_MONITORING__MONITOR_PORT": str(free_port()),
        "ASROPS_PROMOTION__METRICS_PORT": str(free_port()),
        "ASROPS_MONITORING__PROMETHEUS_ENABLED": "false",
        "ASROPS_PROMOTION__ENABLED": "false",
    }
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "asrops.cli", "serve", "--config", str(config_file)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(f"{url}/readyz", proc, log_path, timeout_s=600)
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            audio = (speech_dir / "faster_whisper" / "jfk.flac").read_bytes()
            text = client.audio.transcriptions.create(model="whisper-1", file=("jfk.flac", audio)).text
            assert "ask not what your country can do for you" in normalize_english(text)
        finally:
            _stop(proc)
