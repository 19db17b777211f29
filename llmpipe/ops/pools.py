"""The work pools' base job templates: CPU stages on a process pool, GPU stages on Kubernetes (or Docker).

A base job template is what a worker of the pool's type fills in for each flow run. The process and
Kubernetes templates start from the worker's own default (so a Prefect upgrade keeps their fields);
the GPU variants add one variable, `gpus`, that becomes the container's GPU request. prefect-docker is
not installed with llmpipe, so the Docker template is written out here as data, in the shape its
worker reads (`container_create_kwargs` passes `device_requests` through to the Docker API).

infra/pools/<type>.json are these templates as files, for `prefect work-pool create
--base-job-template`; a test keeps them equal to what this module builds (`write_templates`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

TRAINING_IMAGE = "llmpipe-train:latest"  # infra/Dockerfile (CUDA torch, flash-attn, llmpipe)
POOL_TYPES = ("process", "kubernetes", "docker")

GPUS_VARIABLE = {"title": "GPUs", "type": "integer", "minimum": 0, "default": 1,
                 "description": "NVIDIA GPUs for the stage's container (a node with the NVIDIA device plugin)."}


def process_template() -> dict:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def kubernetes_template() -> dict:
    """prefect-kubernetes' default Job, its container asking for `gpus` NVIDIA GPUs (a limit: Kubernetes
    takes an extended resource's request from its limit), running the training image by default, with
    the environment of infra/k8s's Secret and ConfigMap."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    # A stage logs to MLflow and moves data through the S3 remote: the credentials infra/k8s keeps in
    # its Secret and ConfigMap (optional, so a pool used outside those manifests still starts pods).
    container["envFrom"] = [{"secretRef": {"name": "llmpipe-secrets", "optional": True}},
                            {"configMapRef": {"name": "llmpipe-config", "optional": True}}]
    variables = template["variables"]["properties"]
    variables["gpus"] = dict(GPUS_VARIABLE)
    variables["image"]["default"] = TRAINING_IMAGE
    return template


def docker_template() -> dict:
    """The Docker worker's template (prefect-docker's fields), its container given the GPUs through a
    device request (`docker run --gpus N`; count -1 = all)."""
    fields = ["image", "env", "labels", "name", "command", "networks", "network_mode", "auto_remove",
              "volumes", "stream_output", "mem_limit", "privileged"]
    job = {name: "{{ " + name + " }}" for name in fields}
    job["container_create_kwargs"] = {
        "device_requests": [{"Driver": "nvidia", "Count": "{{ gpus }}", "Capabilities": [["gpu"]]}]}
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    variables = {
        "image": {"title": "Image", "type": "string", "default": TRAINING_IMAGE},
        "env": {"title": "Environment Variables", **string_map},
        "labels": {"title": "Labels", **string_map},
        "name": {"title": "Name", "type": "string"},
        "command": {"title": "Command", "type": "string"},
        "networks": {"title": "Networks", "type": "array", "items": {"type": "string"}, "default": []},
        "network_mode": {"title": "Network Mode", "type": "string"},
        "auto_remove": {"title": "Auto Remove", "type": "boolean", "default": False},
        "volumes": {"title": "Volumes", "type": "array", "items": {"type": "string"}, "default": [],
                    "description": "host:container mounts, e.g. a checkpoint volume"},
        "stream_output": {"title": "Stream Output", "type": "boolean", "default": True},
        "mem_limit": {"title": "Memory Limit", "type": "string"},
        "privileged": {"title": "Privileged", "type": "boolean", "default": False},
        "gpus": {**GPUS_VARIABLE, "minimum": -1},
    }
    return {"job_configuration": job, "variables": {"type": "object", "properties": variables}}


def template(pool_type: str) -> dict:
    builders = {"process": process_template, "kubernetes": kubernetes_template, "docker": docker_template}
    return builders[pool_type]()


def render(pool_type: str) -> str:
    return json.dumps(template(pool_type), indent=2, sort_keys=True) + "\n"


def write_templates(out_dir: Path) -> list[Path]:
    """infra/pools/<type>.json: regenerate them after a Prefect upgrade (`python -m llmpipe.ops.pools`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for pool_type in POOL_TYPES:
        path = out_dir / f"{pool_type}.json"
        path.write_text(render(pool_type))
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_templates(Path(__file__).resolve().parents[2] / "infra" / "pools"):
        print(written)
