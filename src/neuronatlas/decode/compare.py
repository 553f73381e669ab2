"""Compare the weight-based decoding of two checkpoints of one architecture (e.g. base vs instruct).

For every side and layer: the fraction of neurons whose top-1 decoded token is the same in both
models. Tokens are compared as strings, so two tokenizers that number their vocabularies
differently still compare correctly. Shapes (layers, neurons, model width) must match.

    >>> from neuronatlas.decode.compare import compare_decoding
    >>> from neuronatlas.models import load_model
    >>> lm_a, lm_b = load_model("default"), load_model("default", dtype="bfloat16")  # doctest: +SKIP
    >>> result = compare_decoding(lm_a, lm_b)
    >>> result["sides"]["in_up"]["overall"], result["sides"]["in_up"]["per_layer"][:3]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from neuronatlas.decode.core import (
    DecodedArrays,
    ProgressFn,
    available_sides,
    check_sides,
    decode_arrays,
    side_matrix,
    vocabulary,
)
from neuronatlas.errors import UnsupportedModelError
from neuronatlas.models.loading import LoadedModel

__all__ = ["compare_decoding", "model_shape"]


def model_shape(lm: LoadedModel) -> dict[str, Any]:
    """The shapes that must agree for a comparison."""
    return {"family": lm.spec.family, "layers": lm.n_layers, "neurons": lm.n_neurons,
            "d_model": int(side_matrix(lm, "out", 0).shape[1]), "sides": list(available_sides(lm))}


def compare_decoding(lm_a: LoadedModel, lm_b: LoadedModel, *, sides: Sequence[str] | str | None = None,
                     chunk: int = 512, device: str | torch.device | None = None,
                     progress: ProgressFn | None = None, decoded_a: DecodedArrays | None = None) -> dict[str, Any]:
    """Top-1 token agreement per side (``overall``) and per layer (``per_layer``) between two models.

    Raises :class:`UnsupportedModelError` when the architectures' shapes differ.
    ``progress(done, total)`` counts rows of both models together. ``decoded_a``: an already computed
    :func:`decode_arrays` result of ``lm_a`` over all layers and the requested sides (any ``k``).
    """
    shape_a, shape_b = model_shape(lm_a), model_shape(lm_b)
    if shape_a != shape_b:
        diff = ", ".join(f"{k} {shape_a[k]} vs {shape_b[k]}" for k in shape_a if shape_a[k] != shape_b[k])
        raise UnsupportedModelError(f"cannot compare decodings of {lm_a.name!r} and {lm_b.name!r}: shapes differ "
                                    f"({diff}); compare-decode needs two checkpoints of the same architecture")
    side_list = check_sides(lm_a, sides)
    per_model = len(side_list) * lm_a.n_layers * lm_a.n_neurons

    def offset(base: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda done, total=None: progress(base + done, 2 * per_model)

    if decoded_a is not None and (decoded_a.layers != list(range(lm_a.n_layers))
                                  or not set(side_list) <= set(decoded_a.sides)):
        raise UnsupportedModelError("decoded_a must cover every layer and the requested sides of model A")
    a = decoded_a or decode_arrays(lm_a, 1, sides=side_list, chunk=chunk, device=device, progress=offset(0))
    b = decode_arrays(lm_b, 1, sides=side_list, chunk=chunk, device=device, progress=offset(per_model))
    vocab_a = np.asarray(vocabulary(lm_a), dtype=object)
    vocab_b = np.asarray(vocabulary(lm_b), dtype=object)
    out: dict[str, Any] = {"model_a": lm_a.provenance, "model_b": lm_b.provenance, "shape": shape_a,
                           "same_tokenizer": bool(len(vocab_a) == len(vocab_b) and (vocab_a == vocab_b).all()),
                           "sides": {}, "seconds": b.info["total_s"] + (0.0 if decoded_a is not None else a.info["total_s"])}
    for side in side_list:
        same = vocab_a[a.top1(side)] == vocab_b[b.top1(side)]          # (layers, neurons)
        out["sides"][side] = {"overall": float(same.mean()), "per_layer": [float(x) for x in same.mean(axis=1)],
                              "agreeing": int(same.sum()), "neurons": int(same.size)}
    return out
