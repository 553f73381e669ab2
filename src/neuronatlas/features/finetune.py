"""The data-selection proxy: held-out task perplexity after a short LoRA fine-tune (peft, CPU).

:func:`lora_perplexity` measures the held-out perplexity, attaches LoRA adapters (``peft``; extra
``train``) to the attention and MLP projections, trains them for ``steps`` AdamW steps on
``train_texts`` (causal LM loss, batches drawn with ``seed``), measures the held-out perplexity
again, and removes the adapters, leaving the model exactly as it was.

    >>> from neuronatlas.features.finetune import LoraConfig, lora_perplexity
    >>> r = lora_perplexity(lm, ["a b c d e f"] * 4, ["a b c d"], LoraConfig(steps=5, max_length=16))
    >>> r["ppl_before"], r["ppl_after"]
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from neuronatlas.errors import DatasetError, NeuronAtlasError
from neuronatlas.evaluate.perplexity import text_nll
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids, pad_ids

__all__ = ["LoraConfig", "lora_perplexity"]

_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc",
            "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2", "out_proj")


@dataclass(frozen=True)
class LoraConfig:
    steps: int = 60
    batch_size: int = 4
    max_length: int = 64
    lr: float = 1e-3
    rank: int = 8
    alpha: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.max_length, self.rank) < 1 or not self.lr > 0:
            raise DatasetError("steps, batch_size, max_length and rank must be at least 1 and lr above 0")


def _ppl(lm: LoadedModel, texts: Sequence[str], max_length: int) -> float:
    return float(text_nll(lm, list(texts), max_length=max_length).ppl()[0])


def lora_perplexity(lm: LoadedModel, train_texts: Sequence[str], eval_texts: Sequence[str],
                    config: LoraConfig = LoraConfig()) -> dict[str, Any]:
    """Held-out perplexity before and after a LoRA fine-tune on ``train_texts`` (the model is restored)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise NeuronAtlasError("the LoRA proxy needs peft; install the extra: pip install 'neuronatlas[train]'") from None
    ids = [x for x in encode_ids(lm, train_texts, max_length=config.max_length) if len(x) > 1]
    if not ids or not eval_texts:
        raise DatasetError("the fine-tune needs training texts of at least 2 tokens and held-out texts")
    before = _ppl(lm, eval_texts, config.max_length)
    names = {n.rsplit(".", 1)[-1] for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(names & set(_TARGETS))
    torch.manual_seed(config.seed)
    grad_flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    peft_model = get_peft_model(lm.model, PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                         target_modules=targets, task_type="CAUSAL_LM"))
    rng = random.Random(config.seed)
    losses = []
    t0 = time.perf_counter()
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr)
        peft_model.train()
        for _ in range(config.steps):
            batch = pad_ids(lm, [ids[rng.randrange(len(ids))] for _ in range(config.batch_size)], "right")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            out = peft_model(**{k: v.to(lm.device) for k, v in batch.items()}, labels=labels.to(lm.device))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        peft_model.eval()
        train_seconds = time.perf_counter() - t0
        after = _ppl(lm, eval_texts, config.max_length)
    finally:
        peft_model.eval()
        restored = peft_model.unload()               # drop the adapters, keep the original weights
        for n, p in restored.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        lm.model = restored
    return {"ppl_before": before, "ppl_after": after, "first_loss": losses[0], "last_loss": losses[-1],
            "train_seconds": round(train_seconds, 2), "targets": targets, "config": asdict(config)}
