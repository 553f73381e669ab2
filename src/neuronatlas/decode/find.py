"""Find neurons by token: search ``decoded.parquet`` for neurons whose decoded top tokens contain a word.

Token strings are stored as the tokenizer spells them; :func:`normalize_token` turns byte-level BPE
markers (``Ġ`` for a space, ``Ċ`` for a newline, ``Ã©`` for ``é``) and SentencePiece's ``▁`` into
text, so a search needs no tokenizer. ``text="dog"`` matches every variant of the word (with and
without a leading space, lower/Capitalised/UPPER, the plural); ``token=" dog"`` one exact token.

    >>> from neuronatlas.decode.find import find_neurons, save_selection, word_variants
    >>> word_variants("dog")[:4]
    [' DOG', ' DOGS', ' Dog', ' Dogs']
    >>> hits = find_neurons("my-atlas", text="dog", side="out_normed", limit=20)
    >>> hits[0]["layer"], hits[0]["neuron"], hits[0]["rank"], hits[0]["act_max"]   # act_* if recorded
    >>> save_selection(hits, "dog.jsonl")        # then: neuronatlas generate --clamp @dog.jsonl=3xmax

Hits are ranked by the best rank of a matching token (0 = the neuron's top token), then by score.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neuronatlas.errors import AtlasError, SelectionError, SiteError
from neuronatlas.ids import NeuronId
from neuronatlas.store.atlas import Atlas, atomic_path

__all__ = [
    "activation_evidence",
    "concept_token_ids",
    "decoded_sides",
    "find_neurons",
    "mention_pattern",
    "normalize_token",
    "save_selection",
    "word_forms",
    "word_variants",
]

DEFAULT_SIDE = "out_normed"


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def normalize_token(token: str) -> str:
    """The text a token stands for: ``Ġdog`` -> `` dog``, ``▁dog`` -> `` dog``, ``Ã©`` -> ``é``."""
    table = _byte_decoder()
    if token and all(ch in table for ch in token):
        try:
            return bytes(table[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            pass  # a partial UTF-8 sequence, or a SentencePiece token with non-ASCII text
    return token.replace("▁", " ")


def _plurals(word: str) -> list[str]:
    low = word.lower()
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return [word + "es"]
    if len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        return [word[:-1] + "ies"]
    return [word + "s"]


def word_forms(word: str) -> list[str]:
    """Surface forms of a word: lower, Capitalised, UPPER, each with its regular plural."""
    w = " ".join(word.split())
    if not w:
        raise SelectionError("empty word; give a word such as --text dog")
    bases = [w.lower(), w[:1].upper() + w[1:].lower(), w.upper(), w]
    forms: list[str] = []
    for base in bases:
        forms.append(base)
        forms.extend(p if base != w.upper() else p.upper() for p in _plurals(base))
    return sorted(dict.fromkeys(forms))


def word_variants(word: str) -> list[str]:
    """Every form of :func:`word_forms`, with and without a leading space (how tokens spell them)."""
    forms = word_forms(word)
    return sorted({f for f in forms} | {" " + f for f in forms})


def mention_pattern(word: str) -> re.Pattern[str]:
    """A case-insensitive whole-word regex for the word and its plural (to count mentions in text)."""
    forms = sorted({f.lower() for f in word_forms(word)}, key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(re.escape(f) for f in forms) + r")(?![\w])", re.IGNORECASE)


def concept_token_ids(tokenizer: Any, word: str, *, exact: str | None = None) -> dict[int, str]:
    """Token ids of ``tokenizer`` whose text is a variant of ``word`` (or exactly ``exact``)."""
    wanted = {normalize_token(exact)} if exact is not None else set(word_variants(word))
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {i: t for i, t in enumerate(vocab) if isinstance(t, str) and normalize_token(t) in wanted}


def decoded_sides(store: Atlas) -> list[str]:
    """The sides present in ``decoded.parquet`` (from its metadata, else from the column)."""
    path = store.file("decoded.parquet")
    meta = json.loads((pq.read_schema(path).metadata or {}).get(b"neuronatlas.decode", b"{}"))
    if meta.get("sides"):
        return [str(s) for s in meta["sides"]]
    column = pq.read_table(path, columns=["side"]).column("side")
    return sorted(str(s) for s in pc.unique(_as_strings(column)).to_pylist())


def _as_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column


def _match_mask(column: pa.ChunkedArray, wanted: set[str]) -> pa.ChunkedArray:
    strings = _as_strings(column)
    uniques = pc.unique(strings).to_pylist()
    hits = [u for u in uniques if u is not None and normalize_token(u) in wanted]
    return pc.is_in(strings, value_set=pa.array(hits, type=pa.string()))


def activation_evidence(store: Atlas, pairs: Sequence[tuple[int, int]],
                        record: str | None = None) -> tuple[str | None, dict[tuple[int, int], dict[str, float]]]:
    """``(record, {(layer, neuron): {mean, max, act_prob}})`` from a recorded dataset (label ``__all__``)."""
    mlp_records = [name for name, rec in sorted(store.manifest().get("records", {}).items())
                   if rec.get("site", "mlp") == "mlp"]
    if record is not None and record not in mlp_records:
        raise AtlasError(f"atlas {str(store.path)!r} has no recorded dataset {record!r} on the mlp site; "
                         f"records: {', '.join(mlp_records) or 'none'}")
    chosen = record or (mlp_records[0] if mlp_records else None)
    if chosen is None or not pairs:
        return chosen, {}
    keys = [int(layer) * 1_000_000 + int(neuron) for layer, neuron in pairs]
    table = store.query("SELECT layer, neuron, mean, max, act_prob FROM stats WHERE label = '__all__' AND site = 'mlp' "
                        "AND record = ? AND list_contains(?, layer * 1000000 + neuron)", [chosen, keys])
    return chosen, {(r["layer"], r["neuron"]): {"act_mean": r["mean"], "act_max": r["max"], "act_prob": r["act_prob"]}
                    for r in table.to_pylist()}


def find_neurons(atlas: Atlas | str | Path, *, token: str | None = None, text: str | None = None,
                 side: str = DEFAULT_SIDE, direction: str = "top", limit: int | None = 50,
                 record: str | None = None, preview: int = 5) -> list[dict[str, Any]]:
    """Neurons whose decoded ``direction`` tokens on ``side`` (``all``: every side) contain the word.

    One hit per (layer, neuron, side): its best-ranked matching token. Hits are sorted by
    ``(rank, -score)``; ``top_tokens`` previews the neuron's first ``preview`` tokens (as text). With a
    recorded dataset in the atlas, ``act_mean``/``act_max``/``act_prob`` come from its ``stats``.
    """
    store = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    if (token is None) == (text is None):
        raise SelectionError("give exactly one of --token (one exact token, e.g. ' dog') or --text (a word, e.g. dog)")
    if direction not in ("top", "bottom"):
        raise SelectionError(f"unknown direction {direction!r}; choose top or bottom")
    if not store.has("decoded.parquet"):
        raise AtlasError(f"atlas {str(store.path)!r} has no decoded.parquet; run "
                         f"`neuronatlas decode --model MODEL --out {store.path}` first")
    present = decoded_sides(store)
    if side != "all" and side not in present:
        raise SiteError(f"side {side!r} is not in {str(store.path)!r}/decoded.parquet; choose from: "
                        f"{', '.join(present)} or all")
    wanted = {normalize_token(token)} if token is not None else set(word_variants(text or ""))
    filters: list[tuple[str, str, Any]] = [("direction", "=", direction)]
    if side != "all":
        filters.append(("side", "=", side))
    table = pq.read_table(store.file("decoded.parquet"), columns=["layer", "neuron", "side", "rank", "token", "score"],
                          filters=filters)
    matched = table.filter(_match_mask(table.column("token"), wanted))
    best: dict[tuple[int, int, str], dict[str, Any]] = {}
    for row in matched.to_pylist():
        key = (row["layer"], row["neuron"], row["side"])
        cand = {**row, "token": normalize_token(row["token"])}
        if key not in best or (cand["rank"], -cand["score"]) < (best[key]["rank"], -best[key]["score"]):
            best[key] = cand
    hits = sorted(best.values(), key=lambda r: (r["rank"], -r["score"], r["layer"], r["neuron"], r["side"]))
    if limit is not None:
        hits = hits[:limit]
    _attach_previews(table, hits, preview)
    used, evidence = activation_evidence(store, [(h["layer"], h["neuron"]) for h in hits], record)
    for h in hits:
        h["id"] = str(NeuronId(h["layer"], h["neuron"]))
        ev = evidence.get((h["layer"], h["neuron"]))
        h.update(ev if ev is not None else {"act_mean": None, "act_max": None, "act_prob": None})
        h["record"] = used if ev is not None else None
    return hits


def _attach_previews(table: pa.Table, hits: list[dict[str, Any]], preview: int) -> None:
    if not hits or preview < 1:
        for h in hits:
            h["top_tokens"] = []
        return
    head = table.filter(pc.less(table.column("rank"), preview))
    layer = head.column("layer").to_numpy()
    neuron = head.column("neuron").to_numpy()
    wanted = {(h["layer"], h["neuron"]) for h in hits}
    keys = layer.astype(np.int64) * 1_000_000 + neuron
    mask = np.isin(keys, np.array([a * 1_000_000 + b for a, b in wanted], dtype=np.int64))
    rows = head.filter(pa.array(mask)).to_pylist()
    found: dict[tuple[int, int, str], list[tuple[int, str]]] = {}
    for r in rows:
        found.setdefault((r["layer"], r["neuron"], r["side"]), []).append((r["rank"], normalize_token(r["token"])))
    for h in hits:
        h["top_tokens"] = [t for _, t in sorted(found.get((h["layer"], h["neuron"], h["side"]), []))]


def save_selection(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write hits as a JSONL selection file (``layer``, ``neuron`` and context) usable as ``@FILE``."""
    items = list(rows)
    if not items:
        raise SelectionError(f"no neurons to save to {str(path)!r}; the search found nothing")
    keep = ("layer", "neuron", "side", "rank", "score", "token")
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in items))
    return target

