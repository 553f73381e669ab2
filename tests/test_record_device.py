"""Recording stays on the model's device: no per-batch copy of activations to the host.

On a CPU-only machine a copy to the host cannot be seen from the device, so these tests watch the
calls that make one (``Tensor.cpu``, ``.numpy``, ``.tolist``, ``np.asarray``) on tensors whose last
dimension is the model's neuron count, while batches run; a recorder that folded activations on the
host (the ``.cpu()`` in the hook of the first recorder) fails them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronatlas.decode.core import decode_arrays
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.corpus import ExemplarStream
from neuronatlas.record.batching import encode_ids
from neuronatlas.stats.running import LabelMoments, TopK


class HostCopies:
    """Records host-copy calls on tensors with ``n`` in their last dimension while :attr:`watching`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        self.n, self.watching, self.calls = n, False, []
        for name in ("cpu", "numpy", "tolist", "__array__"):
            monkeypatch.setattr(torch.Tensor, name, self._spy(name, getattr(torch.Tensor, name)))

    def _spy(self, name, original):
        def spy(tensor, *args, **kwargs):
            if self.watching and tensor.dim() >= 1 and tensor.shape[-1] == self.n:
                self.calls.append((name, tuple(tensor.shape)))
            return original(tensor, *args, **kwargs)

        return spy


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_recorder_never_copies_activations_off_the_device(tmp_path, prompts, monkeypatch, pool):
    lm = tiny_model("llama")
    spy = HostCopies(monkeypatch, lm.n_neurons)
    batches = []

    def start(_module, _args):             # the batch loop starts with the first forward pass
        spy.watching = True

    def progress(done, total):
        batches.append(done)
        spy.watching = done < total        # ... and ends after the last batch: final state may be copied

    handle = lm.model.register_forward_pre_hook(start)
    try:
        res = record(lm, prompts, tmp_path / "a", progress=progress,
                     config=RecordConfig(batch_size=3, top_k=4, pool=pool, checkpoint_every=100))
    finally:
        handle.remove()
    assert len(batches) == 5 and batches[-1] == len(prompts)
    assert spy.calls == []
    # the spy does see copies: the final state went to the host after the loop
    spy.watching = True
    res.moments.state()
    assert spy.calls


def test_checkpoints_are_the_only_copies(tmp_path, prompts, monkeypatch):
    """With a checkpoint every 2 batches, host copies happen at checkpoints only (never in between)."""
    lm = tiny_model("qwen2")
    spy = HostCopies(monkeypatch, lm.n_neurons)
    copies_per_batch = []

    def start(_module, _args):
        spy.watching = True
        spy.calls.clear()

    def on_batch(done):
        copies_per_batch.append((done, len(spy.calls)))

    handle = lm.model.register_forward_pre_hook(start)
    try:
        record(lm, prompts, tmp_path / "a", on_batch=on_batch,
               config=RecordConfig(batch_size=3, top_k=4, checkpoint_every=2))
    finally:
        handle.remove()
    # batches 2 and 4 end with a checkpoint (state + pooled rows); 1, 3 and 5 copy nothing
    assert [d for d, n in copies_per_batch if n] == [2, 4]


def test_exemplar_stream_never_copies_activations_off_the_device(monkeypatch):
    lm = tiny_model("gpt2")
    stream = ExemplarStream(lm, top_k=3, n_random=2, before=4, after=2)
    ids = encode_ids(lm, ["The capital of France is Paris", "a bird and a dog", "Iron has the symbol Fe"] * 4)
    spy = HostCopies(monkeypatch, lm.n_neurons)
    spy.watching = True
    for i in range(0, len(ids), 4):
        stream.update(ids[i:i + 4], list(range(i, i + 4)))
    assert spy.calls == [] and stream.tokens_seen > 0


def test_decode_copies_results_to_the_host_once(monkeypatch):
    lm = tiny_model("llama")
    calls = []
    original = torch.Tensor.cpu

    def spy(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    arrays = decode_arrays(lm, k=3, sides=["out", "in_up"], chunk=8)      # 2 sides x 2 layers x 32 rows: 16 chunks
    assert len(calls) == 4 and arrays.top_ids.shape == (128, 3)


@pytest.mark.skipif(not hasattr(torch, "bfloat16"), reason="no bfloat16")
def test_bfloat16_activations_fold_into_float32_and_float64():
    """A bfloat16 model's activations are folded in float32 (sums) with float64 accumulators."""
    x = torch.randn(50, 2, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    labels = torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(1))
    m = LabelMoments(2, (2, 8))
    m.update(x, labels)
    ref = LabelMoments(2, (2, 8))
    ref.update(x.float(), labels)
    assert m.mean.dtype == torch.float64 and m.max.dtype == torch.float32
    for name in ("count", "mean", "m2", "max", "active"):
        assert torch.equal(getattr(m, name), getattr(ref, name))
    t = TopK.empty((2, 8), 3)
    t.update(x[:, 0], torch.zeros(50, dtype=torch.long), torch.arange(50), at=0)
    assert t.values.dtype == torch.float32
    assert np.array_equal(t.values[0].numpy(), x[:, 0].float().topk(3, dim=0).values.T.numpy())
