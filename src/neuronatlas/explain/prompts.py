"""Prompts of explain -> simulate -> score (Bills et al. 2023) and the activation normalisation.

Activations are shown as integers 0..10: ``floor(10 * relu(a) / max)`` with ``max`` the neuron's
largest activation over the corpus. The explainer sees excerpts as ``token<TAB>value`` lines between
``<start>``/``<end>`` and completes "the main thing this neuron does is find". Tokens are written as
they decode, with newlines and tabs escaped (``\\n``, ``\\t``) so each line holds one token.

    >>> from neuronatlas.explain.prompts import normalise, explain_prompt
    >>> normalise([0.5, -1.0, 2.0], max_activation=2.0)
    array([ 2,  0, 10])
    >>> p = explain_prompt([(["The", " cat"], [0, 10])])
    >>> p.render(tokenizer)           # chat template + assistant prefix "the main thing ... find"
    >>> p.messages()                  # system + user messages for an OpenAI-compatible endpoint
    >>> p.prior().render(tokenizer)   # the same prompt without excerpts: p(d) for PMI reranking
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "EXPLAIN_PREFIX",
    "EXPLAIN_SYSTEM",
    "SIMULATE_EXAMPLE",
    "SIMULATE_SYSTEM",
    "VALUE_MAX",
    "ExplainPrompt",
    "activation_block",
    "clean_explanation",
    "explain_prompt",
    "normalise",
    "render_chat",
    "show_token",
    "simulation_header",
]

VALUE_MAX = 10
EXPLAIN_PREFIX = "the main thing this neuron does is find"

EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at the parts of the document the neuron activates for and summarize in a single sentence "
    "what the neuron is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron finding "
    "what it's looking for is represented by a non-zero activation value. The higher the activation value, "
    "the stronger the match."
)

SIMULATE_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at an explanation of what the neuron does, and try to predict its activations on each "
    "token.\n\nThe activation format is token<tab>activation, activations go from 0 to 10, \"unknown\" "
    "indicates an unknown activation. Most activations will be 0."
)

SIMULATE_EXAMPLE = (
    "Neuron 1\nExplanation of neuron 1 behavior: the main thing this neuron does is find mentions of dogs.\n"
    "Activations:\n<start>\nThe\t0\n dog\t10\n chased\t0\n the\t0\n puppy\t8\n across\t0\n the\t0\n"
    " park\t1\n.\t0\n<end>\n\n"
)


def normalise(acts: Sequence[float] | np.ndarray, max_activation: float) -> np.ndarray:
    """Integers 0..10: ``floor(10 * relu(a) / max_activation)``, clipped; all 0 if the max is <= 0."""
    a = np.nan_to_num(np.asarray(acts, dtype=np.float64), nan=0.0)
    if not max_activation > 0:
        return np.zeros(a.shape, dtype=np.int64)
    return np.clip(np.floor(VALUE_MAX * np.maximum(a, 0.0) / max_activation), 0, VALUE_MAX).astype(np.int64)


def show_token(token: str) -> str:
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def activation_block(tokens: Sequence[str], values: Sequence[int] | np.ndarray) -> str:
    lines = "\n".join(f"{show_token(t)}\t{int(v)}" for t, v in zip(tokens, values))
    return f"<start>\n{lines}\n<end>"


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template applied with a generation prompt, minus a leading BOS the tokenizer adds anyway."""
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        probe = tokenizer("x")["input_ids"]
        if probe and probe[0] == tokenizer.bos_token_id:
            text = text[len(bos):]
    return text


@dataclass(frozen=True)
class ExplainPrompt:
    """What the explainer sees: instructions, the excerpts block, and the sentence to complete."""

    system: str
    excerpts: str                      # activation blocks ("" for the PMI prior)
    prefix: str = EXPLAIN_PREFIX

    def _body(self) -> str:
        return f"Neuron 1\nActivations:\n{self.excerpts}" if self.excerpts else "Neuron 1"

    def messages(self, *, for_api: bool = False) -> list[dict[str, str]]:
        ask = (f"{self._body()}\n\nWhat is neuron 1 looking for? Complete the sentence in a few words: "
               f"\"{self.prefix} ...\"")
        if for_api:
            ask += f" Reply with only the words that follow \"{self.prefix.split()[-1]}\"."
        return [{"role": "system", "content": self.system}, {"role": "user", "content": ask}]

    def render(self, tokenizer: Any) -> str:
        """Prompt text for a local LM, ending with the prefix the model continues."""
        if getattr(tokenizer, "chat_template", None):
            return render_chat(tokenizer, self.messages()) + self.prefix
        return f"{self.system}\n\n{self._body()}\n\nExplanation of neuron 1 behavior: {self.prefix}"

    def prior(self) -> ExplainPrompt:
        """The same prompt without the excerpts (for p(d) in PMI reranking)."""
        return replace(self, excerpts="")


def explain_prompt(excerpts: Sequence[tuple[Sequence[str], Sequence[int] | np.ndarray]],
                   system: str = EXPLAIN_SYSTEM) -> ExplainPrompt:
    """Build the explainer prompt from (tokens, normalised values) excerpts."""
    return ExplainPrompt(system, "\n".join(activation_block(t, v) for t, v in excerpts))


def simulation_header(explanation: str) -> str:
    """Simulator prompt up to the first excerpt line (plain text, one worked example)."""
    return (f"{SIMULATE_SYSTEM}\n\n{SIMULATE_EXAMPLE}Neuron 2\nExplanation of neuron 2 behavior: "
            f"{EXPLAIN_PREFIX} {explanation.strip()}\nActivations:\n<start>\n")


def clean_explanation(text: str, prefix: str = EXPLAIN_PREFIX, max_chars: int = 300) -> str:
    """First line of a completion, without an echoed prefix, quotes or a trailing full stop."""
    text = text.strip()
    if text.lower().startswith(prefix.lower()):
        text = text[len(prefix):]
    text = text.strip().split("\n", 1)[0]
    text = "".join(ch for ch in text if ch.isprintable()).strip().strip("\"'`").strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text[:max_chars]
