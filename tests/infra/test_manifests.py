"""infra/: the Kubernetes manifests, the compose stack and the images, checked without a cluster or an engine.

Every manifest validates against the Kubernetes API schemas of a pinned version in strict mode
(kubernetes-validate ships them; strict refuses unknown fields, so a typo'd key fails), and the
multi-node training Job is checked for what makes it work: an Indexed Job whose torchrun flags
(parsed by torchrun's own argument parser) agree with the Job, the headless Service and the worker the
pretrain stage launches; checkpoints on a shared claim. No manifest or compose file holds a credential.
The docker client here has no compose plugin and there is no engine, so `docker compose config` cannot
run: the compose file is parsed and its structure checked.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
K8S_VERSION = "1.33.0"  # a release clusters run today (podFailurePolicy is GA since 1.31)
JOB = "pretrain"  # the training Job in train-job.yaml

# env names whose values are credentials (or URLs that carry one)
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|API_KEY|CONNECTION_URL|STORE_URI|DATABASE_URI")
# a URL with a password in it: scheme://user:password@host
USERINFO = re.compile(r"[a-z0-9+.-]+://([^/\s:@'\"]+):([^@\s'\"]+)@", re.IGNORECASE)
# how a value may stand in for a credential: a $(VAR) of Kubernetes, a $VAR/${VAR}/$$VAR of a shell or
# compose, a printf %s
REFERENCE = re.compile(r"^(\$\$?\{?\w+\}?|\$\(\w+\)|%s)$")


# -- loading ------------------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_docs(path)]


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in all_resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {K8S}, found {len(found)}"
    return found[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(resource name, pod spec) of every workload."""
    specs = []
    for r in all_resources():
        if r["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            specs.append((f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"]))
    return specs


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in containers(spec) if c["name"] == name]
    return found


def strings(node: Any) -> list[str]:
    """Every string in a parsed YAML tree (keys and values)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


def env_file_values(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def literal_passwords(texts: list[str]) -> list[str]:
    """URLs in `texts` whose password is written out instead of referenced."""
    return [m.group(0) for text in texts for m in USERINFO.finditer(text) if not REFERENCE.match(m.group(2))]


def git_ignored(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


# -- every manifest is a valid Kubernetes object -------------------------------------------------------

@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path):
    import kubernetes_validate

    for doc in load_docs(path):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            # pytrace off: jsonschema's own text would print the whole schema
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata'].get('name')}: {exc.message[:300]} "
                        f"at {'.'.join(map(str, exc.path))} (Kubernetes {K8S_VERSION}, strict)", pytrace=False)


def test_kustomization_lists_every_manifest_and_generates_the_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    [generator] = kustomization["secretGenerator"]
    assert generator["name"] == "llmpipe-secrets"
    [env_file] = generator["envs"]
    assert git_ignored(K8S / env_file), f"{env_file} holds the real credentials: it must be git-ignored"
    # every key a manifest reads from the Secret is one the example names
    example = env_file_values(K8S / f"{env_file}.example")
    refs = strings_of_refs("secretKeyRef")
    assert {ref["name"] for ref in refs} == {generator["name"]}
    used = {ref["key"] for ref in refs}
    assert used <= set(example), f"keys read but not in {env_file}.example: {sorted(used - set(example))}"


def strings_of_refs(kind: str) -> list[dict[str, Any]]:
    """Every valueFrom.<kind> (secretKeyRef, configMapKeyRef) of every container."""
    refs = []
    for _, spec in pod_specs():
        for c in containers(spec):
            refs += [e["valueFrom"][kind] for e in c.get("env", []) if kind in e.get("valueFrom", {})]
    return refs


def test_config_map_references_exist():
    config_maps = {r["metadata"]["name"]: r.get("data", {}) for r in all_resources() if r["kind"] == "ConfigMap"}
    for ref in strings_of_refs("configMapKeyRef"):
        assert ref["key"] in config_maps.get(ref["name"], {}), f"configMapKeyRef {ref} names no ConfigMap key"
    for owner, spec in pod_specs():
        for c in containers(spec):
            for source in c.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                assert name is None or name in config_maps, f"{owner}: envFrom names no ConfigMap {name!r}"


# -- the multi-node training Job ------------------------------------------------------------------------

def train_job() -> dict[str, Any]:
    return resource("Job", JOB)


def torchrun(job: dict[str, Any]) -> dict[str, Any]:
    [main] = [c for c in job["spec"]["template"]["spec"]["containers"] if c["command"][:1] == ["torchrun"]]
    return main


def torchrun_args(main: dict[str, Any]):
    """torchrun's own parser on the container's args, the completion index set to a sample value."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.allow_abbrev = False  # a manifest spells torchrun's flags out: --nnode=2 is a typo here
    parser.exit_on_error = False
    try:
        return parser.parse_args([a.replace("$(JOB_COMPLETION_INDEX)", "1") for a in main["args"]])
    except (argparse.ArgumentError, SystemExit) as exc:  # SystemExit: argparse's unknown-flag path
        pytest.fail(f"torchrun refuses the training Job's args {main['args']}: {exc}")


def pretrain_worker_call() -> tuple[str, str]:
    """(module, config file) the pretrain stage's torchrun starts: from llmpipe/train/pretrain.py and dvc.yaml."""
    tree = ast.parse((ROOT / "llmpipe/train/pretrain.py").read_text())
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    [model_out] = [next(iter(o)) if isinstance(o, dict) else o
                   for o in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]["outs"]]
    return constants["WORKER"], f"{model_out}/{constants['RESOLVED_CONFIG']}"


def test_training_job_is_an_indexed_job_of_gpu_nodes():
    job = train_job()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] >= 2, "every node's pod runs at once, or the rendezvous waits"
    main = torchrun(job)
    gpus = main["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1
    assert torchrun_args(main).nproc_per_node == str(gpus), "one rank per GPU the pod is given"


def test_torchrun_flags_agree_with_the_job_and_the_headless_service():
    job = train_job()
    main = torchrun(job)
    args = torchrun_args(main)
    assert args.nnodes == str(job["spec"]["completions"]), "--nnodes must equal the Job's completions"
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in main["args"], "each pod's node rank is its completion index"
    # the node rank decides who is rank 0 only under the static rendezvous (c10d ignores --node-rank)
    if args.rdzv_backend == "static":
        host, port = (args.rdzv_endpoint.rsplit(":", 1) if args.rdzv_endpoint
                      else (args.master_addr, str(args.master_port)))
    else:
        assert args.rdzv_backend == "c10d", f"unexpected rendezvous backend {args.rdzv_backend}"
        host, port = args.rdzv_endpoint.rsplit(":", 1)
    pod_spec = job["spec"]["template"]["spec"]
    service = resource("Service", pod_spec["subdomain"])
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}", \
        "the rendezvous is pod 0 of the Job, by its name under the pods' subdomain"
    assert service["spec"]["clusterIP"] == "None", "only a headless Service gives each pod a DNS name"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_torchrun_starts_the_pretrain_stage_worker():
    module, config = pretrain_worker_call()
    args = torchrun_args(torchrun(train_job()))
    assert args.module and args.training_script == module
    assert args.training_script_args == ["--config", config]


def test_checkpoints_live_on_a_shared_claim():
    job = train_job()
    pod_spec = job["spec"]["template"]["spec"]
    _, config = pretrain_worker_call()
    checkpoints = PurePosixPath(dockerfile_workdir("train")) / PurePosixPath(config).parent / "checkpoints"
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for c in containers(pod_spec):  # resolve-config reads the checkpoints' settings, torchrun writes them
        mounts = [m for m in c.get("volumeMounts", []) if checkpoints.is_relative_to(m["mountPath"])]
        assert mounts, f"{c['name']}: nothing mounted over {checkpoints}: a restarted pod would start over"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        pvc = resource("PersistentVolumeClaim", claim)
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every node's pod mounts it at once"


def test_failed_pods_are_replaced_and_resume():
    job = train_job()
    spec, pod_spec = job["spec"], job["spec"]["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert spec["backoffLimit"] >= spec["completions"], "one failure stops every node's pod"
    ignored = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert any(c["type"] == "DisruptionTarget" for r in ignored for c in r.get("onPodConditions", []))
    assert pod_spec["terminationGracePeriodSeconds"] >= 120, "the ranks save a checkpoint on SIGTERM"


def test_training_pods_have_shared_memory_and_nccl_settings():
    pod_spec = train_job()["spec"]["template"]["spec"]
    main = torchrun(train_job())
    [shm] = [m for m in main["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    volume = next(v for v in pod_spec["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and "NCCL_SOCKET_IFNAME" in env


# -- the Prefect workers ------------------------------------------------------------------------------------

def worker_command(name: str) -> list[str]:
    spec = resource("Deployment", name)["spec"]["template"]["spec"]
    return spec["containers"][0]["command"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_workers_poll_the_pipelines_pools():
    from llmpipe.stages import PipelineConfig

    pools = PipelineConfig().pools
    gpu, cpu = worker_command("prefect-worker-gpu"), worker_command("prefect-worker-cpu")
    assert gpu[:3] == ["prefect", "worker", "start"] and cpu[:3] == ["prefect", "worker", "start"]
    assert (flag(gpu, "--pool"), flag(gpu, "--type")) == (pools["gpu"], "kubernetes")
    assert (flag(cpu, "--pool"), flag(cpu, "--type")) == (pools["cpu"], "process")


def test_gpu_worker_may_create_jobs_and_watch_pods():
    spec = resource("Deployment", "prefect-worker-gpu")["spec"]["template"]["spec"]
    account = spec["serviceAccountName"]
    resource("ServiceAccount", account)
    bindings = [b for b in all_resources() if b["kind"] == "RoleBinding"
                and {"kind": "ServiceAccount", "name": account} in b["subjects"]]
    assert bindings, f"no RoleBinding for the ServiceAccount {account}"
    rules = [rule for b in bindings for rule in resource(b["roleRef"]["kind"], b["roleRef"]["name"])["rules"]]

    def allowed(group: str, kind: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and kind in r["resources"] and verb in r["verbs"] for r in rules)

    assert allowed("batch", "jobs", "create") and allowed("batch", "jobs", "watch")
    assert allowed("", "pods", "list") and allowed("", "pods/log", "get")


# -- no credential in a manifest ----------------------------------------------------------------------------

def test_manifests_take_every_credential_from_the_secret():
    assert not [r for r in all_resources() if r["kind"] == "Secret"], \
        "credentials come from secrets.env through the secretGenerator, not from a committed Secret"
    for owner, spec in pod_specs():
        for c in containers(spec):
            from_secret = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            for e in (e for e in c.get("env", []) if SENSITIVE.search(e["name"])):
                where = f"{owner} {c['name']}: {e['name']}"
                if "valueFrom" in e:
                    assert "secretKeyRef" in e["valueFrom"], f"{where} must come from a secretKeyRef"
                    continue
                # or a value built from them, e.g. postgresql+asyncpg://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@...
                referenced = re.findall(r"\$\((\w+)\)", e["value"])
                assert any(SENSITIVE.search(name) and name in from_secret for name in referenced), \
                    f"{where} is a literal; take it from the Secret (secretKeyRef)"
    for path in manifest_files():
        assert not literal_passwords(strings(load_docs(path))), f"{path.name}: a URL with a literal password"


def test_secret_examples_hold_placeholders_only():
    for example in (K8S / "secrets.env.example", INFRA / "compose.env.example"):
        for key, value in env_file_values(example).items():
            if SENSITIVE.search(key):
                secret = value.split(":", 1)[1] if key.endswith("AUTH_STRING") else value
                assert re.fullmatch(r"<[^>]+>", secret), f"{example.name}: {key} must be a <placeholder>"


# -- the compose stack ---------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_stack():
    services = compose()["services"]
    assert {"postgres", "seaweedfs", "mlflow", "prefect-server", "worker-cpu"} <= set(services)
    mlflow = " ".join(strings(services["mlflow"]["command"]))
    assert "--app-name basic-auth" in mlflow and "postgresql+psycopg2://" in mlflow and "s3://" in mlflow
    prefect = " ".join(strings(services["prefect-server"]["command"]))
    assert "PREFECT_SERVER_API_AUTH_STRING" in prefect and "postgresql+asyncpg://" in prefect
    weed = " ".join(strings(services["seaweedfs"]["command"]))
    assert "-s3.config=" in weed and "-volume.max=100" in weed and "-master.telemetry=false" in weed
    from llmpipe.stages import PipelineConfig

    worker = services["worker-cpu"]["command"]
    assert (flag(worker, "--pool"), flag(worker, "--type")) == (PipelineConfig().pools["cpu"], "process")


def published_host_ip(port: Any) -> str:
    """The address a compose port is published on ('' = every interface)."""
    if isinstance(port, dict):
        return port.get("host_ip", "")
    parts = str(port).split("/")[0].rsplit(":", 2)
    return parts[0] if len(parts) == 3 else ""


def test_compose_publishes_ports_on_loopback_only():
    for name, service in compose()["services"].items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes every port"
        for port in service.get("ports", []):
            assert published_host_ip(port) == "127.0.0.1", f"{name}: port {port!r} is not bound to 127.0.0.1"


def test_compose_takes_every_credential_from_the_env_file():
    doc = compose()
    example = env_file_values(INFRA / "compose.env.example")
    for name, service in doc["services"].items():
        assert service.get("env_file") == ["compose.env"], f"{name}: the credentials come from compose.env"
        environment = service.get("environment", {})
        pairs = environment.items() if isinstance(environment, dict) else (e.split("=", 1) for e in environment)
        literal = [key for key, _ in pairs if SENSITIVE.search(key)]
        assert not literal, f"{name}: {literal} set in docker-compose.yml; put them in compose.env"
        # what a command reads from the environment is a key compose.env has
        for var in re.findall(r"\$\$\{?(\w+)", " ".join(strings(service))):
            if SENSITIVE.search(var) or var.startswith(("POSTGRES_", "MLFLOW_TRACKING_")):
                assert var in example, f"{name}: ${var} is not a key of compose.env.example"
    assert not literal_passwords(strings(doc)), "docker-compose.yml: a URL with a literal password"
    assert git_ignored(INFRA / "compose.env"), "compose.env holds the real credentials: it must be git-ignored"


# -- the images -------------------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> its (instruction, arguments), line continuations joined; the first key is the FROM line."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            current = [("FROM", rest)]
            stages[rest.split(" AS ")[-1].strip() if " AS " in rest else rest] = current
        elif stages:
            current.append((instruction.upper(), rest))
    return stages


def dockerfile_arg(name: str) -> str:
    [value] = re.findall(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    return value


def dockerfile_workdir(stage: str) -> str:
    return [rest for instruction, rest in dockerfile_stages()[stage] if instruction == "WORKDIR"][-1]


def test_every_image_runs_as_a_user():
    for stage, instructions in dockerfile_stages().items():
        users = [rest for instruction, rest in instructions if instruction == "USER"]
        assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:")), \
            f"stage {stage} runs as root"


def test_training_image_has_cuda_torch_and_flash_attn():
    stages = dockerfile_stages()
    name, instructions = list(stages.items())[-1]  # the default target
    assert name == "train"
    base = instructions[0][1].split(" AS ")[0].replace("${CUDA_IMAGE}", dockerfile_arg("CUDA_IMAGE"))
    assert re.search(r"nvidia/cuda:.*devel|pytorch/pytorch:.*cuda.*devel", base), f"{base}: no CUDA toolkit"
    runs = [rest for instruction, rest in instructions if instruction == "RUN"]
    script = "\n".join(runs)
    flash = re.search(r"pip install --no-build-isolation \"?flash-attn", script)
    torch = re.search(r"pip install torch\b", script)
    assert flash and torch and torch.start() < flash.start(), "flash-attn builds against the installed CUDA torch"
    install = next(r for r in runs if "scripts/install.sh" in r)
    assert "LLMPIPE_TORCH=torch " in install, "the CUDA build of torch, not install.sh's CPU pin"
    assert "gpu" in re.search(r"LLMPIPE_EXTRAS=(\S+)", install).group(1).split(",")


THIRD_PARTY_IMAGES = ("postgres:", "chrislusf/seaweedfs:")  # used as published


def test_images_the_manifests_and_compose_use_are_built_here():
    stages = set(dockerfile_stages())
    services = compose()["services"]
    images = {c["image"] for _, spec in pod_specs() for c in containers(spec)} | \
        {s["image"] for s in services.values()}
    ours = {image for image in images if not image.startswith(THIRD_PARTY_IMAGES)}
    assert ours and {re.fullmatch(r"llmpipe-(\w+):[\w.-]+", image).group(1) for image in ours} <= stages, \
        f"images {sorted(ours)}: each must be llmpipe-<a stage of infra/Dockerfile>"
    for name, service in services.items():
        if "build" in service:
            assert service["image"].split(":")[0] == f"llmpipe-{service['build']['target']}", name
    assert dockerfile_workdir("train") == dockerfile_workdir("cpu")


def test_gpu_pool_runs_the_training_image():
    pool = json.loads((INFRA / "pools" / "kubernetes.json").read_text())
    assert pool["variables"]["properties"]["image"]["default"] == torchrun(train_job())["image"]


def test_images_leave_out_data_and_credentials():
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for entry in (".venv", "data", "models", "infra/compose.env", "infra/k8s/secrets.env"):
        assert entry in ignored, f"{entry} would be copied into the images"
