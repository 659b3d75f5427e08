"""A client of OpenAI-compatible chat-completions endpoints, shared by the VLM judge (vincie.evaluation.judge) and
the VLM transition-text annotator (data_index.ingest.vlm).

A request is `POST {url}/chat/completions` with one user message: a text part, then images as `image_url` parts
holding PNG data URLs, at `temperature` 0. The API key, if any, comes from an environment variable, never a flag.
Retries, caching and reply parsing are the callers' (they differ).
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.request

import numpy as np
from PIL import Image


def png_data_url(picture: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ChatEndpoint:
    def __init__(self, url: str, model: str, api_key_env: str, timeout_s: float):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.timeout_s = model, timeout_s
        self.api_key = os.environ.get(api_key_env, "")

    def body(self, text: str, images: list[np.ndarray]) -> dict:
        content = [{"type": "text", "text": text}]
        content += [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}

    def post(self, body: dict) -> dict:
        """The endpoint's JSON reply; urllib's errors (URLError, timeouts) and JSON errors propagate."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())
