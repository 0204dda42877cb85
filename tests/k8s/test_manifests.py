"""Every manifest parses, builds with kustomize and matches the schema of its kind; names and references resolve."""
from __future__ import annotations

import re

import pytest
import yaml

from tests.k8s.kuberay import (BUILDS, CLUSTER_SELECTOR_KEY, CUSTOM, DNS1035, JOBS_OF, K8S, MAX_NAME, ROOT,
                               pod_templates, ray_clusters)

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are meant for (k8s/README.md)


def test_every_yaml_file_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{f} holds no YAML mapping"


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_objects_match_their_schema(built, name):
    objects = built(name)
    assert objects
    for o in objects:
        key = (o["apiVersion"], o["kind"])
        if key in CUSTOM:
            CUSTOM[key].model_validate(o)
        else:  # a core kind: the official OpenAPI schema, strict (unknown fields rejected)
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        if o["kind"] in MAX_NAME:
            n = o["metadata"]["name"]
            assert DNS1035.match(n) and len(n) <= MAX_NAME[o["kind"]], f"{o['kind']} name {n!r} is not valid"


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_pod_templates_match_the_core_schema(built, name):
    for cluster, spec in ray_clusters(built(name)).items():
        for group, template in pod_templates(spec).items():
            obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{cluster}-{group}"},
                   "template": template}
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {cluster} {group} pod template: {'.'.join(map(str, e.path))}: {e.message}")


def test_schema_checks_catch_mistakes():
    from pydantic import ValidationError

    job = yaml.safe_load((K8S / "base/jobs/embed.yaml").read_text())
    job["spec"]["shutdownAfterJobFinshes"] = True  # a typo
    with pytest.raises(ValidationError):
        CUSTOM[("ray.io/v1", "RayJob")].model_validate(job)
    cluster = yaml.safe_load((K8S / "base/raycluster.yaml").read_text())
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9  # above maxReplicas
    with pytest.raises(ValidationError):
        CUSTOM[("ray.io/v1", "RayCluster")].model_validate(cluster)
    template = cluster["spec"]["headGroupSpec"]["template"]
    template["spec"]["containers"][0]["resource"] = {}  # not a container field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": template}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("platform", sorted(JOBS_OF))
def test_references_resolve(built, platform):
    objects, jobs = built(platform), built(JOBS_OF[platform])
    namespaces = {o["metadata"].get("namespace") for o in objects + jobs if o["kind"] != "Namespace"}
    assert len(namespaces) == 1, f"{platform}: objects spread over namespaces {namespaces}"
    clusters = {o["metadata"]["name"] for o in objects if o["kind"] == "RayCluster"}
    for job in (j for j in jobs if j["kind"] == "RayJob" and "clusterSelector" in j["spec"]):
        target = job["spec"]["clusterSelector"][CLUSTER_SELECTOR_KEY]
        assert target in clusters, f"{job['metadata']['name']} selects RayCluster {target!r}; built: {clusters}"
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    readme = (K8S / "README.md").read_text()
    claims = {o["metadata"]["name"] for o in jobs if o["kind"] == "PersistentVolumeClaim"}
    images = set()
    for spec in ray_clusters(objects + jobs).values():
        for template in pod_templates(spec).values():
            for v in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims
            for c in template["spec"]["containers"]:
                images.add(c["image"])
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        assert src["configMapRef"]["name"] in config_maps
                    if "secretRef" in src:  # created by hand (credentials): the deploy guide must say how
                        assert f"secret generic {src['secretRef']['name']}" in readme
    assert len(images) == 1, f"{platform}: Ray pods run different images {images}"
    for o in objects:
        if o["kind"] == "Milvus" and "secretRef" in o["spec"]["dependencies"]["storage"]:
            assert f"secret generic {o['spec']['dependencies']['storage']['secretRef']}" in readme


def test_jobs_are_ordered_and_documented(built):
    jobs = [j for j in built("base/jobs") if j["kind"] == "RayJob"]
    order = {j["metadata"]["labels"]["vitrine.io/job"]: int(j["metadata"]["annotations"]["vitrine.io/order"])
             for j in jobs}
    steps = sorted(v for v in order.values() if v > 0)
    assert steps == list(range(1, len(steps) + 1)), f"steps must be 1..N once each: {order}"
    readme = (K8S / "README.md").read_text()
    positions = [readme.find(f"vitrine.io/job={name}") for name in sorted(order, key=order.get) if order[name]]
    assert -1 not in positions and positions == sorted(positions), "k8s/README.md must list the jobs in order"


def test_local_submit_script_names_a_real_subcommand():
    """cluster/submit-embed.sh (the local launcher) runs `python -m vitrine.cli embed --store .. --artifacts ..`."""
    from vitrine.cli import build_parser

    script = (ROOT / "cluster" / "submit-embed.sh").read_text()
    m = re.search(r"-m (\S+) (\w+) \\\n\s+(--store) \S+ (--artifacts) \S+", script)
    assert m and m.group(1) == "vitrine.cli"
    build_parser().parse_args([m.group(2), "--store", "/s", "--artifacts", "/a"])
