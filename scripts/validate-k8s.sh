#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests in deploy/k8s (no cluster, no network).
#
#   DEPLOY_TOOLS=/tmp/kv/bin bash scripts/validate-k8s.sh
#
# DEPLOY_TOOLS is a directory holding kubernetes-validate (with its bundled schemas),
# check-jsonschema and the python they run on (which has PyYAML), e.g. a venv's bin/.
# K8S_DIR (default deploy/k8s) points the checks at another copy of the manifests;
# K8S_VERSION (default 1.37.0) is the Kubernetes version whose schemas apply.
#
# What is checked, one line per file and check:
# - the JSON Schemas in deploy/k8s/schemas against their metaschema;
# - every deploy/k8s/*.yaml parses, with no duplicate keys (PyYAML would keep the last
#   one silently);
# - core kinds with kubernetes-validate --strict. That tool only warns, and exits 0,
#   on a kind it has no schema for (a misspelt apiVersion) and on an empty file, so a
#   file passes only when every document in it is reported as passed;
# - KEDA kinds (which kubernetes-validate cannot know) against deploy/k8s/schemas,
#   one object per file;
# - kustomization.yaml against its schema; each listed file exists, every manifest
#   is listed, and no *.example.yaml template is (applying one would overwrite the
#   real Secret with placeholders);
# - references between the files and to the code: ConfigMap/Secret names and keys,
#   Service and PDB selectors, autoscaler targets, named ports, BIND_ADDR against the
#   container port, the pod hardening every workload must keep, and every environment
#   variable name being one that crates/*/src reads.
# Exits non-zero if anything fails.
set -euo pipefail

: "${DEPLOY_TOOLS:?set DEPLOY_TOOLS to the directory holding kubernetes-validate, check-jsonschema and python (e.g. DEPLOY_TOOLS=/tmp/kv/bin)}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
k8s_dir="$(cd "${K8S_DIR:-$root/deploy/k8s}" && pwd)"
k8s_version="${K8S_VERSION:-1.37.0}"
schemas="$k8s_dir/schemas"

kubernetes_validate="$DEPLOY_TOOLS/kubernetes-validate"
check_jsonschema="$DEPLOY_TOOLS/check-jsonschema"
python="$DEPLOY_TOOLS/python"
for tool in "$kubernetes_validate" "$check_jsonschema" "$python"; do
  if [[ ! -x "$tool" ]]; then
    echo "validate-k8s: $tool not found or not executable (check DEPLOY_TOOLS)" >&2
    exit 2
  fi
done
if ! "$python" -c 'import yaml' 2>/dev/null; then
  echo "validate-k8s: $python has no PyYAML" >&2
  exit 2
fi

helper="$(mktemp)"
trap 'rm -f "$helper"' EXIT
# The YAML-aware parts: classifying files, reading the kustomization, cross-checks.
cat >"$helper" <<'PY'
import os, re, sys, glob
import yaml

class UniqueKeyLoader(yaml.SafeLoader):
    pass

def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)

UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]

def classify(path):
    """Prints: <class> <documents> <kinds, or what is wrong>; class is k8s, keda,
    kustomization or bad."""
    try:
        docs = load(path)
    except yaml.YAMLError as e:
        print("bad 0 YAML: " + " ".join(str(e).split()))
        return
    if not docs:
        print("bad 0 no Kubernetes object in the file")
        return
    if any(not isinstance(d, dict) for d in docs):
        print(f"bad {len(docs)} a document is not a mapping")
        return
    kinds = [str(d.get("kind", "?")) for d in docs]
    groups = {str(d.get("apiVersion", "")).split("/")[0] for d in docs}
    if os.path.basename(path) == "kustomization.yaml":
        cls = "kustomization"
    elif "keda.sh" in groups:
        cls = "keda" if len(docs) == 1 else "bad"
        if cls == "bad":
            kinds = ["KEDA objects must be one per file (check-jsonschema reads one document)"]
    else:
        cls = "k8s"
    print(cls, len(docs), ",".join(kinds))

def resources(path):
    doc = load(path)[0]
    for item in doc.get("resources") or []:
        print(item)

# ---------------------------------------------------------------- cross-checks
def crossref(k8s_dir, crates_dir):
    failures = []
    checked = 0
    objs = []  # (file, doc)
    for path in sorted(glob.glob(os.path.join(k8s_dir, "*.yaml"))):
        if os.path.basename(path) == "kustomization.yaml":
            continue
        for d in load(path):
            objs.append((os.path.basename(path), d))

    def fail(msg):
        failures.append(msg)

    def named(kind):
        return {d["metadata"]["name"]: (f, d) for f, d in objs if d.get("kind") == kind}

    configmaps, secrets = named("ConfigMap"), named("Secret")
    deployments = named("Deployment")
    trigger_auths = named("TriggerAuthentication")

    def secret_keys(name):
        _, s = secrets[name]
        return set((s.get("stringData") or {}).keys()) | set((s.get("data") or {}).keys())

    # Pod templates: Deployments and the CronJob's job template.
    pods = []
    for f, d in objs:
        spec = d.get("spec") or {}
        if d.get("kind") == "Deployment":
            pods.append((f, d["metadata"]["name"], spec["template"]))
        elif d.get("kind") == "CronJob":
            pods.append((f, d["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]))

    # Names the code reads: string literals of SCREAMING_CASE in crates/*/src.
    code_names = set()
    for rs in glob.glob(os.path.join(crates_dir, "*", "src", "**", "*.rs"), recursive=True):
        with open(rs, encoding="utf-8") as f:
            text = f.read()
        code_names.update(re.findall(r'"([A-Z][A-Z0-9_]+)"', text))
        # tracing-subscriber reads RUST_LOG itself; the code names it only here.
        if "from_default_env" in text:
            code_names.add("RUST_LOG")
    if not code_names:
        fail(f"no Rust sources under {crates_dir}: cannot check variable names")

    def check_var(where, name):
        nonlocal checked
        checked += 1
        if code_names and name not in code_names:
            fail(f"{where}: {name} is not a variable the code reads (crates/*/src)")

    for name, (f, cm) in configmaps.items():
        for key in (cm.get("data") or {}):
            check_var(f"{f} ConfigMap {name}", key)

    for f, owner, template in pods:
        where = f"{f} {owner}"
        pod = template.get("spec") or {}
        meta = template.get("metadata") or {}
        ctx = pod.get("securityContext") or {}
        checked += 1
        if ctx.get("runAsNonRoot") is not True:
            fail(f"{where}: pod securityContext.runAsNonRoot must be true")
        if (ctx.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(f"{where}: pod seccompProfile must be RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            fail(f"{where}: automountServiceAccountToken must be false (no pod calls the API)")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod.get("containers") or []:
            cwhere = f"{where}/{c.get('name')}"
            sc = c.get("securityContext") or {}
            checked += 1
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(f"{cwhere}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(f"{cwhere}: readOnlyRootFilesystem must be true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                fail(f"{cwhere}: capabilities must drop ALL")
            if not (c.get("resources") or {}).get("requests") or not (c.get("resources") or {}).get("limits"):
                fail(f"{cwhere}: resources need requests and limits")
            for ef in c.get("envFrom") or []:
                checked += 1
                ref = ef.get("configMapRef") or ef.get("secretRef") or {}
                table = configmaps if "configMapRef" in ef else secrets
                if ref.get("name") not in table:
                    fail(f"{cwhere}: envFrom {ref.get('name')} is not defined in {k8s_dir}")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            for e in c.get("env") or []:
                check_var(cwhere, e["name"])
                src = e.get("valueFrom") or {}
                if "secretKeyRef" in src:
                    ref = src["secretKeyRef"]
                    checked += 1
                    if ref["name"] not in secrets:
                        fail(f"{cwhere}: Secret {ref['name']} has no template (secret.example.yaml)")
                    elif ref["key"] not in secret_keys(ref["name"]):
                        fail(f"{cwhere}: Secret {ref['name']} template has no key {ref['key']}")
                if "configMapKeyRef" in src:
                    ref = src["configMapKeyRef"]
                    checked += 1
                    if ref["name"] not in configmaps or ref["key"] not in (configmaps[ref["name"]][1].get("data") or {}):
                        fail(f"{cwhere}: ConfigMap key {ref['name']}/{ref['key']} not defined")
                if e["name"] == "BIND_ADDR":
                    checked += 1
                    value = str(e.get("value", ""))
                    port = value.rsplit(":", 1)[-1]
                    if value.startswith("127.") or value.startswith("[::1]"):
                        fail(f"{cwhere}: BIND_ADDR {value} is loopback: nothing outside the pod can reach it")
                    if not port.isdigit() or int(port) not in ports.values():
                        fail(f"{cwhere}: BIND_ADDR {value} does not match a containerPort {sorted(ports.values())}")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                http = (c.get(probe) or {}).get("httpGet")
                if http:
                    checked += 1
                    port = http.get("port")
                    if isinstance(port, str) and port not in ports:
                        fail(f"{cwhere}: {probe} port {port!r} is not a named container port")
            annotations = meta.get("annotations") or {}
            if annotations.get("prometheus.io/scrape") == "true":
                checked += 1
                port = annotations.get("prometheus.io/port", "")
                if not port.isdigit() or int(port) not in ports.values():
                    fail(f"{cwhere}: prometheus.io/port {port!r} is not a containerPort")
            sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
            if sleep is not None:
                checked += 1
                if sleep >= grace:
                    fail(f"{cwhere}: preStop sleep {sleep}s leaves nothing of terminationGracePeriodSeconds {grace}")

    def matching_deployments(selector):
        found = []
        for name, (_, dep) in deployments.items():
            labels = (dep["spec"]["template"].get("metadata") or {}).get("labels") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                found.append(name)
        return found

    autoscaled = {}
    for f, d in objs:
        kind, name, spec = d.get("kind"), d["metadata"]["name"], d.get("spec") or {}
        if kind == "Service":
            checked += 1
            targets = matching_deployments(spec.get("selector") or {})
            if len(targets) != 1:
                fail(f"{f} Service {name}: selector matches {targets or 'no Deployment'}, not exactly one")
                continue
            pod = deployments[targets[0]][1]["spec"]["template"]["spec"]
            names = {p.get("name") for c in pod["containers"] for p in c.get("ports") or []}
            for port in spec.get("ports") or []:
                tp = port.get("targetPort")
                if isinstance(tp, str) and tp not in names:
                    fail(f"{f} Service {name}: targetPort {tp!r} is not a port of {targets[0]}")
        elif kind == "PodDisruptionBudget":
            checked += 1
            if not matching_deployments((spec.get("selector") or {}).get("matchLabels") or {}):
                fail(f"{f} PodDisruptionBudget {name}: selector matches no Deployment")
        elif kind == "HorizontalPodAutoscaler":
            checked += 1
            ref = spec.get("scaleTargetRef") or {}
            if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
                fail(f"{f} HPA {name}: target {ref} is not a Deployment here")
            autoscaled.setdefault(ref.get("name"), []).append(f"HPA {name}")
            if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
                fail(f"{f} HPA {name}: minReplicas above maxReplicas")
        elif kind == "ScaledObject":
            checked += 1
            ref = spec.get("scaleTargetRef") or {}
            if ref.get("kind", "Deployment") != "Deployment" or ref.get("name") not in deployments:
                fail(f"{f} ScaledObject {name}: target {ref.get('name')} is not a Deployment here")
            autoscaled.setdefault(ref.get("name"), []).append(f"ScaledObject {name}")
            if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
                fail(f"{f} ScaledObject {name}: minReplicaCount above maxReplicaCount")
            for t in spec.get("triggers") or []:
                auth = (t.get("authenticationRef") or {})
                if auth and auth.get("kind", "TriggerAuthentication") == "TriggerAuthentication":
                    checked += 1
                    if auth.get("name") not in trigger_auths:
                        fail(f"{f} ScaledObject {name}: TriggerAuthentication {auth.get('name')} not defined here")
        elif kind == "TriggerAuthentication":
            for ref in spec.get("secretTargetRef") or []:
                checked += 1
                if ref["name"] not in secrets or ref["key"] not in secret_keys(ref["name"]):
                    fail(f"{f} TriggerAuthentication {name}: Secret key {ref['name']}/{ref['key']} has no template")
    for target, owners in autoscaled.items():
        checked += 1
        if len(owners) > 1:
            fail(f"Deployment {target} has two autoscalers: {', '.join(owners)}")
        if target in deployments and "replicas" in deployments[target][1]["spec"]:
            fail(f"Deployment {target} sets replicas although {owners[0]} owns the count (every apply would reset it)")

    for msg in failures:
        print(f"FAIL {msg}")
    print(f"{'FAIL' if failures else 'ok  '} cross-references and policy: {checked} checks, {len(failures)} failed")
    return 1 if failures else 0

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "classify":
        classify(sys.argv[2])
    elif cmd == "resources":
        resources(sys.argv[2])
    elif cmd == "crossref":
        try:
            sys.exit(crossref(sys.argv[2], sys.argv[3]))
        except (KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
            # A manifest too malformed to follow; the per-file checks above say why.
            print(f"FAIL cross-references and policy: could not be checked ({type(e).__name__}: {e})")
            sys.exit(1)
PY

failures=0
ok() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; failures=$((failures + 1)); }
# Tool output only when something failed, indented under the FAIL line.
show() { sed 's/^/       /' <<<"$1"; }
rel() { printf '%s' "${1#"$root"/}"; }

# ---------------------------------------------------------------- schemas
shopt -s nullglob
schema_files=("$schemas"/*.json)
if ((${#schema_files[@]} == 0)); then
  fail "$(rel "$schemas"): no JSON Schemas"
fi
for schema in "${schema_files[@]}"; do
  if out="$("$check_jsonschema" --check-metaschema "$schema" 2>&1)"; then
    ok "$(rel "$schema"): valid JSON Schema"
  else
    fail "$(rel "$schema"): not a valid JSON Schema"
    show "$out"
  fi
done

# ---------------------------------------------------------------- manifests
manifests=("$k8s_dir"/*.yaml)
if ((${#manifests[@]} == 0)); then
  fail "$(rel "$k8s_dir"): no manifests"
fi
kustomization=""
for file in "${manifests[@]}"; do
  name="$(rel "$file")"
  if ! read -r class docs kinds < <("$python" "$helper" classify "$file"); then
    fail "$name: could not be read"
    continue
  fi
  case "$class" in
    bad)
      fail "$name: $kinds"
      ;;
    kustomization)
      kustomization="$file"
      if out="$("$check_jsonschema" --schemafile "$schemas/kustomization.schema.json" "$file" 2>&1)"; then
        ok "$name: Kustomization (schemas/kustomization.schema.json)"
      else
        fail "$name: does not match schemas/kustomization.schema.json"
        show "$out"
      fi
      ;;
    keda)
      case "$kinds" in
        ScaledObject) schema="keda-scaledobject.schema.json" ;;
        TriggerAuthentication | ClusterTriggerAuthentication) schema="keda-triggerauthentication.schema.json" ;;
        *) schema="" ;;
      esac
      if [[ -z "$schema" ]]; then
        fail "$name: no schema for KEDA kind $kinds"
      elif out="$("$check_jsonschema" --schemafile "$schemas/$schema" "$file" 2>&1)"; then
        ok "$name: $kinds (schemas/$schema)"
      else
        fail "$name: $kinds does not match schemas/$schema"
        show "$out"
      fi
      ;;
    k8s)
      status=0
      out="$("$kubernetes_validate" --strict -k "$k8s_version" "$file" 2>&1)" || status=$?
      passed="$(grep -c ' passed for resource ' <<<"$out" || true)"
      if ((status == 0)) && ((passed == docs)) && ! grep -qE '^(WARN|ERROR)' <<<"$out"; then
        ok "$name: ${kinds//,/, } (kubernetes-validate --strict, $k8s_version)"
      else
        fail "$name: ${kinds//,/, }: $passed of $docs objects passed kubernetes-validate --strict"
        show "$out"
      fi
      ;;
  esac
done

# ---------------------------------------------------------------- kustomization listing
if [[ -z "$kustomization" ]]; then
  fail "$(rel "$k8s_dir")/kustomization.yaml: missing (kubectl apply -k needs it)"
else
  listed=()
  while IFS= read -r item; do listed+=("$item"); done < <("$python" "$helper" resources "$kustomization")
  listing_ok=1
  for item in "${listed[@]}"; do
    if [[ ! -f "$k8s_dir/$item" ]]; then
      fail "kustomization.yaml lists $item, which does not exist"
      listing_ok=0
    elif [[ "$item" == *.example.yaml ]]; then
      fail "kustomization.yaml lists the template $item: every apply would overwrite the real object with placeholders"
      listing_ok=0
    fi
  done
  for file in "${manifests[@]}"; do
    base="$(basename "$file")"
    [[ "$base" == kustomization.yaml || "$base" == *.example.yaml ]] && continue
    found=0
    for item in "${listed[@]}"; do [[ "$item" == "$base" ]] && found=1; done
    if ((found == 0)); then
      fail "kustomization.yaml does not list $base: kubectl apply -k would skip it"
      listing_ok=0
    fi
  done
  ((listing_ok == 1)) && ok "kustomization.yaml: ${#listed[@]} resources, all present, every manifest listed"
fi

# ---------------------------------------------------------------- references and policy
if ! "$python" "$helper" crossref "$k8s_dir" "$root/crates"; then
  failures=$((failures + 1))
fi

if ((failures > 0)); then
  echo "validate-k8s: $failures failure(s)"
  exit 1
fi
echo "validate-k8s: all checks passed"
