#!/usr/bin/env python3
"""Checks of the deployment artifacts, run by scripts/validate-deploy.sh.

`manifests`: every Kubernetes object of the rendered overlays and of the
stand-alone files is validated against the Kubernetes OpenAPI schemas of each
given version with kubernetes-validate in strict mode (unknown fields fail);
custom resources (KEDA, Prometheus Operator) go to validate_crds.mjs. Then the
rules across objects that no schema sees, on each rendered overlay: the drain
fits the grace period, probes/resources/security on every container, every
reference (ConfigMap, Secret key, scale target, selector) resolves.

`compose`: the same kind of rules on the output of `docker-compose config`,
which has already validated the file against the Compose schema.

Prints every problem, then exits 1 if there was any.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import functools

import yaml
from kubernetes_validate import utils as kv

# kubernetes-validate reads the (large) shared definitions file again for every
# object; the schemas are never modified, so read each file once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)

CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
ROLES = ("api", "ingester", "worker")
SECRET_NAME = "aegis-webhook-secrets"
# The KEDA trigger's regex: the total backlog of first attempts, both lanes.
FIRST_ATTEMPT_QUEUES = r"^aegis\.deliveries\.(work|bulk)$"
LANE_QUEUES = ("aegis.deliveries.work", "aegis.deliveries.bulk")

problems: list[str] = []


def problem(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def seconds(text: str | int) -> float:
    """`25s`, `1m30s`, `500ms`, `2h` (humantime and Go durations), or an int."""
    if isinstance(text, int):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s", "", str(text)):
        raise ValueError(f"not a duration: {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"


# --- schemas -------------------------------------------------------------


def validate_schemas(sources: list[tuple[str, Path]], versions: list[str], node_dir: Path) -> None:
    crds = []
    for label, path in sources:
        for obj in load(path):
            where = f"{label}: {name_of(obj)}"
            if obj.get("apiVersion", "").startswith(CRD_GROUPS):
                crds.append({"source": label, "object": obj})
                continue
            before = len(problems)
            for version in versions:
                try:
                    kv.validate(obj, version, strict=True)
                except kv.ValidationError as error:
                    path_text = ".".join(str(part) for part in error.path)
                    problem(where, f"Kubernetes {version} schema: {path_text}: {error.message}")
                except kv.SchemaNotFoundError as error:
                    problem(where, f"no schema: {error.message}")
            if len(problems) == before:
                print(f"ok     {where} (Kubernetes {', '.join(versions)} schemas, strict)")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(crds, handle)
        handle.flush()
        result = subprocess.run(["node", str(node_dir / "validate_crds.mjs"), handle.name], text=True, capture_output=True)
    sys.stdout.write(result.stdout)
    for line in result.stdout.splitlines():
        if line.startswith("FAILED"):
            problems.append(line.removeprefix("FAILED "))
    if result.returncode != 0 and "FAILED" not in result.stdout:
        problems.append(f"validate_crds.mjs exited {result.returncode}: {result.stderr.strip()}")


# --- rules across the objects of one overlay -----------------------------


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def check_pod(where: str, pod: dict, config: dict, secret_keys: set[str], long_running: bool) -> None:
    security = pod.get("securityContext", {})
    if security.get("runAsNonRoot") is not True:
        problem(where, "pod securityContext.runAsNonRoot must be true")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(where, "pod seccompProfile must be RuntimeDefault")
    for container in pod.get("containers", []):
        cwhere = f"{where} container {container['name']}"
        csec = container.get("securityContext", {})
        if csec.get("readOnlyRootFilesystem") is not True:
            problem(cwhere, "readOnlyRootFilesystem must be true")
        if csec.get("allowPrivilegeEscalation") is not False:
            problem(cwhere, "allowPrivilegeEscalation must be false")
        if csec.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(cwhere, "capabilities must drop ALL")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problem(cwhere, f"resources.{kind}.{resource} is missing")
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref is not None and ref not in config:
                problem(cwhere, f"envFrom names ConfigMap {ref}, which the overlay does not render")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            if ref.get("name") != SECRET_NAME:
                problem(cwhere, f"{env['name']} reads Secret {ref.get('name')}, not {SECRET_NAME}")
            elif ref.get("key") not in secret_keys:
                problem(cwhere, f"{env['name']} reads key {ref.get('key')}, absent from secret.example.yaml")
        if long_running:
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
                http = container.get(probe, {}).get("httpGet", {})
                if http.get("path") != path:
                    problem(cwhere, f"{probe} must be GET {path}")
                elif http.get("port") not in ("http", 8080):
                    problem(cwhere, f"{probe} must use port 8080 (http)")
            ports = {port.get("name"): port.get("containerPort") for port in container.get("ports", [])}
            if ports.get("http") != 8080:
                problem(cwhere, "must expose containerPort 8080 named http (AEGIS_LISTEN, /metrics)")


def check_overlay(label: str, path: Path, secret_keys: set[str]) -> None:
    objects = load(path)
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    configmaps = by_kind.get("ConfigMap", {})
    deployments = by_kind.get("Deployment", {})
    config: dict[str, str] = {}
    for configmap in configmaps.values():
        config.update(configmap.get("data", {}))

    # The drain: an attempt that starts just before SIGTERM ends within the
    # request timeout, the worker waits AEGIS_SHUTDOWN_GRACE for it, and the pod
    # must outlive that before SIGKILL.
    try:
        request_timeout = seconds(config.get("AEGIS_REQUEST_TIMEOUT", "15s"))
        shutdown_grace = seconds(config.get("AEGIS_SHUTDOWN_GRACE", "25s"))
    except ValueError as error:
        problem(label, str(error))
        request_timeout, shutdown_grace = 15.0, 25.0
    if "AEGIS_SHUTDOWN_GRACE" not in config:
        problem(label, "the ConfigMap must set AEGIS_SHUTDOWN_GRACE explicitly")
    if not request_timeout < shutdown_grace:
        problem(label, f"AEGIS_REQUEST_TIMEOUT ({request_timeout:g}s) must be shorter than AEGIS_SHUTDOWN_GRACE ({shutdown_grace:g}s)")
    if config.get("AEGIS_LISTEN") != "0.0.0.0:8080":
        problem(label, "AEGIS_LISTEN must be 0.0.0.0:8080 (probes, Services and scraping use it)")

    autoscaled = {
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values()
    } | {so["spec"]["scaleTargetRef"]["name"] for so in by_kind.get("ScaledObject", {}).values()}

    for role in ROLES:
        name = f"aegis-webhook-{role}"
        deployment = deployments.get(name)
        where = f"{label}: Deployment/{name}"
        if deployment is None:
            problem(label, f"Deployment {name} is missing")
            continue
        pod = deployment["spec"]["template"]["spec"]
        args = [container.get("args") for container in pod["containers"]]
        if args != [[role]]:
            problem(where, f"its one container must run args [{role!r}], not {args}")
        grace = pod.get("terminationGracePeriodSeconds")
        if grace is None or grace <= shutdown_grace:
            problem(where, f"terminationGracePeriodSeconds ({grace}) must exceed AEGIS_SHUTDOWN_GRACE ({shutdown_grace:g}s)")
        if name in autoscaled and "replicas" in deployment["spec"]:
            problem(where, "sets replicas although an autoscaler owns them (every apply would reset the count)")
        check_pod(where, pod, configmaps, secret_keys, long_running=True)

    jobs = by_kind.get("Job", {})
    job = jobs.get("aegis-webhook-migrate")
    if job is None:
        problem(label, "Job aegis-webhook-migrate is missing")
    else:
        pod = job["spec"]["template"]["spec"]
        if [container.get("args") for container in pod["containers"]] != [["migrate"]]:
            problem(f"{label}: Job/aegis-webhook-migrate", "must run args ['migrate']")
        check_pod(f"{label}: Job/aegis-webhook-migrate", pod, configmaps, secret_keys, long_running=False)

    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind.get(kind, {}).items():
            selector = obj["spec"].get("selector", {})
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            if not any(matches(selector, labels) for labels in pod_labels.values()):
                problem(f"{label}: {kind}/{name}", f"selector {selector} matches no Deployment's pods")
    for role in ROLES:
        if f"aegis-webhook-{role}" not in by_kind.get("PodDisruptionBudget", {}):
            problem(label, f"PodDisruptionBudget aegis-webhook-{role} is missing")

    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    if "aegis-webhook-api" not in {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas.values()}:
        problem(label, "no HorizontalPodAutoscaler scales aegis-webhook-api")
    for name, hpa in hpas.items():
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
            problem(f"{label}: HorizontalPodAutoscaler/{name}", "scales a Deployment the overlay does not render")

    scaled = by_kind.get("ScaledObject", {})
    auths = by_kind.get("TriggerAuthentication", {})
    for name, so in scaled.items():
        where = f"{label}: ScaledObject/{name}"
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problem(where, f"scales {target}, which the overlay does not render")
        if target in {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas.values()}:
            problem(where, f"{target} also has a HorizontalPodAutoscaler; two autoscalers fight")
        if not isinstance(so["spec"].get("minReplicaCount"), int) or so["spec"]["minReplicaCount"] < 1:
            problem(where, "minReplicaCount must be at least 1 (workers run the reconciler)")
        for trigger in so["spec"]["triggers"]:
            metadata = trigger.get("metadata", {})
            if trigger.get("type") != "rabbitmq" or metadata.get("queueName") != FIRST_ATTEMPT_QUEUES:
                problem(where, f"its trigger must be rabbitmq on {FIRST_ATTEMPT_QUEUES}")
            if (metadata.get("useRegex"), metadata.get("operation"), metadata.get("protocol")) != ("true", "sum", "http"):
                problem(where, "its trigger must sum the lanes' queues (useRegex, operation sum, protocol http)")
            lanes = re.compile(FIRST_ATTEMPT_QUEUES)
            if not all(lanes.match(queue) for queue in LANE_QUEUES) or lanes.match("aegis.deliveries.due"):
                problem(where, "its regex must match both lanes of first attempts and nothing else")
            if metadata.get("mode") != "QueueLength":
                problem(where, "its trigger must use mode QueueLength")
            auth = auths.get(trigger.get("authenticationRef", {}).get("name"))
            if auth is None:
                problem(where, "its authenticationRef names no TriggerAuthentication of the overlay")
                continue
            for ref in auth["spec"].get("secretTargetRef", []):
                if ref.get("name") != SECRET_NAME or ref.get("key") not in secret_keys:
                    problem(f"{label}: {name_of(auth)}", f"reads {ref.get('name')}/{ref.get('key')}, not a key of {SECRET_NAME}")
    if "aegis-webhook-worker" not in {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()}:
        problem(label, "no ScaledObject scales aegis-webhook-worker")


def manifests(args: argparse.Namespace) -> None:
    versions = args.k8s_versions.split(",")
    overlays = [tuple(item.split("=", 1)) for item in args.overlay]
    sources = [(label, Path(path)) for label, path in overlays] + [(path, Path(path)) for path in args.file]
    validate_schemas(sources, versions, Path(args.node_dir))
    secret = load(Path(args.secret_example))[0]
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for label, path in overlays:
        check_overlay(label, Path(path), secret_keys)


# --- compose ---------------------------------------------------------------


def compose(args: argparse.Namespace) -> None:
    config = yaml.safe_load(Path(args.config).read_text())
    services = config.get("services", {})
    for name in ("postgres", "rabbitmq", "migrate", *ROLES):
        if name not in services:
            problem("compose", f"service {name} is missing")
    for name in ("postgres", "rabbitmq"):
        if "test" not in services.get(name, {}).get("healthcheck", {}):
            problem(f"compose {name}", "needs a healthcheck (the others wait for it)")
    if services.get("migrate", {}).get("command") != ["migrate"]:
        problem("compose migrate", "must run command ['migrate']")
    if services.get("migrate", {}).get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
        problem("compose migrate", "must wait for postgres to be healthy")
    for role in ROLES:
        service = services.get(role, {})
        where = f"compose {role}"
        if service.get("command") != [role]:
            problem(where, f"must run command [{role!r}]")
        depends = service.get("depends_on", {})
        if depends.get("migrate", {}).get("condition") != "service_completed_successfully":
            problem(where, "must wait for migrate to complete successfully")
        if depends.get("rabbitmq", {}).get("condition") != "service_healthy":
            problem(where, "must wait for rabbitmq to be healthy")
        env = service.get("environment", {})
        try:
            grace = seconds(service.get("stop_grace_period", "10s"))
            drain = seconds(env.get("AEGIS_SHUTDOWN_GRACE", "25s"))
        except ValueError as error:
            problem(where, str(error))
            continue
        if grace <= drain:
            problem(where, f"stop_grace_period ({grace:g}s) must exceed AEGIS_SHUTDOWN_GRACE ({drain:g}s)")
    worker = services.get("worker", {})
    if "container_name" in worker or worker.get("ports"):
        problem("compose worker", "must not have a container_name or a host port: `--scale worker=N` needs neither")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--k8s-versions", required=True, help="comma-separated, e.g. 1.30,1.37")
    m.add_argument("--node-dir", required=True, help="where validate_crds.mjs and its node_modules are")
    m.add_argument("--secret-example", required=True)
    m.add_argument("--overlay", action="append", default=[], help="LABEL=rendered.yaml")
    m.add_argument("--file", action="append", default=[], help="a stand-alone manifest")
    c = sub.add_parser("compose")
    c.add_argument("config", help="output of `docker-compose config`")
    args = parser.parse_args()
    {"manifests": manifests, "compose": compose}[args.command](args)
    for line in problems:
        print(f"FAILED {line}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
