"""The Helm chart (deploy/helm/cdl), validated offline: no cluster is reached.

``helm lint --strict`` and ``helm template`` (helm from scripts/install_helm.sh, always with
``--kube-version 1.33.0``); every rendered object against Kubernetes 1.33's own schemas
(kubernetes-validate, strict: an unknown field fails), KEDA's objects against KEDA v2.20.2's CRDs
(tests/unit/schemas/keda, made strict the same way); compose.yml against the compose spec. Then
the chart against the code and compose: every CDL_* variable is a field of its service's settings
class and its value parses, the variables are compose's, the probes answer on the endpoint the
services serve, each consumer is a StatefulSet with a ScaledObject and a PodDisruptionBudget, the
scalers' ceilings are the topics' partitions (cdl/events.py). Under CI a missing helm fails.
"""

from __future__ import annotations

import copy
import json
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cdl.events import Topics
from cdl.observability import serve_http
from cdl.settings import cdl_home
from tests.deployment import DEPLOY, ROOT, SERVICES, configure, settings_class, unread_variables
from tests.helpers import IN_CI

CHART = DEPLOY / "helm" / "cdl"
CI_VALUES = CHART / "ci" / "ci-values.yaml"
KUBE = "1.33"
KEDA_CRDS = Path(__file__).parent / "schemas" / "keda"
#: the Kafka consumers: StatefulSets scaled by KEDA (the gateway is a Deployment)
CONSUMERS = ("ingest", "trainer", "tuner", "compressor", "monitor")
RELEASE = "ci"
PREFIX = f"{RELEASE}-cdl"


@cache
def _helm() -> str | None:
    found = shutil.which("helm")
    if found is None and (cdl_home() / "bin" / "helm").exists():
        found = str(cdl_home() / "bin" / "helm")
    return found


@pytest.fixture(scope="module")
def helm() -> str:
    found = _helm()
    if found is None:
        why = "helm is not installed (scripts/install_helm.sh, which scripts/setup.sh runs)"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    return found


def _run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args, "--kube-version", f"{KUBE}.0"], capture_output=True, text=True, check=False)


def _template(helm: str, *args: str) -> list[dict[str, Any]]:
    out = _run_helm(helm, "template", RELEASE, str(CHART), "--namespace", "cdl", *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(helm: str) -> list[dict[str, Any]]:
    """The chart as CI renders it (ci/ci-values.yaml: every optional branch on)."""
    return _template(helm, "-f", str(CI_VALUES))


@pytest.fixture(scope="module")
def defaults(helm: str) -> list[dict[str, Any]]:
    """The chart with its defaults and nothing but the two required endpoints."""
    return _template(helm, "--set", "kafka.bootstrap=kafka:9092", "--set", "s3.endpoint=minio:9000")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    return doc


def _objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cdl services' workloads by service name (Triton apart)."""
    found = {}
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment"):
            component = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            if component != "triton":
                found[component] = d
    return found


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _env_names(container: dict[str, Any]) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


# ------------------------------------------------------------------ helm itself


def test_helm_lints_the_chart_strictly(helm: str) -> None:
    out = _run_helm(helm, "lint", "--strict", str(CHART), "-f", str(CI_VALUES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_is_the_pinned_build(helm: str) -> None:
    out = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True)
    pinned = (ROOT / "scripts" / "install_helm.sh").read_text()
    assert f'CDL_HELM_VERSION="${{CDL_HELM_VERSION:-{out.stdout.strip().split("+")[0]}}}"' in pinned


# ------------------------------------------------------------------ schemas


def test_every_rendered_object_is_valid_kubernetes(rendered: list[dict[str, Any]]) -> None:
    """Each object against Kubernetes 1.33's schema, strictly (an unknown field is an error); an
    object of a kind Kubernetes has no schema for fails, KEDA's kinds apart (below)."""
    problems = []
    for doc in rendered:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBE, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: no schema ({exc})")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert problems == []


def _strict(schema: Any) -> Any:
    """An OpenAPI schema that refuses unknown fields: ``additionalProperties: false`` wherever
    ``properties`` are listed and nothing says more may come (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _keda_schemas() -> dict[str, dict[str, Any]]:
    found = {}
    for path in KEDA_CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # (the API server's ObjectMeta)
        found[crd["spec"]["names"]["kind"]] = schema
    return found


def _keda_errors(doc: dict[str, Any]) -> list[str]:
    schema = _keda_schemas().get(doc["kind"])
    if schema is None:
        return [f"{doc['kind']}: no KEDA CRD for it in {KEDA_CRDS}"]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}" for e in validator.iter_errors(doc)
    ]


def test_keda_objects_are_valid_against_kedas_crds(rendered: list[dict[str, Any]]) -> None:
    keda = [d for d in rendered if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    assert {d["apiVersion"] for d in keda} == {"keda.sh/v1alpha1"}
    assert [e for d in keda for e in _keda_errors(d)] == []


def test_the_strict_keda_schema_refuses_an_unknown_field(rendered: list[dict[str, Any]]) -> None:
    scaled = copy.deepcopy(next(iter(_objects(rendered, "ScaledObject").values())))
    scaled["spec"]["maxReplicas"] = 3  # (it is maxReplicaCount)
    scaled["spec"]["triggers"][0]["authenticationRef"]["secret"] = "x"
    errors = _keda_errors(scaled)
    assert len(errors) == 2 and all("Additional properties" in e for e in errors), errors


def test_the_compose_file_is_valid_against_the_compose_spec() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_values_schema_is_self_contained() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    refs = [v for k, v in _walk(schema) if k == "$ref"]
    assert refs and all(r.startswith("#/") for r in refs), [r for r in refs if not r.startswith("#/")]
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ("ingest.replicas=two", "/ingest/replicas"),
        ("trainer.scaling.lagThreshold=10", "/trainer/scaling/lagThreshold"),  # KEDA's values: strings
        ("monitor.scaling.minReplicas=0", "/monitor/scaling/minReplicas"),
        ("gateway.apiKeyHashes[0]=my-plain-key", "/gateway/apiKeyHashes/0"),  # digests, never a key
        ("kafka.securityProtocl=SSL", "securityProtocl"),
    ],
)
def test_a_broken_value_fails_the_schema(helm: str, setting: str, refusal: str) -> None:
    out = _run_helm(helm, "template", RELEASE, str(CHART), "-f", str(CI_VALUES), "--set", setting)
    assert out.returncode != 0 and "schema" in out.stderr and refusal in out.stderr, out.stderr


def test_a_lag_threshold_within_the_transactions_permanent_lag_is_refused(helm: str) -> None:
    """A caught-up transactional consumer still lags by 1 per partition (the commit markers): a
    threshold at or below the partition count would keep a scaler above its minimum for good."""
    out = _run_helm(
        helm, "template", RELEASE, str(CHART), "-f", str(CI_VALUES), "--set-string", "ingest.scaling.lagThreshold=3"
    )
    assert out.returncode != 0 and "must be above the 3 partitions of data.raw" in out.stderr, out.stderr


@pytest.mark.parametrize("missing", ["kafka.bootstrap", "s3.endpoint"])
def test_the_external_endpoints_are_required(helm: str, missing: str) -> None:
    out = _run_helm(helm, "template", RELEASE, str(CHART), "-f", str(CI_VALUES), "--set", f"{missing}=")
    assert out.returncode != 0 and f"{missing} is required" in out.stderr, out.stderr


# ------------------------------------------------------------------ the chart against the code and compose


def test_the_chart_runs_the_services_compose_runs(rendered: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    servers_and_jobs = {"kafka", "minio", "postgres", "triton", "provision", "tls-setup"}
    assert set(_workloads(rendered)) == set(compose["services"]) - servers_and_jobs == set(SERVICES)
    assert f"{PREFIX}-triton" in _objects(rendered, "Deployment")
    assert f"{PREFIX}-provision" in _objects(rendered, "Job")


def _resolved_env(container: dict[str, Any], pod: str) -> dict[str, str]:
    """A container's environment as the kubelet would give it: Secrets' keys as fresh secrets
    (a Kafka username is its service's name, as the provisioning job makes the users), the pod's
    name where the downward API is asked."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            key = e["valueFrom"]["secretKeyRef"]["key"]
            token = secrets.token_urlsafe(24)
            env[e["name"]] = {
                "kafka-username": e["valueFrom"]["secretKeyRef"]["name"].removeprefix("cdl-"),
                "storage-url": f"postgresql+psycopg2://cdl:{token}@postgres.example.svc:5432/optuna",
            }.get(key, token)
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", e
            env[e["name"]] = pod
    return env


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_variable_is_a_setting_and_every_value_parses(
    name: str, rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every CDL_* variable the chart gives a service is a field of its settings class (or a shared
    connection), and the service, so configured, parses them and finds nothing insecure."""
    container = _container(_workloads(rendered)[name])
    cls = settings_class(name)
    assert unread_variables(_env_names(container), cls, f"CDL_{name.upper()}_") == [], name
    pod = f"{PREFIX}-{name}-1"
    configure(monkeypatch, _resolved_env(container, pod), tmp_path)
    settings = cls()
    assert settings.kafka_bootstrap.startswith("kafka-0.") and settings.s3_endpoint == "minio.example.svc:9000"
    assert settings.metrics_host == "0.0.0.0" and settings.metrics_port == 9100
    assert settings.kafka_security().sasl and settings.s3_secure
    values = settings.model_dump()
    if name != "monitor":  # (the monitor's Faust app has no transactional id)
        assert values["instance"] == pod  # its transactional id: <group_id>-<pod name>
    assert settings.security_problems() == [], name


def test_the_provisioning_job_is_configured_as_compose_configures_it(
    rendered: list[dict[str, Any]], compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cdl.kafka.acls import GRANTS
    from cdl.store_access import STORE_GRANTS
    from services.provision.settings import ProvisionSettings

    job = _objects(rendered, "Job")[f"{PREFIX}-provision"]
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"  # before the services, as in compose
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert (
        container["command"] == compose["services"]["provision"]["entrypoint"] == ["python", "-m", "services.provision"]
    )
    assert sorted(_env_names(container)) == sorted(compose["services"]["provision"]["environment"])
    assert unread_variables(_env_names(container), ProvisionSettings, "CDL_PROVISION_") == []
    configure(monkeypatch, _resolved_env(container, "job"), tmp_path)
    settings = ProvisionSettings()
    assert set(settings.user_secrets()) == set(STORE_GRANTS) and set(settings.kafka_passwords()) == set(GRANTS)
    assert settings.kafka_sasl_username == "admin" and settings.kafka_security().sasl


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_gets_the_variables_compose_gives_it(
    name: str, rendered: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    """The same variables, by name (each a settings field), and the pod's name as the instance;
    an extra only where ci-values.yaml asks for one (extraEnv)."""
    names = set(_env_names(_container(_workloads(rendered)[name])))
    expected = set(compose["services"][name]["environment"])
    if name != "monitor":
        expected.add(f"CDL_{name.upper()}_INSTANCE")
    extra = {e["name"] for e in yaml.safe_load(CI_VALUES.read_text()).get(name, {}).get("extraEnv", [])}
    assert names == expected | extra


def test_triton_is_configured_as_compose_configures_it(rendered: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    triton = _objects(rendered, "Deployment")[f"{PREFIX}-triton"]
    container = _container(triton)
    assert {e["name"] for e in container["env"]} == set(compose["services"]["triton"]["environment"])
    assert container["image"].split(":")[0] == compose["services"]["triton"]["image"].split(":")[0]
    args = container["args"]
    assert "--model-repository=s3://https://minio.example.svc:9000/cdl-triton" in args
    assert "--model-control-mode=explicit" in args
    assert 'exec /opt/nvidia/nvidia_entrypoint.sh "$@"' in container["command"][2]  # the image's own, after
    gateway = {e["name"]: e.get("value") for e in _container(_workloads(rendered)["gateway"])["env"]}
    assert json.loads(gateway["CDL_GATEWAY_TRITON_GRPC"]) == [f"{PREFIX}-triton:8001"]
    assert json.loads(gateway["CDL_GATEWAY_TRITON_HTTP"]) == [f"{PREFIX}-triton:8000"]
    ports = {p["port"] for p in _objects(rendered, "Service")[f"{PREFIX}-triton"]["spec"]["ports"]}
    assert {8000, 8001} <= ports


def test_gpus_by_default_one_for_triton_none_for_the_trainer(
    defaults: list[dict[str, Any]], rendered: list[dict[str, Any]]
) -> None:
    def gpus(docs: list[dict[str, Any]], name: str) -> int:
        workloads = {**_objects(docs, "Deployment"), **_objects(docs, "StatefulSet")}
        return int(_container(workloads[f"{PREFIX}-{name}"])["resources"].get("limits", {}).get("nvidia.com/gpu", 0))

    assert gpus(defaults, "triton") == 1 and gpus(defaults, "trainer") == 0
    assert gpus(rendered, "trainer") == 1  # ci-values.yaml asks for one


def test_triton_scales_on_cpu_by_an_hpa_and_on_queue_time_by_choice(
    helm: str, defaults: list[dict[str, Any]], rendered: list[dict[str, Any]]
) -> None:
    """Off by default (the gateway drives a fixed list of Triton servers: values.yaml says why);
    when on, an autoscaling/v2 HPA of the Deployment on CPU, and on queue time where asked."""
    assert _objects(defaults, "HorizontalPodAutoscaler") == {}
    assert _objects(defaults, "Deployment")[f"{PREFIX}-triton"]["spec"]["replicas"] == 1

    def metrics(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        [hpa] = _objects(docs, "HorizontalPodAutoscaler").values()
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{PREFIX}-triton"}
        assert hpa["spec"]["scaleTargetRef"] == target
        assert "replicas" not in _objects(docs, "Deployment")[f"{PREFIX}-triton"]["spec"]  # the HPA's
        return hpa["spec"]["metrics"]  # type: ignore[no-any-return]

    cpu_only = _template(helm, "-f", str(CI_VALUES), "--set", "triton.autoscaling.queueTime.enabled=false")
    [cpu] = metrics(cpu_only)
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    queue = [m for m in metrics(rendered) if m["type"] == "Pods"]
    assert [m["pods"]["metric"]["name"] for m in queue] == ["nv_inference_queue_duration_us"]


def _serving(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_the_probes_ask_the_endpoints_the_service_serves(name: str, rendered: list[dict[str, Any]]) -> None:
    """Liveness on /healthz, readiness on /readyz, on the port the service serves its metrics on
    (CDL_<SERVICE>_METRICS_PORT); a start-up probe that allows minutes. The paths are asked of
    cdl.observability's endpoint, which every service runs."""
    container = _container(_workloads(rendered)[name])
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    for probe in probes.values():
        assert ports[probe["httpGet"]["port"]] == int(env[f"CDL_{name.upper()}_METRICS_PORT"]) == 9100
    assert probes["livenessProbe"]["httpGet"]["path"] == probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    endpoint = serve_http(0)
    try:
        for probe in probes.values():
            assert _serving(endpoint.port, probe["httpGet"]["path"]) == 200, probe
        assert _serving(endpoint.port, "/nothing") == 404
    finally:
        endpoint.close()


@pytest.mark.parametrize("name", CONSUMERS)
def test_each_consumer_is_a_statefulset_scaled_on_its_lag_with_a_disruption_budget(
    name: str, rendered: list[dict[str, Any]]
) -> None:
    sts = _workloads(rendered)[name]
    assert sts["kind"] == "StatefulSet" and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert "replicas" not in sts["spec"]  # KEDA's to set
    assert sts["metadata"]["name"] in {
        t["spec"]["scaleTargetRef"]["name"] for t in _objects(rendered, "ScaledObject").values()
    }
    assert sts["spec"]["serviceName"] in _objects(rendered, "Service")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    budgets = [
        p
        for p in _objects(rendered, "PodDisruptionBudget").values()
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert [p["spec"]["maxUnavailable"] for p in budgets] == [1]
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in _objects(rendered, "HorizontalPodAutoscaler").values()]
    assert sts["metadata"]["name"] not in targets  # KEDA makes its own HPA: never a second
    instance = [e for e in _container(sts)["env"] if e["name"] == f"CDL_{name.upper()}_INSTANCE"]
    if "instance" in settings_class(name).model_fields:
        assert [e["valueFrom"]["fieldRef"]["fieldPath"] for e in instance] == ["metadata.name"]
    else:
        assert instance == []


def test_every_workload_has_a_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    budgets = [p["spec"]["selector"]["matchLabels"] for p in _objects(rendered, "PodDisruptionBudget").values()]
    for d in [*_objects(rendered, "StatefulSet").values(), *_objects(rendered, "Deployment").values()]:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert sum(b.items() <= labels.items() for b in budgets) == 1, d["metadata"]["name"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", CONSUMERS)
def test_each_scaler_reads_its_services_group_and_topic_up_to_the_partition_count(
    name: str, rendered: list[dict[str, Any]]
) -> None:
    scaled = _objects(rendered, "ScaledObject")[f"{PREFIX}-{name}"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": f"{PREFIX}-{name}"}
    [trigger] = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka" and all(isinstance(v, str) for v in meta.values()), meta
    fields = settings_class(name).model_fields
    assert meta["consumerGroup"] == fields["group_id"].default
    assert meta["topic"] in {f.default for n, f in fields.items() if n.endswith("_topic")}
    partitions = Topics.PARTITIONS[meta["topic"]]  # the chart's values follow cdl/events.py
    assert spec["minReplicaCount"] >= 1
    cap = {"monitor": 1}.get(name)  # not replica-safe yet (docs/scaling.md)
    assert spec["maxReplicaCount"] == (cap or max(partitions, spec["minReplicaCount"]))
    assert int(meta["lagThreshold"]) > partitions  # above the transactions' permanent lag
    assert meta["bootstrapServers"] == _resolved_env(_container(_workloads(rendered)[name]), "p")["CDL_KAFKA_BOOTSTRAP"]
    assert (meta["sasl"], meta["tls"], meta["offsetResetPolicy"]) == ("scram_sha512", "enable", "earliest")
    auth = _objects(rendered, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "username": (f"cdl-{name}", "kafka-username"),
        "password": (f"cdl-{name}", "kafka-password"),
        "ca": ("cdl-ca", "ca.pem"),
    }


#: services that run one instance until they are replica-safe (docs/scaling.md)
SINGLE = {"monitor"}


def test_the_job_services_scale_to_at_least_two_and_the_others_run_one(
    rendered: list[dict[str, Any]], helm: str
) -> None:
    minimum = {
        n.removeprefix(f"{PREFIX}-"): s["spec"]["minReplicaCount"]
        for n, s in _objects(rendered, "ScaledObject").items()
    }
    assert minimum == {n: 1 if n in SINGLE else 2 for n in minimum}
    assert _workloads(rendered)["gateway"]["kind"] == "Deployment"
    assert _workloads(rendered)["gateway"]["spec"]["replicas"] == 2
    without = _template(helm, "-f", str(CI_VALUES), "--set", "keda.enabled=false")
    assert not [d for d in without if d["apiVersion"].startswith("keda.sh/")]
    replicas = {n: w["spec"]["replicas"] for n, w in _workloads(without).items()}
    assert replicas == {n: 1 if n in SINGLE else 2 for n in SERVICES}


def test_the_chart_holds_no_secret(rendered: list[dict[str, Any]]) -> None:
    """Secure by default: the chart makes no Secret and writes no credential into a manifest;
    every password, secret key and the tuner's storage URL come from Secrets you create."""
    assert _objects(rendered, "Secret") == {}
    for d in rendered:
        for container in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in container.get("env", []):
                if any(w in e["name"] for w in ("PASSWORD", "SECRET", "STORAGE_URL")):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (d["metadata"]["name"], e["name"])


def test_only_the_provisioning_job_holds_the_admins_credentials(rendered: list[dict[str, Any]]) -> None:
    holders = set()
    for d in rendered:
        for container in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in container.get("env", []):
                if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "cdl-admin":
                    holders.add(d["metadata"]["name"])
    assert holders == {f"{PREFIX}-provision"}


@pytest.mark.parametrize("name", ["ingest", "gateway"])
def test_the_published_endpoints_serve_tls_from_a_secret_only_they_mount(
    name: str, rendered: list[dict[str, Any]]
) -> None:
    workload = _workloads(rendered)[name]
    env = {e["name"]: e.get("value") for e in _container(workload)["env"]}
    prefix = f"CDL_{name.upper()}_"
    assert env[prefix + "TLS_CERT_FILE"] == "/etc/cdl/server/public.crt"
    assert env[prefix + "TLS_KEY_FILE"] == "/etc/cdl/server/private.key"
    mounts = {m["name"]: m["mountPath"] for m in _container(workload)["volumeMounts"]}
    assert mounts["server-tls"] == "/etc/cdl/server"
    holders = [
        d["metadata"]["name"]
        for d in rendered
        for v in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
        if v.get("secret", {}).get("secretName") == f"cdl-{name}-tls"
    ]
    assert holders == [workload["metadata"]["name"]]
    ports = {p["name"] for p in _objects(rendered, "Service")[f"{PREFIX}-{name}"]["spec"]["ports"]}
    assert "grpc" in ports
