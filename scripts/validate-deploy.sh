#!/usr/bin/env bash
# Validates the deployment artifacts with real tools, offline once the tools are
# installed (CI keeps them under /var/tmp/aegis-tools, keyed by their pins):
#
# - Dockerfile: hadolint.
# - deploy/: every overlay (and the base) rendered by kustomize (kubectl's
#   built-in), every object validated against the Kubernetes 1.30 and 1.37
#   OpenAPI schemas in strict mode (kubernetes-validate), the KEDA and
#   Prometheus Operator resources against their schemas (kubernetes-models)
#   and the alert rules' PromQL parsed with Prometheus' grammar; then the rules
#   across objects (drain vs. grace period, probes, references):
#   scripts/deploy-validation/deploy_checks.py.
# - docker-compose.yml: `docker-compose config` (1.29.2, the Compose schema and
#   parser), and `docker compose config` too where the v2 plugin exists; then
#   the same kind of rules.
# - Each run also feeds the validators broken copies and fails unless they
#   refuse them, so a validator that silently passes everything is caught.
#
# Needs python3 (3.11: docker-compose 1.29 needs distutils), node and npm, and
# kubectl. Exits non-zero, naming every problem, when anything is wrong.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${AEGIS_TOOLS_DIR:-/var/tmp/aegis-tools}
HERE=scripts/deploy-validation
K8S_VERSIONS=1.30,1.37
OVERLAYS=(base overlays/dev overlays/production)

fail() {
  echo "DEPLOY VALIDATION FAILED: $*" >&2
  exit 1
}
need() {
  command -v "$1" >/dev/null 2>&1 || fail "\`$1\` not found: $2"
}
need python3 "install Python 3.11"
need node "install Node.js (20 or later)"
need npm "install npm"
need kubectl "kubectl renders the overlays (kubectl kustomize); it comes with this machine's image"

# --- tools: (re)installed only when their pins change ----------------------
mkdir -p "$TOOLS"
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
fresh() { [ "$(cat "$1/.stamp" 2>/dev/null)" = "$2" ]; }

py=$TOOLS/py
stamp=$(stamp_of "$HERE/requirements.txt")
if ! fresh "$py" "$stamp"; then
  echo "installing the Python validators into $py"
  rm -rf "$py"
  python3 -m venv "$py"
  "$py/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" \
    || fail "pip could not install $HERE/requirements.txt"
  echo "$stamp" >"$py/.stamp"
fi

compose_venv=$TOOLS/compose
stamp=$(stamp_of "$HERE/compose-requirements.txt")
if ! fresh "$compose_venv" "$stamp"; then
  echo "installing docker-compose 1.29.2 into $compose_venv"
  rm -rf "$compose_venv"
  python3 -m venv "$compose_venv"
  pip=("$compose_venv/bin/pip" install --quiet --disable-pip-version-check)
  { "${pip[@]}" wheel==0.45.1 \
      && "${pip[@]}" --no-build-isolation PyYAML==5.4.1 \
      && "${pip[@]}" -r "$HERE/compose-requirements.txt"; } \
    || fail "pip could not install $HERE/compose-requirements.txt (docker-compose 1.29 needs Python <= 3.11)"
  echo "$stamp" >"$compose_venv/.stamp"
fi

node_dir=$TOOLS/node
stamp=$(stamp_of "$HERE/package.json" "$HERE/package-lock.json")
if ! fresh "$node_dir" "$stamp"; then
  echo "installing the custom-resource validators into $node_dir"
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$node_dir/"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) \
    || fail "npm ci could not install $HERE/package.json"
  echo "$stamp" >"$node_dir/.stamp"
fi
# ES modules resolve packages from their own folder: run the script from there.
cp "$HERE/validate_crds.mjs" "$node_dir/"

python=$py/bin/python
docker_compose=$compose_venv/bin/docker-compose
compose_version=$("$docker_compose" version --short)
node_version() { node -p "require('$node_dir/node_modules/$1/package.json').version"; }
echo "tools: $(kubectl version --client 2>/dev/null | tr '\n' ' ')" \
  "| kubernetes-validate $("$python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')" \
  "| $("$py/bin/hadolint" --version) | docker-compose $compose_version | node $(node --version)," \
  "@kubernetes-models/keda $(node_version @kubernetes-models/keda)," \
  "@kubernetes-models/prometheus-operator $(node_version @kubernetes-models/prometheus-operator)," \
  "@prometheus-io/lezer-promql $(node_version @prometheus-io/lezer-promql)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- Dockerfile ----------------------------------------------------------------
echo "-- Dockerfile (hadolint)"
"$py/bin/hadolint" --no-color Dockerfile || fail "hadolint found problems in the Dockerfile"
echo "ok     Dockerfile"

# --- Kubernetes manifests ------------------------------------------------------
echo "-- deploy/ (kustomize, kubernetes-validate, kubernetes-models)"
overlay_args=()
for overlay in "${OVERLAYS[@]}"; do
  rendered=$work/${overlay//\//-}.yaml
  kubectl kustomize "deploy/$overlay" >"$rendered" 2>"$work/kustomize.err" \
    || fail "kustomize could not render deploy/$overlay: $(cat "$work/kustomize.err")"
  overlay_args+=(--overlay "deploy/$overlay=$rendered")
done
file_args=(--file deploy/base/secret.example.yaml)
for file in deploy/alternatives/*.yaml; do
  file_args+=(--file "$file")
done
manifests() {
  local versions=$1
  shift
  "$python" "$HERE/deploy_checks.py" manifests --k8s-versions "$versions" --node-dir "$node_dir" \
    --secret-example deploy/base/secret.example.yaml "$@"
}
manifests "$K8S_VERSIONS" "${overlay_args[@]}" "${file_args[@]}" || fail "the Kubernetes manifests are not valid (see FAILED above)"

# --- docker-compose.yml ----------------------------------------------------------
echo "-- docker-compose.yml (docker-compose config)"
# Interpolation uses the defaults in the file, not whatever this shell holds. The
# observability profile adds a service; the schema covers the whole file anyway.
compose_env=(env -u AEGIS_SECRET_KEY -u AEGIS_INGEST_TOKEN -u AEGIS_BOOTSTRAP_API_KEY -u AEGIS_OTLP_ENDPOINT
  -u AEGIS_ALLOW_PRIVATE_TARGETS -u AEGIS_WORKER_CONCURRENCY -u AEGIS_IMAGE)
compose_config() {
  "${compose_env[@]}" "$docker_compose" --project-directory . --profile observability -f "$1" config
}
compose_config docker-compose.yml >"$work/compose.yaml" 2>"$work/compose.err" \
  || fail "docker-compose config refused docker-compose.yml: $(cat "$work/compose.err")"
checked_by="docker-compose $compose_version"
if docker compose version >/dev/null 2>&1; then
  "${compose_env[@]}" docker compose --profile observability -f docker-compose.yml config --quiet \
    || fail "docker compose config refused docker-compose.yml"
  checked_by="$checked_by and docker compose $(docker compose version --short)"
fi
"$python" "$HERE/deploy_checks.py" compose "$work/compose.yaml" || fail "docker-compose.yml breaks a rule (see FAILED above)"
echo "ok     docker-compose.yml ($checked_by)"

# --- the validators refuse broken input ----------------------------------------
echo "-- canaries: broken copies must be refused, each for its own reason"
refused() {
  local label=$1 reason=$2
  grep -m1 -F "FAILED $label" "$work/canary.out" | grep -qF "$reason" \
    || { cat "$work/canary.out"; fail "canary $label was not refused with \"$reason\""; }
  echo "ok     refused: $label ($reason)"
}
production=$work/overlays-production.yaml
sed 's/livenessProbe:/livenesProbe:/' "$production" >"$work/unknown-field.yaml"
sed 's/minReplicaCount: 2/minReplicaCount: two/' "$production" >"$work/keda-type.yaml"
sed 's/terminationGracePeriodSeconds: 30/terminationGracePeriodSeconds: 20/' "$production" >"$work/short-grace.yaml"
sed 's/sum(increase(aegis_deliveries_dead_lettered_total\[1h\])) > 100/sum(increase(aegis_deliveries_dead_lettered_total[1h]) > 100/' \
  deploy/alternatives/prometheusrule.yaml >"$work/promql.yaml"
if manifests 1.37 --overlay "unknown-field=$work/unknown-field.yaml" --overlay "keda-type=$work/keda-type.yaml" \
  --overlay "short-grace=$work/short-grace.yaml" --file "$work/promql.yaml" >"$work/canary.out" 2>&1; then
  cat "$work/canary.out"
  fail "the manifest validators accepted broken copies"
fi
refused "unknown-field: Deployment/aegis-webhook-api" "Additional properties are not allowed ('livenesProbe'"
refused "keda-type: ScaledObject/aegis-webhook-worker" "minReplicaCount must be integer"
refused "short-grace: Deployment/aegis-webhook-worker" "must exceed AEGIS_SHUTDOWN_GRACE"
refused "$work/promql.yaml: PrometheusRule/aegis-webhook" "AegisDeadLettersHigh: syntax error"

sed 's/^  worker:$/  worker:\n    container_name: aegis-worker/' docker-compose.yml >"$work/named-worker.yml"
compose_config "$work/named-worker.yml" >"$work/named-worker.out" 2>&1 \
  || fail "docker-compose config refused the canary copy of docker-compose.yml: $(cat "$work/named-worker.out")"
"$python" "$HERE/deploy_checks.py" compose "$work/named-worker.out" >"$work/canary.out" 2>&1 \
  && fail "the compose rules accepted a worker with a container_name"
refused "compose worker" "must not have a container_name"
sed 's/condition: service_completed_successfully/condition: service_finished/' docker-compose.yml >"$work/bad-condition.yml"
if compose_config "$work/bad-condition.yml" >"$work/canary.out" 2>&1; then
  fail "docker-compose config accepted an unknown depends_on condition"
fi
grep -q 'condition contains "service_finished", which is an invalid type' "$work/canary.out" \
  || { cat "$work/canary.out"; fail "docker-compose config refused the canary for another reason"; }
echo "ok     refused: compose depends_on condition service_finished (schema)"

echo "deploy manifests valid"
