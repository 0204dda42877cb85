"""Resource requests fit the node groups of k8s/nodes.yaml, and Ray's demand fits the worker groups at their max."""
from __future__ import annotations

import re

import pytest
import yaml

from tests.k8s.kuberay import BUILDS, JOBS_OF, RayClusterSpec, node_groups, pod_templates, ray_clusters
from tests.k8s.test_jobs import parse_entrypoint

GROUP_LABEL = "vitrine.io/node-group"
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m and m.group(2) in _UNITS, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def requests(template: dict, autoscaler: dict | None = None) -> dict[str, float]:
    """The pod's requests summed over containers (plus KubeRay's autoscaler sidecar on an autoscaling head)."""
    total: dict[str, float] = {}
    resources = [c.get("resources", {}) for c in template["spec"]["containers"]] + ([autoscaler] if autoscaler else [])
    for r in resources:
        for name, value in (r.get("requests") or r.get("limits") or {}).items():
            total[name] = total.get(name, 0.0) + quantity(value)
        for name, value in (r.get("limits") or {}).items():
            assert quantity(value) >= quantity((r.get("requests") or {}).get(name, 0)), f"limit < request: {name}"
    return total


def ray_resources(template: dict) -> tuple[float, float]:
    """Logical (CPU, GPU) Ray gives the node: KubeRay passes the Ray container's limits (or requests) on."""
    r = requests({"spec": {"containers": template["spec"]["containers"][:1]}})
    return r.get("cpu", 0.0), r.get("nvidia.com/gpu", 0.0)


def capacity(spec: RayClusterSpec, at: str) -> tuple[float, float]:
    """(CPUs, GPUs) Ray has with every worker group at minReplicas or maxReplicas; head by its num-cpus."""
    head = spec.headGroupSpec
    cpu = float(head.rayStartParams.get("num-cpus", ray_resources(head.template)[0]))
    gpu = 0.0
    for g in spec.workerGroupSpecs:
        n = g.minReplicas if at == "min" else g.maxReplicas
        c, u = ray_resources(g.template)
        cpu, gpu = cpu + n * float(g.rayStartParams.get("num-cpus", c)), gpu + n * u
    return cpu, gpu


def footprint(objects: list) -> list[tuple[str, str, dict, int, int]]:
    """(where, node group, requests per pod, min pods, max pods) of every pod the objects make."""
    out = []
    for name, spec in ray_clusters(objects).items():
        auto = spec.autoscalerOptions.resources if spec.enableInTreeAutoscaling and spec.autoscalerOptions else None
        auto = auto or ({"requests": {"cpu": "500m", "memory": "512Mi"}} if spec.enableInTreeAutoscaling else None)
        for group, t in pod_templates(spec).items():
            g = next((x for x in spec.workerGroupSpecs if x.groupName == group), None)
            lo, hi = (1, 1) if g is None else (g.minReplicas, g.maxReplicas)
            out.append((f"{name}/{group}", t["spec"].get("nodeSelector", {}).get(GROUP_LABEL),
                        requests(t, auto if g is None else None), lo, hi))
            out[-1][2]["_tolerates"] = {x["key"] for x in t["spec"].get("tolerations", [])}
    for o in objects:
        if o["kind"] == "Milvus" and o["spec"]["mode"] == "standalone":
            c = o["spec"]["components"]
            out.append((f"milvus/{o['metadata']['name']}", c.get("nodeSelector", {}).get(GROUP_LABEL),
                        requests({"spec": {"containers": [{"resources": c.get("resources", {})}]}}), 1, 1))
    return out


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_every_pod_fits_a_node_of_its_group(built, name):
    groups = node_groups(BUILDS[name])
    for where, group, req, _, _ in footprint(built(name)):
        assert group in groups, f"{name}: {where} selects node group {group!r}; declared: {sorted(groups)}"
        node = groups[group]
        for taint in node.get("taints", []):
            assert taint["key"] in req["_tolerates"], f"{name}: {where} does not tolerate {taint['key']}"
        for resource, value in req.items():
            if resource.startswith("_"):
                continue
            offered = quantity(node["allocatable"].get(resource, 0))
            assert value <= offered, f"{name}: {where} asks {resource}={value:g}, a {group} node offers {offered:g}"


@pytest.mark.parametrize("platform", sorted(JOBS_OF))
def test_everything_at_max_scale_fits_the_groups(built, platform):
    groups = node_groups(BUILDS[platform])
    used: dict[str, dict[str, float]] = {g: {} for g in groups}
    for _, group, req, _, hi in footprint(built(platform)):
        for resource, value in req.items():
            if not resource.startswith("_"):
                used[group][resource] = used[group].get(resource, 0.0) + hi * value
    for group, total in used.items():
        for resource, value in total.items():
            offered = groups[group]["nodes"] * quantity(groups[group]["allocatable"][resource])
            assert value <= offered, f"{platform}: {group} group needs {resource}={value:g} of {offered:g}"


@pytest.mark.parametrize("platform", sorted(JOBS_OF))
def test_jobs_demand_fits_their_cluster(built, platform):
    clusters = ray_clusters(built(platform) + built(JOBS_OF[platform]))
    for job in (j for j in built(JOBS_OF[platform]) if j["kind"] == "RayJob"):
        spec = job["spec"]
        target = spec["clusterSelector"]["ray.io/cluster"] if "clusterSelector" in spec else job["metadata"]["name"]
        cpus, gpus = capacity(clusters[target], "max")
        _, args, cfg = parse_entrypoint(spec["entrypoint"])
        workers = getattr(args, "workers", None) or getattr(args, "num_workers", None) or 0
        need_gpu = workers if getattr(args, "use_gpu", None) else 0
        if getattr(args, "gpus_per_encoder", None):
            need_gpu = (args.encoders or 1) * args.gpus_per_encoder
        assert need_gpu <= gpus, f"{platform}: {job['metadata']['name']} needs {need_gpu} GPUs, {target} has {gpus}"
        assert workers <= cpus, f"{platform}: {job['metadata']['name']} needs {workers} CPUs, {target} has {cpus}"


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_serve_replicas_fit_the_service_cluster(built, name):
    objects = built(name)
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    spec = ray_clusters(objects)[service["metadata"]["name"]]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    scaling = [app["args"][d] for d in ("ingress", "retriever", "reranker", "business_filter", "events_sink",
                                        "text_encoder")]
    for at, key in (("min", "min_replicas"), ("max", "max_replicas")):
        demand = sum(s["num_cpus"] * max(s[key], 1 if at == "min" else 0) for s in scaling)
        cpus, gpus = capacity(spec, at)
        assert demand <= cpus, f"{name}: Serve needs {demand:g} CPUs at {at} replicas; the cluster has {cpus:g}"
    min_gpus = capacity(spec, "min")[1]
    if min_gpus:  # the TextEncoder takes a GPU per replica when the cluster has one at deploy time
        assert app["args"]["text_encoder"]["max_replicas"] <= capacity(spec, "max")[1]
