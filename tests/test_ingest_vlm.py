"""The VLM transition-text annotator against a local HTTP server of this test's own that speaks the
chat-completions protocol.

The server is a stand-in: no VLM runs here. It answers each of the three steps (describe a frame, list the
differences, summarise one instruction) with text chosen by the test, and on request sleeps past the client's
timeout or sends malformed replies; so what is checked is the client (request format, the three steps in order,
caching by frame hash, retries, timeouts, rate limiting, the recorded model version) and the ingest run around it,
not any annotation quality.
"""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from data_index.ingest.pipeline import read_manifest
from data_index.ingest.vlm import VLMError, VLMTextAnnotator
from data_index.synthetic.videos import write_videos
from data_index.synthetic.world import generate_session
from vincie.config import SynthConfig, VLMConfig
from vincie.sessions.shards import iter_sessions

from conftest import run_main

SUMMARY = "make the red circle bigger"
REPORTED_MODEL = "stand-in-vlm-2026-01"


class ChatServer:
    """Answers POST /v1/chat/completions; `faults` is a queue of what to do instead of answering: 'sleep',
    'garbage' (not JSON), 'no_choices', 'empty' (empty content)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.faults: list[str] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                fault = server.faults.pop(0) if server.faults else ""
                if fault == "sleep":
                    time.sleep(1.5)
                text = body["messages"][0]["content"][0]["text"]
                if text.startswith("Describe"):
                    answer = "A frame with some coloured shapes."
                elif text.startswith("These are two frames"):
                    answer = "- the red circle is larger"
                else:
                    answer = f'Instruction: "{SUMMARY}"\n'
                reply = {"model": REPORTED_MODEL, "choices": [{"message": {"role": "assistant", "content": answer}}]}
                if fault == "no_choices":
                    reply = {"model": REPORTED_MODEL, "error": "overloaded"}
                if fault == "empty":
                    reply["choices"][0]["message"]["content"] = ""
                data = b"<html>502 Bad Gateway</html>" if fault == "garbage" else json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.stop()


def frames(seed: int, count: int) -> list[np.ndarray]:
    return [np.random.default_rng([seed, i]).integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(count)]


def annotator(server, tmp_path, **kw) -> VLMTextAnnotator:
    """A client of the stand-in with its response cache under tmp_path/cache."""
    cfg = VLMConfig(url=server.url, model="m", timeout_s=kw.pop("timeout_s", 5.0), backoff_s=0.0,
                    requests_per_s=kw.pop("requests_per_s", 1000.0), api_key_env="TEST_VLM_KEY", **kw)
    return VLMTextAnnotator(cfg, str(tmp_path / "cache"))


def images_of(request: dict) -> list[np.ndarray]:
    import io

    from PIL import Image

    parts = [p for p in request["messages"][0]["content"] if p["type"] == "image_url"]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))))
            for p in parts]


def test_three_steps_in_order_cached_by_frame_hash(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_VLM_KEY", "sk-test")
    a, b, c = frames(0, 3)
    vlm = annotator(server, tmp_path)
    assert vlm.instruction(a, b, None) == SUMMARY  # list marker and quotes of the reply removed
    steps = [r["messages"][0]["content"][0]["text"].split()[0] for r in server.requests]
    assert steps == ["Describe", "Describe", "These", "Differences"]
    sent = [images_of(r) for r in server.requests]
    assert np.array_equal(sent[0][0], a) and np.array_equal(sent[1][0], b)  # lossless PNG of each frame
    assert len(sent[2]) == 2 and np.array_equal(sent[2][1], b) and sent[3] == []
    assert all(r["model"] == "m" and r["temperature"] == 0 for r in server.requests)
    assert all(h["Authorization"] == "Bearer sk-test" for h in server.headers)
    assert vlm.versions() == {"text_model": "m", "text_model_reported": [REPORTED_MODEL], "text_prompt_version": 1}
    # the same pair again: all from the cache; a pair sharing frame b: b's description is not asked again (nor
    # the summary, whose input, the stand-in's list of differences, is the same text)
    assert annotator(server, tmp_path).instruction(a, b, None) == SUMMARY and len(server.requests) == 4
    vlm.instruction(b, c, None)
    steps = [r["messages"][0]["content"][0]["text"].split()[0] for r in server.requests[4:]]
    assert steps == ["Describe", "These"] and np.array_equal(images_of(server.requests[4])[0], c)


def test_timeouts_and_malformed_replies_are_retried_then_reported(server, tmp_path):
    a, b = frames(1, 2)
    server.faults = ["sleep", "garbage", "no_choices"]  # three failed tries of the first request, then answers
    vlm = annotator(server, tmp_path, timeout_s=0.5, attempts=4)
    assert vlm.instruction(a, b, None) == SUMMARY
    assert len(server.requests) == 4 + 3
    # a summary that never comes back usable: one line naming the endpoint, the step and the last problem
    c, d = frames(2, 2)
    server.faults = ["", "", "", "empty", "garbage"]
    with pytest.raises(VLMError) as err:
        annotator(server, tmp_path / "fresh", attempts=2).instruction(c, d, None)  # fresh cache: the summary is asked
    message = str(err.value)
    assert "(summary)" in message and "after 2 attempts" in message and "malformed reply" in message
    assert "\n" not in message
    # and a server that sleeps past every timeout
    server.faults = ["sleep"] * 2
    with pytest.raises(VLMError, match="timed out"):
        annotator(server, tmp_path, timeout_s=0.3, attempts=2).instruction(*frames(3, 2), None)
    # the cache holds only usable replies: the two descriptions and the differences, no summary
    cached = [json.loads(p.read_text())["content"] for p in (tmp_path / "fresh" / "cache").rglob("*.json")]
    assert sorted(cached) == sorted(["A frame with some coloured shapes."] * 2 + ["- the red circle is larger"])


def test_requests_are_rate_limited(server, tmp_path):
    vlm = annotator(server, tmp_path, requests_per_s=10.0)
    start = time.perf_counter()
    vlm.instruction(*frames(4, 2), None)  # four requests: at least three intervals of 0.1 s
    assert time.perf_counter() - start >= 0.3
    assert len(server.requests) == 4


def test_ingest_with_the_vlm_annotator(server, tmp_path, capsys):
    videos = tmp_path / "videos"
    item = generate_session(SynthConfig(min_turns=2, max_turns=2), "train", 5, 0)
    write_videos(item, str(videos), ["h264"], fps=8, hold=8, noise_std=0.0)
    args = ["data", "ingest", "--videos", str(videos), "--workers", "1", "--text", "vlm", "--vlm-url", server.url,
            "--vlm-model", "m", "ingest.interval_s=0.5", "ingest.vlm.backoff_s=0", "ingest.vlm.timeout_s=1",
            "ingest.vlm.attempts=2"]
    out = tmp_path / "out"
    run_main(capsys, *args, "--out", str(out), check=True)
    (session,) = iter_sessions(str(out))
    assert session.instructions == [SUMMARY, SUMMARY]
    assert session.meta["annotators"]["text"] == "vlm:m" and session.meta["quality"] == pytest.approx(0.75)
    assert session.meta["annotator_versions"]["text_model_reported"] == [REPORTED_MODEL]
    # the endpoint gone: the video is recorded as failed (exit status 1) and made by the next run
    down = tmp_path / "down"
    server.faults = ["garbage"] * 2  # both tries of the first request
    result = run_main(capsys, *args, "--out", str(down))
    assert result.returncode == 1
    (record,) = read_manifest(str(down))
    assert record["status"] == "failed" and "malformed reply" in record["detail"]
    run_main(capsys, *args, "--out", str(down), check=True)
    assert read_manifest(str(down))[-1]["status"] == "done" and len(list(iter_sessions(str(down)))) == 1
