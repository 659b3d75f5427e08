"""Transition text from a VLM over any OpenAI-compatible chat-completions endpoint, in the paper's three steps:
describe each frame, list the differences of a pair, summarise them as one instruction.

Requests are `POST {url}/chat/completions` (`temperature` 0, images as PNG data URLs, the key from an environment
variable). Each request has a timeout and `attempts` tries with exponential backoff; a reply that is not a
chat completion with non-empty text content counts as a failed try. A process-wide rate limiter spaces requests
(`requests_per_s` of the run divided among its worker processes). Replies are cached on disk under a key made of
the model, the step's prompt and the SHA-256 of the frames involved, so a rerun (or a frame shared by two pairs)
asks nothing twice. The model name the server reports is kept for the session's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from vincie.chat import ChatEndpoint
from vincie.config import VLMConfig
from vincie.errors import VincieError

PROMPT_VERSION = 1
DESCRIBE = ("Describe this video frame in two or three sentences: the main objects and people, their colours, "
            "positions and what they are doing. Plain text only.")
DIFFERENCES = ("These are two frames of one video scene, first and second. Descriptions:\nFIRST: {a}\nSECOND: {b}\n"
               "List the visible differences between the first and the second frame as short bullet points "
               "(what changed, where). Ignore small camera motion and noise.")
SUMMARY = ("Differences between two frames of a video:\n{differences}\nWrite ONE short imperative editing "
           "instruction (at most 25 words) that would turn the first frame into the second, e.g. 'make the man "
           "raise his left hand'. Answer with the instruction only.")


class VLMError(VincieError):
    pass


class RateLimiter:
    """At most `rate` acquisitions per second in this process, spaced evenly."""

    def __init__(self, rate: float):
        self.interval, self.next_time, self.lock = 1.0 / rate, 0.0, threading.Lock()

    def acquire(self) -> None:
        with self.lock:
            now = time.monotonic()
            wait = self.next_time - now
            self.next_time = max(now, self.next_time) + self.interval
        if wait > 0:
            time.sleep(wait)


def frame_hash(frame: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frame).tobytes() + str(frame.shape).encode()).hexdigest()


def clean_instruction(text: str) -> str | None:
    """The reply's first non-empty line without list markers and quotes; None when it is not one sentence."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    line = re.sub(r"^(instruction:|[-*\d.)\s]+)", "", lines[0], flags=re.IGNORECASE).strip().strip("\"'` ")
    return line if line and len(line.split()) <= 40 else None


class VLMTextAnnotator:
    quality = 0.75  # the paper reports about 75% accurate annotations from its VLM pipeline

    def __init__(self, cfg: VLMConfig, cache_dir: str, processes: int = 1):
        self.chat = ChatEndpoint(cfg.url, cfg.model, cfg.api_key_env, cfg.timeout_s)
        self.cfg, self.cache_dir = cfg, cache_dir
        self.limiter = RateLimiter(cfg.requests_per_s / max(1, processes))
        self.reported_models: set[str] = set()
        self.requests = self.cache_hits = 0
        os.makedirs(cache_dir, exist_ok=True)

    @property
    def name(self) -> str:
        return f"vlm:{self.cfg.model}"

    def versions(self) -> dict:
        return {"text_model": self.cfg.model, "text_model_reported": sorted(self.reported_models),
                "text_prompt_version": PROMPT_VERSION}

    def ask(self, step: str, text: str, frames: list[np.ndarray], parse=lambda s: s.strip() or None) -> str:
        """One chat completion (or its cached reply) -> `parse(content)`; a reply that parses to None counts as a
        failed attempt and is not cached."""
        key = hashlib.sha256(json.dumps([self.cfg.model, PROMPT_VERSION, step, text,
                                         [frame_hash(f) for f in frames]]).encode()).hexdigest()
        path = os.path.join(self.cache_dir, key[:2], key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            self.cache_hits += 1
            self.reported_models.add(cached["model"])
            return cached["content"]
        body = self.chat.body(text, [self.resized(f) for f in frames])
        problem = ""
        for attempt in range(self.cfg.attempts):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            self.limiter.acquire()
            self.requests += 1
            try:
                reply = self.chat.post(body)
                answer = reply["choices"][0]["message"]["content"]
            except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
                continue
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                problem = f"malformed reply ({type(exc).__name__}: {exc})"
                continue
            parsed = parse(answer) if isinstance(answer, str) else None
            if parsed is None:
                problem = f"malformed reply (message content {str(answer)[:80]!r} is not usable for {step})"
                continue
            model = str(reply.get("model") or self.cfg.model)
            self.reported_models.add(model)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"content": parsed, "model": model}, f)
            os.replace(tmp, path)
            return parsed
        raise VLMError(f"VLM {self.chat.url} ({step}): no usable reply after {self.cfg.attempts} attempts ({problem})")

    def resized(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        scale = self.cfg.image_side / max(height, width)
        if scale >= 1:
            return frame
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))

    def instruction(self, a: np.ndarray, b: np.ndarray, change) -> str:
        """Three steps: describe both frames, list their differences, summarise as one instruction."""
        desc_a, desc_b = self.ask("describe", DESCRIBE, [a]), self.ask("describe", DESCRIBE, [b])
        differences = self.ask("differences", DIFFERENCES.format(a=desc_a, b=desc_b), [a, b])
        return self.ask("summary", SUMMARY.format(differences=differences), [], parse=clean_instruction)
