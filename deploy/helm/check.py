"""Renders the pgmux chart with several value sets and checks what comes out (run by
deploy/helm/check, which sets up the tools; see there).

For each value set that must render:
  - Helm's own engine renders it (render.py: Helm v4's Go SDK), after `helm lint --strict`;
  - every manifest is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
    strict: unknown fields are errors) of the oldest and newest versions checked;
  - the objects fit together: selectors, named ports, probes, Secret keys, volumes;
  - the drain: terminationGracePeriodSeconds > preStop + drain_delay + shutdown_timeout,
    minReadySeconds covers it;
  - the budget: each database's max_db_connections is the expected number and, times the
    pods that can run at once, stays within the budget;
  - the pgmux config passes `pgmux check` (the real binary, with the Secret's values in its
    environment and the mounted files on disk), and pgmux runs with it: /health and /ready
    answer 200 without the token, /metrics wants the Secret's token, /ready is not 200
    after SIGTERM.
For each value set that must fail: rendering fails with the expected message.
"""

import argparse
import base64
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

import helm_python as helm
import kubernetes_validate
import yaml

from render import merge

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "pgmux")
# The oldest Kubernetes the chart supports and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


def values_of(layers, extra):
    values = {}
    for layer in layers:
        if isinstance(layer, dict):
            merge(values, layer)
        else:
            with open(os.path.join(CHART, "ci", layer), encoding="utf-8") as f:
                merge(values, helm.values_from_yaml(f.read()) or {})
    for expr in extra:
        merge(values, helm.parse_set_string(expr))
    return values


def render(values):
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values, name="pgmux", namespace="ci", is_install=True)
    docs = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(manifests[path]) if d]
    return manifests, docs


def seconds(duration):
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, f"a duration in whole seconds, got {duration!r}"
    return int(m.group(1))


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    check(len(found) == 1, f"one {kind}, found {len(found)}")
    return found[0] if found else None


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_rendered(name, docs, expect, pgmux, workdir):
    """Cross-checks of one rendered value set; expect: {"pods": N, "budgets": {db: (total, per_pod)}}."""
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                check(doc["kind"] == "ServiceMonitor", f"{name}: no schema for {doc['kind']}")
            except kubernetes_validate.ValidationError as e:
                check(False, f"{name}: {doc['kind']}/{doc['metadata']['name']} is not valid Kubernetes {version}: {e}")

    deploy = one(docs, "Deployment")
    service = one(docs, "Service")
    config_map = one(docs, "ConfigMap")
    pdb = one(docs, "PodDisruptionBudget")
    if not (deploy and service and config_map and pdb):
        return
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    check(matches(deploy["spec"]["selector"]["matchLabels"], labels), f"{name}: Deployment selector")
    check(matches(service["spec"]["selector"], labels), f"{name}: Service selector")
    check(pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"], f"{name}: PDB selector")
    for p in service["spec"]["ports"]:
        check(p["targetPort"] in ports, f"{name}: Service port {p['name']} targets a container port")

    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
    check(probes["livenessProbe"]["path"] == "/health", f"{name}: liveness on /health")
    check(probes["readinessProbe"]["path"] == "/ready", f"{name}: readiness on /ready")
    check(all(p["port"] == "admin" for p in probes.values()), f"{name}: probes on the admin port")

    # Non-root, read-only, no capabilities, seccomp.
    psc, csc = spec["securityContext"], container["securityContext"]
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{name}: non-root")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault")
    check(csc.get("readOnlyRootFilesystem") is True, f"{name}: read-only root filesystem")
    check(csc.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities dropped")
    check(all(k in container["resources"] for k in ("requests", "limits")), f"{name}: resources")

    # The config, as pgmux will read it.
    text = config_map["data"]["pgmux.toml"]
    with open(os.path.join(workdir, f"{name}.toml"), "w", encoding="utf-8") as f:
        f.write(text)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        check(False, f"{name}: pgmux.toml is not TOML: {e}")
        return
    server = config["server"]
    check(server["listen"].endswith(f":{ports['postgres']}"), f"{name}: server.listen on the container port")
    check(config["admin"]["listen"].endswith(f":{ports['admin']}"), f"{name}: admin.listen on the container port")

    # The drain fits in the grace period, and minReadySeconds waits for it.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    check(pre_stop[0] == "sleep", f"{name}: preStop sleeps")
    drain = int(pre_stop[1]) + seconds(server["drain_delay"]) + seconds(server["shutdown_timeout"])
    grace = spec["terminationGracePeriodSeconds"]
    check(grace > drain, f"{name}: terminationGracePeriodSeconds {grace} <= preStop + drain_delay + shutdown_timeout = {drain}")
    check(deploy["spec"].get("minReadySeconds", 0) >= grace, f"{name}: minReadySeconds below the grace period")
    check(expect.get("replicas") == deploy["spec"].get("replicas"), f"{name}: replicas {deploy['spec'].get('replicas')}")

    # The budget.
    strategy = deploy["spec"]["strategy"]["rollingUpdate"]
    pods = expect["pods"]
    most = expect.get("replicas") or expect["max_replicas"]
    check(pods == most + strategy["maxSurge"] + strategy["maxUnavailable"], f"{name}: pods at once")
    budgets = expect["budgets"]
    check(sorted(config["databases"]) == sorted(budgets), f"{name}: databases {sorted(config['databases'])}")
    total = 0
    for db, (db_total, per_pod) in budgets.items():
        got = config["databases"].get(db, {}).get("max_db_connections")
        check(got == per_pod, f"{name}: databases.{db}.max_db_connections = {got}, expected {per_pod}")
        check(got is not None and 1 <= got and got * pods <= db_total, f"{name}: {db}: {got} x {pods} pods > {db_total}")
        total += got or 0
    check(total * pods <= expect["budget"], f"{name}: all databases: {total} x {pods} > {expect['budget']}")
    print(f"  budget: {', '.join(f'{db} {budgets[db][1]}' for db in budgets)} per pod x {pods} pods at once <= {expect['budget']}")

    # Secrets: every ${VAR} of the config is in the environment, every secretKeyRef exists.
    env = {e["name"]: e for e in container.get("env", [])}
    for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
        check(var in env, f"{name}: ${{{var}}} in the config but not in the container's env")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    external = expect.get("external_secrets", {})
    env_values = {}
    for var, e in env.items():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            env_values[var] = e.get("value", "")
            continue
        if ref["name"] in secrets:
            data = secrets[ref["name"]].get("data", {})
            check(ref["key"] in data, f"{name}: Secret {ref['name']} has no key {ref['key']}")
            env_values[var] = base64.b64decode(data.get(ref["key"], "")).decode()
        else:
            check(ref["name"] in external, f"{name}: env {var} reads Secret {ref['name']}, neither rendered nor expected")
            env_values[var] = f"value-of-{ref['key']}"

    # Volumes: each mount has a volume; Secrets the chart makes hold the keys mounted.
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for m in container["volumeMounts"]:
        v = volumes.get(m["name"])
        if not check(v is not None, f"{name}: volume {m['name']}"):
            continue
        if "configMap" in v:
            check(v["configMap"]["name"] == config_map["metadata"]["name"], f"{name}: config volume")
        elif "secret" in v:
            secret = secrets.get(v["secret"]["secretName"])
            keys = [i["key"] for i in v["secret"].get("items", [])] or (list(secret["data"]) if secret else [])
            for key in keys:
                path = next((i["path"] for i in v["secret"].get("items", []) if i["key"] == key), key)
                if secret:
                    check(key in secret["data"], f"{name}: Secret {secret['metadata']['name']} has no {key}")
                    files[f"{m['mountPath']}/{path}"] = base64.b64decode(secret["data"].get(key, ""))
                else:
                    check(v["secret"]["secretName"] in external, f"{name}: unexpected Secret {v['secret']['secretName']}")
                    files[f"{m['mountPath']}/{path}"] = external[v["secret"]["secretName"]][key]

    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    check(len(hpas) == (0 if expect.get("replicas") else 1), f"{name}: HorizontalPodAutoscaler present")
    for hpa in hpas:
        check(hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"], f"{name}: HPA scales the Deployment")
        check(hpa["spec"]["maxReplicas"] == expect["max_replicas"], f"{name}: HPA maxReplicas is what the budget is divided by")

    monitor = [d for d in docs if d["kind"] == "ServiceMonitor"]
    check(bool(monitor) == expect.get("service_monitor", False), f"{name}: ServiceMonitor present")
    for sm in monitor:
        # No CRD schema here: check what the Prometheus operator needs to find the target.
        check(sm["apiVersion"] == "monitoring.coreos.com/v1", f"{name}: ServiceMonitor apiVersion")
        check(matches(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]), f"{name}: ServiceMonitor selects the Service")
        for ep in sm["spec"]["endpoints"]:
            check(ep["port"] in [p["name"] for p in service["spec"]["ports"]], f"{name}: ServiceMonitor port")
            check(ep["path"] == "/metrics", f"{name}: ServiceMonitor path")
            cred = ep["authorization"]["credentials"]
            known = cred["name"] in secrets and cred["key"] in secrets[cred["name"]]["data"]
            check(known or cred["name"] in external, f"{name}: ServiceMonitor token Secret")

    # pgmux itself reads the config: the mounted files under workdir, the env from the Secret.
    run_dir = os.path.join(workdir, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    for path, content in files.items():
        local = run_dir + path
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(content)
    local_text = text.replace('"/etc/pgmux/', f'"{run_dir}/etc/pgmux/')
    local_config = os.path.join(run_dir, "etc/pgmux/config/pgmux.toml")
    os.makedirs(os.path.dirname(local_config), exist_ok=True)
    with open(local_config, "w", encoding="utf-8") as f:
        f.write(local_text)
    result = subprocess.run(
        [pgmux, "check", "--config", local_config],
        env={"PATH": os.environ.get("PATH", ""), **env_values},
        capture_output=True,
        text=True,
    )
    if not check(result.returncode == 0, f"{name}: pgmux check refused the config:\n{result.stderr.strip()}"):
        return

    # And runs with it: the probes' endpoints answer without the token, /metrics wants the
    # Secret's, and after SIGTERM /ready no longer says 200. Loopback ports instead of
    # 0.0.0.0, nothing else changed.
    client_port, admin_port = free_port(), free_port()
    with open(local_config, "w", encoding="utf-8") as f:
        f.write(
            local_text.replace(f'"0.0.0.0:{ports["postgres"]}"', f'"127.0.0.1:{client_port}"').replace(
                f'"0.0.0.0:{ports["admin"]}"', f'"127.0.0.1:{admin_port}"'
            )
        )
    admin = f"http://127.0.0.1:{admin_port}"
    token = env_values["PGMUX_ADMIN_TOKEN"]
    log_path = os.path.join(run_dir, "pgmux.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [pgmux, "--config", local_config],
            env={"PATH": os.environ.get("PATH", ""), **env_values},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while http_status(f"{admin}/health") is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        check(http_status(f"{admin}/health") == 200, f"{name}: GET /health (liveness) did not answer 200; see {log_path}")
        check(http_status(f"{admin}/ready") == 200, f"{name}: GET /ready (readiness) did not answer 200; see {log_path}")
        check(http_status(f"{admin}/metrics") == 401, f"{name}: /metrics answered without the admin token")
        check(http_status(f"{admin}/metrics", token) == 200, f"{name}: /metrics refused the Secret's admin token")
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while http_status(f"{admin}/ready") == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        check(http_status(f"{admin}/ready") != 200, f"{name}: /ready still 200 two seconds after SIGTERM")
    finally:
        proc.kill()
        proc.wait()


def free_port():
    """A port free on loopback now, below the kernel's ephemeral range (as scripts/pg-harness picks)."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def http_status(url, token=None):
    """The status of GET url, or None when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pgmux", required=True, help="the pgmux binary, for `pgmux check`")
    parser.add_argument("--workdir", required=True, help="rendered manifests and configs go here")
    parser.add_argument("--tls-dir", required=True, help="tls.crt, tls.key, ca.crt to put in values")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    pem = {}
    for key in ("tls.crt", "tls.key", "ca.crt"):
        with open(os.path.join(args.tls_dir, key), encoding="utf-8") as f:
            pem[key] = f.read()
    tls_values = {"tls": {"cert": pem["tls.crt"], "key": pem["tls.key"], "ca": pem["ca.crt"]}}

    # name -> (values layers, --set expressions, what must come out)
    render_cases = {
        "default": ([], [], {"replicas": 2, "pods": 3, "budget": 80, "budgets": {"app": (80, 26)}}),
        "replicas-3-budget-90": (
            ["replicas-3-budget-90.yaml"], [], {"replicas": 3, "pods": 4, "budget": 90, "budgets": {"app": (90, 22)}}
        ),
        # maxUnavailable 0 and one surge pod: still 4 at once, the surge pod instead.
        "replicas-3-budget-90-surge": (
            ["replicas-3-budget-90.yaml"],
            ["rollingUpdate.maxSurge=1,rollingUpdate.maxUnavailable=0"],
            {"replicas": 3, "pods": 4, "budget": 90, "budgets": {"app": (90, 22)}},
        ),
        "tls-servicemonitor": (
            ["tls-servicemonitor.yaml", tls_values],
            [],
            {
                "replicas": 2,
                "pods": 3,
                "budget": 80,
                "budgets": {"app": (80, 26)},
                "service_monitor": True,
                "external_secrets": {"pgmux-secrets": {}, "postgres-ca": {"ca.crt": pem["ca.crt"].encode()}},
            },
        ),
        "autoscaling-databases": (
            ["autoscaling-databases.yaml"],
            [],
            {"replicas": None, "max_replicas": 6, "pods": 8, "budget": 200, "budgets": {"app": (184, 23), "reports": (16, 2)}},
        ),
    }
    # name -> (values layers, --set expressions, a part of the error message)
    fail_cases = {
        "budget below the pods": (
            [],
            ["replicaCount=3,connectionBudget=3"],
            'database "app" has a server connection budget of 3, less than the 4 pgmux pods',
        ),
        "a database's share below the pods": (
            ["autoscaling-databases.yaml"],
            ["databases.reports.connectionBudget=7"],
            'database "reports" has a server connection budget of 7, less than the 8 pgmux pods',
        ),
        "databases' budgets above the total": (
            ["autoscaling-databases.yaml"],
            ["databases.app.connectionBudget=190"],
            "add up to 206, more than connectionBudget (200)",
        ),
        "max_db_connections by hand": ([], ["config.pool.max_db_connections=50"], "config.pool.max_db_connections is set by the chart"),
        "a percentage surge": ([], ["rollingUpdate.maxSurge=25%"], "rollingUpdate.maxSurge must be a whole number"),
        "no grace margin": ([], ["drain.graceMarginSeconds=0"], "drain.graceMarginSeconds must be at least 1"),
        "a user without password": ([], ["users.app.mode=session"], "users.app.password is empty"),
        "autoscaling bounds": (["autoscaling-databases.yaml"], ["autoscaling.minReplicas=7"], "autoscaling.minReplicas (7) must be between 1 and maxReplicas (6)"),
        "TLS without a certificate": ([], ["tls.enabled=true"], "tls.enabled needs tls.existingSecret"),
    }

    # The metrics docs/kubernetes.md names (for the autoscaler) are ones pgmux exports; the
    # name prometheus-adapter gives its series is the chart's default metricName.
    root = os.path.dirname(os.path.dirname(HERE))
    with open(os.path.join(root, "docs/kubernetes.md"), encoding="utf-8") as f:
        named = set(re.findall(r"\bpgmux_[a-z_]+", f.read()))
    with open(os.path.join(root, "src/admin/metrics.rs"), encoding="utf-8") as f:
        exported = set(re.findall(r'"(pgmux_[a-z_]+)"', f.read()))
    alias = helm.Chart.load(CHART).values["autoscaling"]["waitingClients"]["metricName"]
    for metric in sorted(named - exported - {alias}):
        check(False, f"docs/kubernetes.md names {metric}, which src/admin/metrics.rs does not export")
    print(f"metrics named in docs/kubernetes.md: {', '.join(sorted(named))}")

    lint = helm.lint(CHART, None, strict=True, namespace="ci")
    for m in lint.get("messages") or []:
        check(m.get("severity", 0) < 2, f"helm lint --strict: {m.get('path')}: {m.get('error')}")
    for e in lint.get("errors") or []:
        check(False, f"helm lint --strict: {e}")
    print(f"helm lint --strict: {len(lint.get('messages') or [])} messages")

    for name, (layers, sets, expect) in render_cases.items():
        print(f"render {name}")
        before = len(failures)
        try:
            manifests, docs = render(values_of(layers, sets))
        except helm.HelmError as e:
            check(False, f"{name}: rendering failed: {e}")
            continue
        with open(os.path.join(args.workdir, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write("".join(f"---\n# Source: {p}\n{t.strip()}\n" for p, t in sorted(manifests.items()) if t.strip()))
        check_rendered(name, docs, expect, args.pgmux, args.workdir)
        kinds = sorted(d["kind"] for d in docs)
        print(f"  {'ok' if len(failures) == before else 'FAILED'}: {', '.join(kinds)}")

    for name, (layers, sets, message) in fail_cases.items():
        try:
            render(values_of(layers, sets))
            check(False, f"must not render: {name}")
        except helm.HelmError as e:
            check(message in str(e), f"{name}: expected {message!r} in the error, got: {e}")
            print(f"refused as it must be, {name}: {str(e).split('pgmux: ', 1)[-1]}")

    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    cases = len(render_cases) + len(fail_cases)
    print(f"helm check: {cases} value sets, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
