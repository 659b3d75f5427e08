"""Operations: the metrics endpoint, a real Prometheus scraping a real 2-process run (alert rules loaded, every
dashboard query evaluated), a run that loses a rank to kill -9 and finishes with every session of the epoch
consumed once, and the PNG report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vincie.errors import VincieError
from vincie.sessions.index import read_index
from vincie.training.metrics import Metrics, serve

from conftest import REPO, error_line, free_port, run_main
from helpers import make_data, write_config

# DESIGN.md "Operations": every series, as exposed (counters with _total, histograms with _bucket/_sum/_count)
DESIGN_SERIES = ["vincie_train_steps_total", "vincie_train_step_seconds_count", "vincie_train_loss",
                 "vincie_train_samples_total", "vincie_train_tokens_total", "vincie_train_model_tflops",
                 "vincie_train_mfu_ratio", "vincie_train_grad_norm", "vincie_train_lr", "vincie_data_wait_seconds_count",
                 "vincie_data_skipped_total", "vincie_checkpoint_seconds_count", "vincie_checkpoint_last_step",
                 "vincie_nonfinite_steps_total"]


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_the_endpoint_serves_every_design_series_with_the_rank_label():
    metrics = Metrics()
    metrics.step({"step_s": 0.5, "reporter": True, "samples": 4, "tokens": 1000, "grad_norm": 0.3, "lr": 1e-3,
                  "finite": False})
    metrics.window({"loss": 0.5, "loss_nip": 0.4, "loss_csp": None, "loss_nsp": 0.7, "model_tflops": 12.0,
                    "mfu": 0.3})
    metrics.checkpoint(200, 1.5, 1.7e9)
    port = free_port()
    server = serve(metrics, port, rank=3)
    try:
        samples = scrape(port)
        with pytest.raises(VincieError, match=f"port {port}"):  # taken: one clear line
            serve(metrics, port, rank=4)
    finally:
        server.shutdown()
        server.server_close()
    for name in DESIGN_SERIES:
        assert name in samples, name
        assert all(s.labels["rank"] == "3" and set(s.labels) <= {"rank", "task", "reason", "le"}
                   for s in samples[name]), name
    value = {name: sum(s.value for s in found) for name, found in samples.items()}
    assert value["vincie_train_steps_total"] == 1 and value["vincie_nonfinite_steps_total"] == 1
    assert value["vincie_train_tokens_total"] == 1000 and value["vincie_train_mfu_ratio"] == 0.3
    assert {s.labels["task"]: s.value for s in samples["vincie_train_loss"]} == {"all": 0.5, "nip": 0.4, "nsp": 0.7}
    assert value["vincie_checkpoint_last_step"] == 200 and value["vincie_checkpoint_last_timestamp_seconds"] == 1.7e9


def test_metrics_config_is_validated(capsys):
    for override, key in (("metrics.port=80", "metrics.port"), ("metrics.port=70000", "metrics.port"),
                          ("metrics.peak_tflops=-1", "metrics.peak_tflops"), ("metrics.gpu=v100", "metrics.gpu")):
        result = run_main(capsys, "config", "show", override)
        assert result.returncode == 2 and f"'{key}'" in error_line(result)
    assert "(a100, h100, h200, b200), got 'v100'" in error_line(result)  # the known cards, on one line


def test_report_draws_a_run_log_and_names_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 1 / s, "loss_nip": 1 / s, "loss_csp": 2 / s, "loss_nsp": None, "lr": 1e-3,
                "grad_norm": 0.5, "samples_per_s": 10.0, "tokens_per_s": 1e4, "step_s": 0.4, "data_wait_share": 0.1,
                "nonfinite_steps": 0, "data_sessions": 8 * s, "data_skipped": {"bad_tar": s // 5}}
               for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_main(capsys, "report", str(run), check=True)
    from PIL import Image

    with Image.open(run / "report.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000
    assert str(run / "report.png") in result.stdout
    result = run_main(capsys, "report", str(tmp_path))
    assert result.returncode == 2 and "metrics.jsonl does not exist" in error_line(result)
    (run / "metrics.jsonl").write_text("{not json\n")
    result = run_main(capsys, "report", str(run))
    assert result.returncode == 2 and "line 1 is not JSON" in error_line(result)


# ---------------------------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "train", sessions=32)


def launch(config: str, *extra: str, max_restarts: int = 0, log=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vincie", "launch", "local", "--nproc", "2", "--config", config,
                             "--max-restarts", str(max_restarts), "--no-progress", *extra], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def two_free_ports() -> int:
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as exc:  # a bad query answers 400 with the reason in the body
        return json.loads(exc.read())
    except urllib.error.URLError as exc:  # not listening yet
        return {"status": "unreachable", "error": str(exc)}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((Path(REPO) / "k8s/monitoring/dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    # Grafana's variables, as Grafana substitutes them (All: the variable's allValue)
    return [e.replace("$job", ".*").replace("$__rate_interval", "10s") for e in exprs]


@pytest.mark.slow
def test_prometheus_scrapes_a_two_process_run_and_evaluates_the_dashboard_and_rules(tmp_path, data):
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus is missing: apt-get install prometheus (see .ci/run)"
    base = two_free_ports()
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", data,
                          train={"steps": 100, "log_every": 1, "checkpoint_every": 10, "eval_every": 5,
                                 "eval_sessions": 2, "eval_success_sessions": 1, "eval_sample_steps": 2},
                          data={"workers": 0, "val_url": data}, metrics={"port": base})
    rules = yaml.safe_load((Path(REPO) / "k8s/monitoring/prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{"job_name": "vincie-it",
                            "static_configs": [{"targets": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]}]}]}))
    web = free_port()
    prometheus = subprocess.Popen([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),
                                  start_new_session=True)
    url = f"http://127.0.0.1:{web}"
    log = open(tmp_path / "train.log", "w")
    run = launch(config, log=log)
    try:
        # vincie_train_steps_total per rank, as Prometheus answers it. Not their sum: a scrape that misses one
        # rank (busy saving a checkpoint) makes its series stale for a moment, and the sum drops.
        seen = {}
        deadline = time.time() + 900
        while time.time() < deadline and run.poll() is None:
            result = query(url, "vincie_train_steps_total")
            for series in result.get("data", {}).get("result", []):
                seen.setdefault(series["metric"]["rank"], []).append(float(series["value"][1]))
            if len(seen) == 2 and all(len(set(values)) >= 3 for values in seen.values()):
                break
            time.sleep(1)
        assert len(seen) == 2 and all(len(set(v)) >= 3 and v == sorted(v) for v in seen.values()), \
            (seen, open(tmp_path / "train.log").read()[-2000:])
        ranks = query(url, "vincie_train_steps_total")["data"]["result"]
        assert sorted(r["metric"]["rank"] for r in ranks) == ["0", "1"]
        assert all(r["metric"]["job"] == "vincie-it" for r in ranks)
        loss = query(url, 'vincie_train_loss{task="nip"}')["data"]["result"]
        assert len(loss) == 2 and all(0 < float(r["value"][1]) < 100 for r in loss)
        # validation (train.eval_every): the losses on both ranks, the judged success on rank 0
        deadline = time.time() + 300
        while time.time() < deadline and not query(url, "vincie_val_success")["data"]["result"]:
            time.sleep(1)
        val_loss = query(url, 'vincie_val_loss{task="nip",turn="1"}')["data"]["result"]
        assert sorted(r["metric"]["rank"] for r in val_loss) == ["0", "1"]
        assert all(0 < float(r["value"][1]) < 100 for r in val_loss)
        success = query(url, "vincie_val_success")["data"]["result"]
        assert {r["metric"]["rank"] for r in success} == {"0"} and {r["metric"]["turn"] for r in success} >= {"1"}
        for expr in dashboard_queries():
            result = query(url, expr)
            assert result["status"] == "success", (expr, result)
        groups = json.loads(urllib.request.urlopen(f"{url}/api/v1/rules").read())["data"]["groups"]
        rules_loaded = [r for g in groups for r in g["rules"]]
        assert len(rules_loaded) == 6 and all(r["health"] in ("ok", "unknown") for r in rules_loaded)
        assert query(url, "nonsense(")["status"] == "error"  # the check above can fail
        assert run.wait(timeout=900) == 0
    finally:
        stop(run)
        stop(prometheus)
        log.close()


def record(run: Path) -> dict[int, list[list[str]]]:
    """rank -> the session keys of each step, from the run's session record."""
    out = {}
    for path in sorted((run / "sessions").glob("rank-*.jsonl")):
        lines = [json.loads(line) for line in open(path)]
        assert [line["step"] for line in lines] == list(range(1, len(lines) + 1)), path
        out[int(path.stem.split("-")[1])] = [line["keys"] for line in lines]
    return out


@pytest.mark.slow
def test_a_run_that_loses_a_rank_restarts_resumes_and_consumes_the_epoch_exactly_once(tmp_path, data):
    """32 sessions, 4 per step over 2 ranks: 8 steps are one epoch; the run takes two. One worker is killed with
    SIGKILL after the first checkpoint; torchrun restarts both, they resume from the latest checkpoint, and the
    record of consumed sessions (cut back to that checkpoint on resume) holds every session of each epoch exactly
    once."""
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", data,
                          train={"steps": 16, "log_every": 1, "checkpoint_every": 2},
                          data={"workers": 0, "record_sessions": True})
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        run = launch(config, max_restarts=1, log=log)
        try:
            latest = tmp_path / "run/checkpoints/latest"
            deadline = time.time() + 900  # the shared 2-core machine can be slow to start two workers
            while not latest.exists() and time.time() < deadline and run.poll() is None:
                time.sleep(0.02)
            # the workers are the children of torchrun's agent (itself the child of `vincie launch`)
            (agent,) = psutil.Process(run.pid).children()
            workers = agent.children()
            assert len(workers) == 2 and latest.exists()
            killed_after = latest.read_text()
            os.kill(workers[1].pid, signal.SIGKILL)
            code = run.wait(timeout=900)
        finally:
            stop(run)
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert killed_after != "step-000016" and "resuming from" in output, output[-3000:]
    run_dir = tmp_path / "run"
    assert [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")] == list(range(1, 17))
    steps = record(run_dir)
    assert sorted(steps) == [0, 1] and all(len(keys) == 16 for keys in steps.values())
    expected = sorted(read_index(data).column("id").to_pylist())
    for epoch in (0, 1):
        consumed = [key for rank in steps.values() for keys in rank[8 * epoch:8 * (epoch + 1)] for key in keys]
        assert sorted(consumed) == expected, epoch  # 32 sessions: no duplicates, no gaps
