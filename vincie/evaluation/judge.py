"""A VLM judge over any OpenAI-compatible chat-completions endpoint, with MSE-Bench's rule.

MSE-Bench (VINCIE's release, evaluation/compute_score.py) asks a VLM, for turn k of a session, to look at the
source image and the edited images of turns 1..k with the prompts 1..k and to score the last turn 0-10 for
*prompt following* (does the last image do what the last prompt asks) and *consistency* (are the parts the
prompt does not touch kept from the previous image). A turn succeeds when both scores exceed 6; success is
cumulative: a session's turns are judged in order and judging stops at its first failed turn, which, and every
later turn, counts as failed. The success rate at turn k is the share of sessions whose turns 1..k all succeeded.

The request (vincie.chat) holds the instructions as text, then the images. The reply's message content must hold
a JSON object with integer `prompt_following` and `consistency` (a `reason` is kept when given); a reply that
does not is retried, then reported in one line.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from vincie.chat import ChatEndpoint
from vincie.errors import VincieError

THRESHOLD = 6  # a turn succeeds when both scores are > THRESHOLD

PROMPT = """You are judging a multi-turn image editing session. The first image is the original. Each later image \
is the result of one editing turn, applied to the image before it. The editing prompts, in order:
{prompts}
Judge only the LAST turn (turn {turn}), using the earlier turns as context. Give two integer scores from 0 to 10:
- "prompt_following": how fully the last image carries out the last prompt (0: not at all, 10: exactly).
- "consistency": how well the last image keeps everything the last prompt does not ask to change, compared with \
the image before it (0: a different picture, 10: only the requested change was made).
Answer with one JSON object and nothing else: {{"reason": "<one sentence>", "prompt_following": <int>, \
"consistency": <int>}}"""


@dataclass
class Judgement:
    prompt_following: int
    consistency: int
    reason: str = ""

    @property
    def success(self) -> bool:
        return self.prompt_following > THRESHOLD and self.consistency > THRESHOLD


def parse_reply(content: str) -> Judgement | None:
    """The first JSON object in the reply (code fences and text around it allowed) -> scores, or None."""
    match = re.search(r"\{.*\}", content, re.DOTALL)
    if not match:
        return None
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    scores = [data.get("prompt_following"), data.get("consistency")] if isinstance(data, dict) else [None]
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 10 for s in scores):
        return None
    return Judgement(scores[0], scores[1], str(data.get("reason", "")))


class VLMJudge:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", attempts: int = 3,
                 timeout_s: float = 120.0):
        self.chat = ChatEndpoint(url, model, api_key_env, timeout_s)
        self.attempts = attempts

    def judge_turn(self, prompts: list[str], images: list[np.ndarray]) -> Judgement:
        """prompts 1..k and images [source, edit 1, ..., edit k] -> the scores of turn k."""
        listed = "\n".join(f"turn {i + 1}: {p}" for i, p in enumerate(prompts))
        body = self.chat.body(PROMPT.format(prompts=listed, turn=len(prompts)), images)
        problem = ""
        for attempt in range(self.attempts):
            try:
                reply = self.chat.post(body)
                text = reply["choices"][0]["message"]["content"]
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                judgement = parse_reply(text if isinstance(text, str) else "")
                if judgement is not None:
                    return judgement
                problem = f"reply without the two integer scores: {str(text)[:120]!r}"
            time.sleep(min(2 ** attempt, 8) if attempt + 1 < self.attempts else 0)
        raise VincieError(f"--judge-url {self.chat.url}: no usable answer after {self.attempts} attempts ({problem})")

    def judge_session(self, source: np.ndarray, prompts: list[str], edits: list[np.ndarray]) -> list[Judgement | None]:
        """Turns in order until the first failure; later turns are not judged (None) and count as failed."""
        judgements: list[Judgement | None] = []
        for k in range(len(prompts)):
            if judgements and not judgements[-1].success:
                judgements.append(None)
                continue
            judgements.append(self.judge_turn(prompts[:k + 1], [source] + edits[:k + 1]))
        return judgements


def cumulative_success(sessions: list[list[Judgement | None]], turns: int) -> list[float]:
    """Share of sessions whose turns 1..k all succeeded, k = 1..turns (sessions shorter than k do not count)."""
    rates = []
    for k in range(turns):
        long_enough = [s for s in sessions if len(s) > k]
        rates.append(float(np.mean([all(j is not None and j.success for j in s[:k + 1]) for s in long_enough]))
                     if long_enough else float("nan"))
    return rates
