"""`vincie k8s render|submit|status|logs|cancel`: a training run as a Kubernetes job.

render: `kubectl kustomize` builds the tree in k8s/ (base: JobSet, overlays/pytorchjob: PyTorchJob; k8s/monitoring
with --monitoring), then the run's values are filled in here, explicitly: names and labels (run.name, the Kueue
queue), namespace, nodes x GPUs per node (k8s.*), image, resources, torchrun's c10d rendezvous, the pods' grace
period for a checkpoint at SIGTERM, the resolved config as a ConfigMap (run.out_dir on the checkpoint volume,
metrics endpoint on), S3 credentials as Secret references. A config whose training data a pod cannot read (a
path on this machine) is refused. The result is checked for secret values before it is printed: none may appear
in a manifest.
submit/status/logs/cancel: the official `kubernetes` client with the current kubeconfig context.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from vincie import storage
from vincie.config import Config, check_world, to_yaml
from vincie.errors import ConfigError, VincieError

BASE_NAME = "vincie"  # the name every object of the kustomize tree carries before render renames it
RUN_LABEL = "vincie.ai/run"
CHECKPOINT_MOUNT = "/checkpoints"
CONFIG_PATH = "/etc/vincie/config.yaml"
RENDEZVOUS_PORT = 29500
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SHUTDOWN_MARGIN_S = 10  # torchrun stops waiting for its workers this long before the pod's grace period ends
DEFAULT_METRICS_PORT = 9400
# kind -> (API group, version, plural, directory of the kustomize tree)
KINDS = {"jobset": ("jobset.x-k8s.io", "v1alpha2", "jobsets", "base"),
         "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs", "overlays/pytorchjob")}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|API_KEY", re.IGNORECASE)


def tree() -> Path:
    root = Path(__file__).resolve().parents[2] / "k8s"
    if not (root / "base" / "kustomization.yaml").is_file():
        raise VincieError(f"{root}: the kustomize tree is missing (vincie k8s runs from a source checkout)")
    return root


def kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise VincieError("vincie k8s render needs kubectl on PATH (it builds k8s/ with `kubectl kustomize`)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        raise VincieError(f"kubectl kustomize {directory} failed: {result.stderr.strip().splitlines()[-1]}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def job_config(cfg: Config) -> Config:
    """The config the pods run: run.out_dir on the checkpoint volume, the metrics endpoint on."""
    run = dataclasses.replace(cfg.run, out_dir=f"{CHECKPOINT_MOUNT}/{cfg.run.name}")
    metrics = dataclasses.replace(cfg.metrics, port=cfg.metrics.port or DEFAULT_METRICS_PORT)
    return dataclasses.replace(cfg, run=run, metrics=metrics)


def torchrun_args(cfg: Config, endpoint: str) -> list[str]:
    k = cfg.k8s
    return [f"--nnodes={k.nodes}", f"--nproc-per-node={k.gpus_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={cfg.run.name}", f"--max-restarts={k.max_restarts}",
            "-m", "vincie", "train", "--no-progress", "--config", CONFIG_PATH]


def rename(value: str, name: str) -> str:
    """`vincie` -> name, `vincie-config` -> name-config."""
    return name + value[len(BASE_NAME):] if value == BASE_NAME or value.startswith(BASE_NAME + "-") else value


def fill_pod(template: dict, cfg: Config, name: str, endpoint: str) -> None:
    """A pod template of the tree -> this run's (the trainer is its first container)."""
    k, port = cfg.k8s, job_config(cfg).metrics.port
    template["metadata"]["labels"][RUN_LABEL] = name
    spec = template["spec"]
    container = spec["containers"][0]
    container["image"] = k.image
    container["args"] = torchrun_args(cfg, endpoint)
    rendezvous = [p for p in container["ports"] if not p["name"].startswith("metrics-")]
    container["ports"] = rendezvous + [{"name": f"metrics-{r}", "containerPort": port + r}
                                       for r in range(k.gpus_per_node)]
    quantities = {"cpu": k.cpu, "memory": k.memory, "nvidia.com/gpu": str(k.gpus_per_node)}
    container["resources"] = {"requests": dict(quantities), "limits": dict(quantities)}
    for env in container["env"]:
        env["valueFrom"]["secretKeyRef"]["name"] = k.s3_secret
    # SIGTERM -> torchrun passes it to the workers, which finish their step and checkpoint (vincie.training.train);
    # torchrun kills them after this many seconds, before the kubelet's SIGKILL at the end of the grace period
    container["env"].append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                             "value": str(k.termination_grace_s - SHUTDOWN_MARGIN_S)})
    spec["terminationGracePeriodSeconds"] = k.termination_grace_s
    for volume in spec["volumes"]:
        if "configMap" in volume:
            volume["configMap"]["name"] = rename(volume["configMap"]["name"], name)
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = k.checkpoint_pvc
        if volume.get("emptyDir", {}).get("medium") == "Memory":
            volume["emptyDir"]["sizeLimit"] = k.shm_size


def fill_job(doc: dict, cfg: Config, name: str) -> None:
    k = cfg.k8s
    if doc["kind"] == "JobSet":
        spec = doc["spec"]
        spec["network"]["subdomain"] = name
        spec["failurePolicy"]["maxRestarts"] = k.max_restarts
        (job,) = spec["replicatedJobs"]
        job["template"]["spec"]["parallelism"] = job["template"]["spec"]["completions"] = k.nodes
        # pod 0 of job 0 of the replicated job hosts the rendezvous: <jobset>-<job>-<job index>-<pod index>.<subdomain>
        fill_pod(job["template"]["spec"]["template"], cfg, name,
                 f"{name}-{job['name']}-0-0.{name}:{RENDEZVOUS_PORT}")
    else:  # PyTorchJob: the operator sets MASTER_ADDR / MASTER_PORT (the Master pod's pytorchjob-port)
        spec = doc["spec"]
        spec["runPolicy"]["backoffLimit"] = k.max_restarts
        replicas = spec["pytorchReplicaSpecs"]
        fill_pod(replicas["Master"]["template"], cfg, name, "$(MASTER_ADDR):$(MASTER_PORT)")
        if k.nodes > 1:
            replicas["Worker"] = copy.deepcopy(replicas["Master"]) | {"replicas": k.nodes - 1}


def render(cfg: Config, monitoring: bool = False) -> list[dict]:
    """The run's manifests (the job, its headless service and config; with `monitoring` the PodMonitor,
    PrometheusRule and dashboard too)."""
    k, name = cfg.k8s, cfg.run.name
    if re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is None or len(name) > 40:
        raise VincieError(f"run.name {name!r} names the Kubernetes objects: it must be a DNS label of at most 40 "
                          "characters (lowercase letters, digits, '-'; pod names add suffixes)")
    check_world(cfg, k.nodes * k.gpus_per_node)
    check_readable_by_pods(cfg)
    docs = kustomize(tree() / KINDS[k.kind][3]) + (kustomize(tree() / "monitoring") if monitoring else [])
    for doc in docs:
        meta = doc["metadata"]
        meta["namespace"] = k.namespace
        if doc["kind"] in ("PodMonitor", "PrometheusRule") or meta["name"] == "vincie-dashboard":
            continue  # shared by every run in the namespace
        meta["name"] = rename(meta["name"], name)
        meta["labels"][RUN_LABEL] = name
        if k.queue and doc["kind"] in ("JobSet", "PyTorchJob"):
            meta["labels"][QUEUE_LABEL] = k.queue
        if doc["kind"] == "ConfigMap":
            doc["data"] = {"config.yaml": to_yaml(job_config(cfg))}
        elif doc["kind"] == "Service":
            doc["spec"]["selector"] = {RUN_LABEL: name}
        else:
            fill_job(doc, cfg, name)
    check_no_secrets(docs)
    return docs


def check_readable_by_pods(cfg: Config) -> None:
    """The training data must be where the job's pods can read it: a remote URL (s3://...) or a path on the run's
    volume. A path on this machine (e.g. the presets' runs/...) exists nowhere in the cluster."""
    url = cfg.data.train_url
    if not (storage.is_remote(url) or url.startswith(CHECKPOINT_MOUNT + "/")):
        raise ConfigError(f"config key 'data.train_url' is {url!r}, a path on this machine that the job's pods "
                          f"cannot read; give an s3:// URL, or a path under {CHECKPOINT_MOUNT}/ (the run's volume, "
                          f"k8s.checkpoint_pvc)")


def check_no_secrets(docs: list[dict]) -> None:
    """No secret in a manifest: environment variables with secret-like names come from Secret references, and no
    value of such a variable in this process's environment appears anywhere in the output."""
    text = yaml.safe_dump_all(docs)
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 4 and value in text:
            raise VincieError(f"the rendered manifests contain the value of ${name}; secrets must come from a "
                              "Secret reference (k8s.s3_secret), never be written into a manifest")
    for doc in docs:
        for env in walk_env(doc):
            if SECRET_NAME.search(env["name"]) and "value" in env:
                raise VincieError(f"{doc['kind']}/{doc['metadata']['name']}: environment variable {env['name']} "
                                  "has a literal value; secrets must come from a Secret reference")


def walk_env(node):
    """Every container env entry anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from walk_env(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_env(item)


class BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config in its ConfigMap) as YAML literal blocks."""


BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_text(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=BlockDumper, sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# The cluster (the current kubeconfig context)


def clients():
    from kubernetes import client, config

    try:  # the client reads $KUBECONFIG once, at import: read it here, at the call
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG", "~/.kube/config"))
    except (config.ConfigException, FileNotFoundError, TypeError) as exc:
        raise VincieError(f"no usable kubeconfig (KUBECONFIG or ~/.kube/config): {exc}") from None
    return client.CoreV1Api(), client.CustomObjectsApi()


def api_call(what: str, call, *args, missing_ok: bool = False, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        if missing_ok and exc.status == 404:
            return None
        raise VincieError(f"kubernetes API: {what}: {exc.status} {exc.reason}") from None
    except HTTPError as exc:
        raise VincieError(f"kubernetes API: {what}: cannot reach the API server ({exc})") from None


def submit(cfg: Config) -> str:
    core, custom = clients()
    group, version, plural, _ = KINDS[cfg.k8s.kind]
    ns = cfg.k8s.namespace
    docs = render(cfg)
    existing = api_call("look up the job", custom.get_namespaced_custom_object, group, version, ns, plural,
                        cfg.run.name, missing_ok=True)
    if existing is not None:
        raise VincieError(f"{plural}/{cfg.run.name} already exists in namespace {ns}; `vincie k8s cancel` it or "
                          "choose another run.name")
    for doc in docs:
        what = f"create {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            api_call(what, core.create_namespaced_config_map, ns, doc)
        elif doc["kind"] == "Service":
            api_call(what, core.create_namespaced_service, ns, doc)
        else:
            api_call(what, custom.create_namespaced_custom_object, group, version, ns, plural, doc)
    return f"{plural}/{cfg.run.name}"


def status(cfg: Config) -> str:
    core, custom = clients()
    group, version, plural, _ = KINDS[cfg.k8s.kind]
    ns, name = cfg.k8s.namespace, cfg.run.name
    job = api_call(f"get {plural}/{name}", custom.get_namespaced_custom_object, group, version, ns, plural, name)
    state = job.get("status") or {}
    conditions = [c for c in state.get("conditions", []) if c.get("status") == "True"]
    phase = conditions[-1]["type"] if conditions else "Pending"
    lines = [f"{plural}/{name} in {ns}: {phase}" + (f" ({conditions[-1].get('message')})"
                                                    if conditions and conditions[-1].get("message") else "")]
    if "restarts" in state:
        lines.append(f"  restarts: {state['restarts']}")
    pods = api_call("list pods", core.list_namespaced_pod, ns, label_selector=f"{RUN_LABEL}={name}").items
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        restarts = sum(c.restart_count for c in (pod.status.container_statuses or []))
        lines.append(f"  pod {pod.metadata.name}: {pod.status.phase}, {restarts} container restarts")
    return "\n".join(lines)


def logs(cfg: Config, pod: str | None, tail: int | None) -> str:
    core, _ = clients()
    ns, name = cfg.k8s.namespace, cfg.run.name
    if pod is None:
        pods = api_call("list pods", core.list_namespaced_pod, ns, label_selector=f"{RUN_LABEL}={name}").items
        if not pods:
            raise VincieError(f"no pods of run {name} in namespace {ns} (yet); see vincie k8s status")
        pod = sorted(p.metadata.name for p in pods)[0]  # node 0: rank 0 prints the run's lines
    return api_call(f"logs of pod {pod}", core.read_namespaced_pod_log, pod, ns, tail_lines=tail)


def cancel(cfg: Config) -> list[str]:
    """Deletes the job (its pods go with it), its service and config -> what was deleted."""
    core, custom = clients()
    group, version, plural, _ = KINDS[cfg.k8s.kind]
    ns, name = cfg.k8s.namespace, cfg.run.name
    deleted = []
    if api_call(f"delete {plural}/{name}", custom.delete_namespaced_custom_object, group, version, ns, plural, name,
                propagation_policy="Foreground", missing_ok=True) is not None:
        deleted.append(f"{plural}/{name}")
    if api_call(f"delete service/{name}", core.delete_namespaced_service, name, ns, missing_ok=True) is not None:
        deleted.append(f"service/{name}")
    config_map = rename("vincie-config", name)
    if api_call(f"delete configmap/{config_map}", core.delete_namespaced_config_map, config_map, ns,
                missing_ok=True) is not None:
        deleted.append(f"configmap/{config_map}")
    if not deleted:
        raise VincieError(f"nothing of run {name} in namespace {ns} to cancel")
    return deleted
