"""The work pools' base job templates: what a GPU stage's container asks for once a worker fills them in."""

from __future__ import annotations

import json

from prefect.utilities.templating import apply_values

from llmpipe.ops.pools import POOL_TYPES, TRAINING_IMAGE, render, template
from tests.helpers import ROOT


def _filled(pool_type: str, **values) -> dict:
    """The job configuration a worker builds: the variables' defaults, overridden by `values`."""
    tmpl = template(pool_type)
    defaults = {k: v["default"] for k, v in tmpl["variables"]["properties"].items() if "default" in v}
    return apply_values(tmpl["job_configuration"], {**defaults, **values})


def test_kubernetes_job_requests_the_gpus_of_the_gpus_variable():
    job = _filled("kubernetes", gpus=2, name="run-1")
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == TRAINING_IMAGE
    assert _filled("kubernetes")["job_manifest"]["spec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == 1  # one GPU unless a deployment asks for more


def test_kubernetes_stage_pods_get_the_environment_infra_k8s_defines():
    import yaml

    container = _filled("kubernetes")["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    k8s = ROOT / "infra" / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    config_maps = {doc["metadata"]["name"] for doc in yaml.safe_load_all((k8s / "config.yaml").read_text())
                   if doc and doc["kind"] == "ConfigMap"}
    assert refs["secretRef"] in {g["name"] for g in kustomization["secretGenerator"]}
    assert kustomization["generatorOptions"]["disableNameSuffixHash"]  # the name outside kustomize stays fixed
    assert refs["configMapRef"] in config_maps


def test_docker_container_gets_a_gpu_device_request():
    job = _filled("docker", gpus=-1)
    assert job["container_create_kwargs"]["device_requests"] == [
        {"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]
    assert job["image"] == TRAINING_IMAGE


def test_process_template_is_prefects_default():
    from prefect.workers.process import ProcessWorker

    assert template("process") == ProcessWorker.get_default_base_job_template()


def test_infra_pool_files_equal_what_pools_builds():
    for pool_type in POOL_TYPES:
        path = ROOT / "infra" / "pools" / f"{pool_type}.json"
        assert path.read_text() == render(pool_type), f"{path} is stale: run `python -m llmpipe.ops.pools`"
        json.loads(path.read_text())
