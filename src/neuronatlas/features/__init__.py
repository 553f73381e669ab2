"""SNMF features of MLP activations (fit, store, explain) and monosemantic data selection.

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.features import FeatureConfig, fit_features, write_features
    >>> docs = default_corpus(n_docs=20, seed=0)
    >>> config = FeatureConfig(k=4, top_k=3, max_length=32)
    >>> run = fit_features(lm, docs, config)
    >>> info = write_features("my-atlas", lm, run, docs, config=config)
    >>> info["k"], len(info["layers"])
    (4, 2)
"""

from neuronatlas.features.core import FeatureConfig, FeatureRun, encode_batches, fit_features, token_mask
from neuronatlas.features.store import (
    FEATURE_TABLES,
    features_info,
    output_directions,
    read_components,
    read_feature_exemplars,
    write_features,
)

__all__ = ["FEATURE_TABLES", "FeatureConfig", "FeatureRun", "encode_batches", "features_info", "fit_features",
           "output_directions", "read_components", "read_feature_exemplars", "token_mask", "write_features"]
