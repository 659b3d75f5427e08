"""Kubernetes manifests and the `vincie k8s` commands: every rendered manifest validates strictly (built-in kinds
with kubernetes-validate, custom resources against k8s/schemas), carries the run's layout and no secret, the alert
rules pass promtool, and submit/status/logs/cancel drive a stand-in API server.

No real API server can run here (it needs etcd and a control plane), so submit/status/logs/cancel run against a
small HTTP server of this test that speaks the REST paths the official `kubernetes` client calls and plays the
job controller's part (it creates the job's pods). The manifests it receives are compared with `render`'s."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from referencing import Registry, Resource

from vincie.config import load_config
from vincie.errors import VincieError
from vincie.ops import k8s

from conftest import REPO, error_line, run_main

K8S_VERSION = "1.37.0"
CORE = "https://kubernetes.io/api/_definitions.json#/$defs/"
SCHEMAS = Path(REPO) / "k8s" / "schemas"
CRD_FILES = {"JobSet": "jobset.x-k8s.io_jobsets.yaml", "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
             "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
             "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
LAYOUTS = {"1x8": ["k8s.nodes=1", "k8s.gpus_per_node=8"],
           "4x8": ["k8s.nodes=4", "k8s.gpus_per_node=8", "train.batch_size=32"]}


def strict(node):
    """An OpenAPI schema made strict as kubernetes-validate --strict makes its own: objects with properties and
    no additionalProperties reject unknown fields."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node and \
                not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def core_registry() -> Registry:
    """kubernetes-validate's strict Kubernetes 1.37 definitions, for the core types custom resources embed."""
    definitions = kv.schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json",
                                     K8S_VERSION)
    return Resource.from_contents(definitions) @ Registry()


def crd_validator(kind: str) -> jsonschema.Validator:
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[kind]).read_text())
    (version,) = crd["spec"]["versions"]
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/{version['name']}"]}
    schema["properties"]["kind"] = {"enum": [kind]}
    schema["properties"]["metadata"] = {"$ref": CORE + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    return jsonschema.Draft202012Validator(schema, registry=core_registry())


def validate(doc: dict) -> None:
    """Raises unless `doc` is valid: built-in kinds through kubernetes-validate (strict), custom resources
    against their schema, with the embedded pod and job templates checked against the strict core definitions."""
    if doc["kind"] in CRD_FILES:
        crd_validator(doc["kind"]).validate(doc)
    else:
        kv.validate(doc, K8S_VERSION, strict=True)


DATA = "data.train_url=s3://vincie-data/sessions/train"  # where a pod can read it (the presets' paths are local)


def render(*overrides: str, monitoring: bool = True) -> list[dict]:
    return k8s.render(load_config("tiny", [DATA, *overrides]), monitoring=monitoring)


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "JobSet":
        return [job["template"]["spec"]["template"] for job in doc["spec"]["replicatedJobs"]]
    return [replica["template"] for replica in doc["spec"]["pytorchReplicaSpecs"].values()]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["jobset", "pytorchjob"])
def test_rendered_manifests_validate_strictly_and_carry_the_layout(kind, layout, tmp_path):
    docs = render(f"k8s.kind={kind}", "run.name=vincie-test", "k8s.image=registry.example/vincie:1.2",
                  "k8s.queue=team-a", "k8s.termination_grace_s=120", *LAYOUTS[layout])
    kinds = sorted(doc["kind"] for doc in docs)
    job_kind = {"jobset": "JobSet", "pytorchjob": "PyTorchJob"}[kind]
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Service", job_kind, "PodMonitor", "PrometheusRule"])
    for doc in docs:
        validate(doc)
    nodes, gpus = (int(v) for v in layout.split("x"))
    (job,) = [doc for doc in docs if doc["kind"] == job_kind]
    (service,) = [doc for doc in docs if doc["kind"] == "Service"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {k8s.RUN_LABEL: "vincie-test"}
    assert job["metadata"]["labels"][k8s.QUEUE_LABEL] == "team-a"  # Kueue admits the job, not its pods
    templates = pod_templates(job)
    if kind == "jobset":
        (replicated,) = job["spec"]["replicatedJobs"]
        assert replicated["template"]["spec"]["parallelism"] == replicated["template"]["spec"]["completions"] == nodes
        assert job["spec"]["network"]["subdomain"] == service["metadata"]["name"]
        endpoint = f"vincie-test-{replicated['name']}-0-0.vincie-test:29500"  # pod 0's DNS name in the service
    else:
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert sum(r["replicas"] for r in replicas.values()) == nodes and replicas["Master"]["replicas"] == 1
        endpoint = "$(MASTER_ADDR):$(MASTER_PORT)"
    for template in templates:
        assert template["metadata"]["labels"][k8s.RUN_LABEL] == "vincie-test"
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        (container,) = spec["containers"]
        assert container["image"] == "registry.example/vincie:1.2"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)  # a string, as quantities are
        assert all(isinstance(v, str) for part in container["resources"].values() for v in part.values())
        args = container["args"]
        assert container["command"] == ["torchrun"] and f"--nnodes={nodes}" in args
        assert f"--nproc-per-node={gpus}" in args and "--rdzv-backend=c10d" in args
        assert f"--rdzv-endpoint={endpoint}" in args and any(a.startswith("--max-restarts=") for a in args)
        assert sorted(p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics-")) == \
            list(range(9400, 9400 + gpus))
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes[mounts["/checkpoints"]]
        assert spec["terminationGracePeriodSeconds"] == 120  # SIGTERM to SIGKILL: a step and a checkpoint
        env = {e["name"]: e for e in container["env"]}
        assert env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")["value"] == "110"  # torchrun waits for the checkpoint
        secrets = {name: e["valueFrom"]["secretKeyRef"]["name"] for name, e in env.items()}
        assert secrets["AWS_SECRET_ACCESS_KEY"] == secrets["AWS_ACCESS_KEY_ID"] == "vincie-s3"
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vincie-test-config"]
    run_config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert run_config["run"]["out_dir"] == "/checkpoints/vincie-test" and run_config["metrics"]["port"] == 9400
    assert run_config["k8s"]["nodes"] == nodes
    # the same files through the kubernetes-validate command: built-in kinds pass, the custom resources are
    # passed over with a warning (no schema), which is why they are validated above
    path = tmp_path / "manifests.yaml"
    path.write_text(k8s.to_text(docs))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("passed for resource") == 3
    assert all(f"kind {k}" in result.stdout for k in (job_kind, "PodMonitor", "PrometheusRule"))


@pytest.mark.parametrize("preset", ["3b", "7b"])
def test_the_large_presets_render_with_the_layout_vincie_plan_recommends(preset, capsys):
    """k8s/README's flow: `vincie plan` for 4 nodes x 8 GPUs, then `vincie k8s render` with its overrides."""
    result = run_main(capsys, "plan", "--preset", preset, "--gpus", "32", "--gpu", "h100", check=True)
    layout = next(line for line in result.stdout.splitlines() if line.startswith("recommended: ")).split()[1:]
    result = run_main(capsys, "k8s", "render", "--config", preset, "k8s.nodes=4", DATA, *layout, check=True)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        validate(doc)
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    rendered = yaml.safe_load(config_map["data"]["config.yaml"])
    keys = [override.split("=")[0].split(".") for override in layout]  # e.g. parallel.tensor, train.recompute
    assert [f"{section}.{key}={str(rendered[section][key]).lower()}" for section, key in keys] == layout


def test_the_validation_rejects_what_a_cluster_would():
    """Negative controls: an unknown field deep in a pod template, a wrong type in the job's own spec, a GPU count
    given as a bare number where the rule file expects strings, and a bad alert duration fail."""
    docs = {d["kind"]: d for d in render()}
    broken = copy.deepcopy(docs["JobSet"])
    pod_templates(broken)[0]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        validate(broken)
    broken = copy.deepcopy(docs["JobSet"])
    broken["spec"]["failurePolicy"]["maxRestarts"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(docs["PrometheusRule"])
    broken["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(docs["Service"])
    broken["spec"]["clusterIPP"] = "None"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_no_secret_value_is_ever_rendered(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-7f1c")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-key-id-9d2e")
    for kind in ("jobset", "pytorchjob"):
        docs = render(f"k8s.kind={kind}")
        text = k8s.to_text(docs)
        assert "s3cr3t-value-7f1c" not in text and "AKIA-key-id-9d2e" not in text
        assert text.count("secretKeyRef") >= 2
    # a manifest that carries one fails the check render runs before printing
    tampered = copy.deepcopy(docs)
    env = pod_templates([d for d in tampered if d["kind"] == "PyTorchJob"][0])[0]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_SESSION_TOKEN", "value": "plain"})
    with pytest.raises(VincieError, match="AWS_SESSION_TOKEN"):
        k8s.check_no_secrets(tampered)
    tampered[0]["data"]["config.yaml"] += "# s3cr3t-value-7f1c\n"
    with pytest.raises(VincieError, match="AWS_SECRET_ACCESS_KEY"):
        k8s.check_no_secrets(tampered)


def test_render_command_and_bad_input(capsys, tmp_path):
    result = run_main(capsys, "k8s", "render", DATA, "k8s.nodes=2", "train.batch_size=16", check=True)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "JobSet"]
    run_main(capsys, "k8s", "render", "--out", str(tmp_path / "m.yaml"), DATA, check=True)
    assert [d["kind"] for d in yaml.safe_load_all((tmp_path / "m.yaml").read_text())] == \
        ["ConfigMap", "Service", "JobSet"]
    result = run_main(capsys, "k8s", "render", DATA, "k8s.nodes=3")  # 24 processes do not divide batch_size 8
    assert result.returncode == 2 and "train.batch_size" in error_line(result)
    result = run_main(capsys, "k8s", "render", DATA, "run.name=Big_Name")
    assert result.returncode == 2 and "run.name" in error_line(result)
    result = run_main(capsys, "k8s", "render", DATA, "k8s.memory=lots")
    assert result.returncode == 2 and "k8s.memory" in error_line(result)
    for bad, key in (("k8s.queue=Team_A", "k8s.queue"), ("k8s.termination_grace_s=5", "k8s.termination_grace_s")):
        result = run_main(capsys, "k8s", "render", DATA, bad)
        assert result.returncode == 2 and key in error_line(result)
    # training data a pod cannot read: the preset's path on this machine, or an absolute path off the volume
    for url in ("runs/demo/data/train", "/data/train", "file:///data/train"):
        result = run_main(capsys, "k8s", "render", f"data.train_url={url}")
        assert result.returncode == 2 and f"'data.train_url' is '{url}'" in error_line(result)
    assert run_main(capsys, "k8s", "render", "data.train_url=/checkpoints/data/train").returncode == 0


def rule_file(tmp_path) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file."""
    rules = yaml.safe_load((Path(REPO) / "k8s/monitoring/prometheusrule.yaml").read_text())["spec"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def test_promtool_checks_the_alert_rules(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (see .ci/run)"
    result = subprocess.run([promtool, "check", "rules", str(rule_file(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
    alerts = {r["alert"] for r in yaml.safe_load(rule_file(tmp_path).read_text())["groups"][0]["rules"]}
    assert alerts == {"VincieTrainingStalled", "VincieLossNotFinite", "VincieNonFiniteSteps", "VincieLowMFU",
                      "VincieDataSkips", "VincieCheckpointOld"}
    broken = tmp_path / "broken.yaml"
    broken.write_text(rule_file(tmp_path).read_text().replace("increase(vincie_train_steps_total[15m])",
                                                              "increase(vincie_train_steps_total)"))
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True).returncode != 0


# ---------------------------------------------------------------------------------------------------------------
# A stand-in API server


class StandIn(ThreadingHTTPServer):
    """Objects by API path; creating a job also creates its pods (the controller's part), labelled as the pod
    template says. Every request is recorded with its Authorization header."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.objects: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str]] = []


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args):
        pass

    def reply(self, code: int, body, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def missing(self, path: str) -> None:
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                         "message": f"{path} not found", "code": 404})

    def record(self) -> tuple[str, dict]:
        url = urlparse(self.path)
        self.server.requests.append((self.command, url.path, self.headers.get("Authorization", "")))
        return url.path, parse_qs(url.query)

    def do_POST(self):
        path, _ = self.record()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = f"{path}/{body['metadata']['name']}"
        if key in self.server.objects:
            return self.reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "AlreadyExists", "code": 409})
        self.server.objects[key] = body
        if path.startswith("/apis/"):  # a job: its pods, one per node, as the controller would create them
            ns = path.split("/")[5]
            for n, template in enumerate(pod_templates(body)):
                replicas = 1 if body["kind"] == "PyTorchJob" else \
                    body["spec"]["replicatedJobs"][n]["template"]["spec"]["parallelism"]
                for i in range(replicas):
                    name = f"{body['metadata']['name']}-{n}-{i}"
                    self.server.objects[f"/api/v1/namespaces/{ns}/pods/{name}"] = {
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"]},
                        "spec": template["spec"],
                        "status": {"phase": "Running", "containerStatuses": [
                            {"name": "trainer", "restartCount": i, "ready": True, "image": "x", "imageID": "x"}]}}
            body = body | {"status": {"conditions": [], "restarts": 0}}
            self.server.objects[key] = body
        self.reply(201, body)

    def do_GET(self):
        path, query = self.record()
        if path.endswith("/log"):
            pod = path[:-len("/log")]
            if pod not in self.server.objects:
                return self.missing(path)
            lines = [f"{pod.rsplit('/', 1)[1]} line {k}\n" for k in range(10)]
            tail = int(query.get("tailLines", ["0"])[0])
            return self.reply(200, "".join(lines[-tail:] if tail else lines), "text/plain")
        if path.endswith("/pods"):
            selector = query.get("labelSelector", [""])[0]
            key, _, value = selector.partition("=")
            items = [o for k, o in self.server.objects.items() if k.startswith(path + "/")
                     and o["metadata"]["labels"].get(key) == value]
            return self.reply(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
        if path not in self.server.objects:
            return self.missing(path)
        self.reply(200, self.server.objects[path])

    def do_DELETE(self):
        path, _ = self.record()
        if path not in self.server.objects:
            return self.missing(path)
        body = self.server.objects.pop(path)
        if path.startswith("/apis/"):  # foreground deletion takes the pods along
            name = body["metadata"]["name"]
            for key in [k for k, o in self.server.objects.items()
                        if "/pods/" in k and o["metadata"]["labels"].get(k8s.RUN_LABEL) == name]:
                del self.server.objects[key]
        self.reply(200, body)


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    """The stand-in on a free port, and a kubeconfig whose current context points at it (another context points
    at a port where nothing listens, so using the wrong one would fail)."""
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}},
                     {"name": "elsewhere", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "tester", "user": {"token": "test-token-123"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester"}},
                     {"name": "elsewhere", "context": {"cluster": "elsewhere", "user": "tester"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["jobset", "pytorchjob"])
def test_submit_status_logs_cancel_against_a_stand_in_api_server(kind, api_server, capsys):
    args = ["--config", "tiny", f"k8s.kind={kind}", "k8s.namespace=training", "run.name=night-run", "k8s.nodes=2", DATA,
            "train.batch_size=16"]
    result = run_main(capsys, "k8s", "submit", *args, check=True)
    group, version, plural, _ = k8s.KINDS[kind]
    assert f"submitted {plural}/night-run in namespace training" in result.stdout
    rendered = {(d["kind"], d["metadata"]["name"]): d
                for d in k8s.render(load_config("tiny", args[2:]))}
    stored = {(o["kind"], o["metadata"]["name"]): o for k, o in api_server.objects.items() if "/pods/" not in k}
    assert set(stored) == set(rendered)
    for key, doc in rendered.items():
        assert {k: v for k, v in stored[key].items() if k != "status"} == doc, key
    assert f"/apis/{group}/{version}/namespaces/training/{plural}/night-run" in api_server.objects
    api_calls = [r for r in api_server.requests if r[1] != "/version"]  # the client asks for /version unauthenticated
    assert api_calls and all(auth == "Bearer test-token-123" for _, _, auth in api_calls), api_server.requests

    result = run_main(capsys, "k8s", "submit", *args)  # twice: refused, nothing changed
    assert result.returncode == 2 and "already exists" in error_line(result)

    result = run_main(capsys, "k8s", "status", *args, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == f"{plural}/night-run in training: Pending"
    pods = [line for line in lines if line.strip().startswith("pod ")]
    assert len(pods) == 2 and all("Running" in line for line in pods)  # one pod per node

    result = run_main(capsys, "k8s", "logs", *args, "--tail", "3", check=True)
    assert result.stdout.splitlines() == [f"night-run-0-0 line {k}" for k in (7, 8, 9)]

    result = run_main(capsys, "k8s", "cancel", *args, check=True)
    assert result.stdout.strip() == f"k8s: deleted {plural}/night-run, service/night-run, configmap/night-run-config"
    assert api_server.objects == {}
    result = run_main(capsys, "k8s", "status", *args)
    assert result.returncode == 2 and "404" in error_line(result)


def test_k8s_commands_without_a_cluster_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    result = run_main(capsys, "k8s", "status")
    assert result.returncode == 2 and "kubeconfig" in error_line(result)
