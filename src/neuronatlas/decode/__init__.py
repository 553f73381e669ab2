"""Weight-based neuron decoding: read neurons through the unembedding, find them by token, compare models.

    >>> from neuronatlas.decode import decode_neurons, write_decoded, find_neurons, compare_decoding
    >>> write_decoded("my-atlas", decode_neurons(lm, k=20), lm)
    >>> hits = find_neurons("my-atlas", text="dog", limit=10)      # [{"layer", "neuron", "rank", ...}]
    >>> compare_decoding(lm_a, lm_b)["sides"]["in_up"]["overall"]  # top-1 agreement of two checkpoints
"""

from neuronatlas.decode.compare import compare_decoding
from neuronatlas.decode.core import (
    DEFAULT_SIDE,
    SIDES,
    DecodedArrays,
    available_sides,
    check_sides,
    decode_arrays,
    decode_info,
    decode_neurons,
    fold_final_norm,
    scan_scores,
    side_matrix,
    unembedding_matrix,
    vocabulary,
    write_decoded,
)
from neuronatlas.decode.find import (
    concept_token_ids,
    find_neurons,
    mention_pattern,
    normalize_token,
    save_selection,
    word_variants,
)

__all__ = ["DEFAULT_SIDE", "SIDES", "DecodedArrays", "available_sides", "check_sides", "compare_decoding",
           "concept_token_ids", "decode_arrays", "decode_info", "decode_neurons", "find_neurons", "fold_final_norm",
           "mention_pattern", "normalize_token", "save_selection", "scan_scores", "side_matrix",
           "unembedding_matrix", "vocabulary", "word_variants", "write_decoded"]
