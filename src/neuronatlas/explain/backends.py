"""Explainer backends: a local Hugging Face chat model or an OpenAI-compatible HTTP endpoint.

Both implement :class:`Explainer`: ``explain(prompt, n=..., seed=...)`` returns up to ``n``
distinct, non-empty completions of "the main thing this neuron does is find ..." drawn by seeded
sampling. Failures raise :class:`~neuronatlas.errors.ExplainerError` with a one-line message.

    >>> from neuronatlas.explain.backends import LocalExplainer, OpenAIExplainer
    >>> lm = load_model("default")  # doctest: +SKIP
    >>> local = LocalExplainer(lm)                                   # e.g. SmolLM2-135M-Instruct
    >>> local.explain(prompt, n=3, seed=0)                           # ['capital cities', ...]
    >>> remote = OpenAIExplainer("http://127.0.0.1:8000/v1", "my-model")  # key read from $OPENAI_API_KEY
    >>> remote.explain(prompt, n=3, seed=0)  # needs the server  # doctest: +SKIP

``OpenAIExplainer`` reads its API key from the environment variable named by ``api_key_env`` when
it is created (pass ``api_key=`` to give it directly); it retries connection errors, timeouts, HTTP
429 and 5xx with exponential backoff and never retries other 4xx replies or malformed JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from neuronatlas.errors import ExplainerError
from neuronatlas.explain.prefix import Prefix, run_prefix
from neuronatlas.explain.prompts import ExplainPrompt, clean_explanation
from neuronatlas.models.loading import LoadedModel

__all__ = ["Explainer", "LocalExplainer", "OpenAIExplainer"]


@runtime_checkable
class Explainer(Protocol):
    """Anything that turns an explainer prompt into candidate explanations."""

    name: str

    def explain(self, prompt: ExplainPrompt, *, n: int, seed: int) -> list[str]:
        """Up to ``n`` distinct non-empty candidate explanations (without the prefix)."""
        ...


def _dedupe(texts: list[str], into: list[str], n: int) -> None:
    for text in texts:
        if text and text.lower() not in {t.lower() for t in into} and len(into) < n:
            into.append(text)


class LocalExplainer:
    """Sample explanations from a local causal LM (its chat template when it has one).

    Sampling uses ``temperature`` and nucleus ``top_p``; generation stops at a newline or EOS.
    Up to ``rounds`` sampling rounds (seed, seed+1, ...) are drawn until ``n`` distinct non-empty
    candidates exist.
    """

    def __init__(self, lm: LoadedModel, *, max_new_tokens: int = 24, temperature: float = 1.0,
                 top_p: float = 0.9, rounds: int = 3) -> None:
        self.lm, self.max_new_tokens, self.temperature, self.top_p, self.rounds = (
            lm, max_new_tokens, temperature, top_p, rounds)
        self.name = f"local:{lm.name}"
        self.last_prefix: Prefix | None = None     # the last prompt run (PMI reuses it on the same model)
        tok = lm.tokenizer
        self._stop_ids = sorted({i for i in range(len(tok)) if "\n" in tok.decode([i])}
                                | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))

    def explain(self, prompt: ExplainPrompt, *, n: int, seed: int) -> list[str]:
        lm, tok = self.lm, self.lm.tokenizer
        prefix = run_prefix(lm, prompt.render(tok))          # the prompt is run once for all samples
        self.last_prefix = prefix
        ids = torch.tensor([prefix.ids], device=lm.device)
        out: list[str] = []
        for r in range(self.rounds):
            past = prefix.repeated(n)
            with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []), torch.inference_mode():
                torch.manual_seed(seed + r)
                gen = lm.model.generate(
                    input_ids=ids.repeat(n, 1), attention_mask=torch.ones(n, ids.shape[1], dtype=torch.long,
                                                                          device=lm.device),
                    past_key_values=past, do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=None,
                    max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=self._stop_ids,
                    begin_suppress_tokens=self._stop_ids)
            texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            _dedupe([clean_explanation(t, prompt.prefix) for t in texts], out, n)
            if len(out) == n:
                break
        if not out:
            raise ExplainerError(f"local explainer {lm.name!r} produced no usable explanation in {self.rounds} "
                                 "sampling rounds; try another --seed or a larger explainer model")
        return out


class OpenAIExplainer:
    """Ask an OpenAI-compatible ``/chat/completions`` endpoint, one request per candidate (seeds seed+i)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", *,
                 api_key: str | None = None, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
                 temperature: float = 1.0, max_tokens: int = 60,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.model, self.timeout, self.retries, self.backoff = model, timeout, max(1, retries), backoff
        self.temperature, self.max_tokens, self._sleep = temperature, max_tokens, sleep
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.api_key_env = api_key_env
        self.name = f"openai:{model}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def explain(self, prompt: ExplainPrompt, *, n: int, seed: int) -> list[str]:
        out: list[str] = []
        for i in range(n):
            _dedupe([clean_explanation(self.complete(prompt.messages(for_api=True), seed=seed + i), prompt.prefix)],
                    out, n)
        if not out:
            raise ExplainerError(f"explainer endpoint {self.url} returned only empty explanations for {n} requests")
        return out

    def complete(self, messages: list[dict[str, str]], *, seed: int) -> str:
        """One chat completion; the text of its first choice."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": seed, "n": 1}
        last = ""
        for attempt in range(self.retries):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
                continue
            except httpx.HTTPError as exc:
                last = f"unreachable ({type(exc).__name__}: {_one_line(str(exc))})"
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                last = f"returned HTTP {reply.status_code}: {_one_line(reply.text)}"
                continue
            if reply.status_code >= 400:
                hint = f"; check the API key in ${self.api_key_env}" if reply.status_code in (401, 403) else ""
                raise ExplainerError(f"explainer endpoint {self.url} returned HTTP {reply.status_code}: "
                                     f"{_one_line(reply.text)}{hint}")
            return _parse_reply(self.url, reply.text)
        raise ExplainerError(f"explainer endpoint {self.url} {last} (after {self.retries} attempts); "
                             "check --base-url and that the server is running")


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_reply(url: str, text: str) -> str:
    try:
        data: Any = json.loads(text)
        content = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ExplainerError(f"explainer endpoint {url} sent a reply that is not chat/completions JSON "
                             f"(expected choices[0].message.content): {_one_line(text, 80)!r}") from None
    if not isinstance(content, str):
        raise ExplainerError(f"explainer endpoint {url} sent a non-text message content: {_one_line(repr(content), 80)}")
    return content
