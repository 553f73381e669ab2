"""The one neuron vocabulary: NeuronId string forms, parsing and its users."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuronatlas.errors import SelectionError
from neuronatlas.ids import NeuronId, neuron_str
from neuronatlas.intervene.neurons import NeuronSet
from neuronatlas.web.data import BadRequest, neuron_from_url

layers = st.integers(min_value=0, max_value=999_999)
indices = st.integers(min_value=0, max_value=999_999_999)


@given(layers, indices, st.sampled_from([None, "mlp", "gate"]))
def test_parse_of_str_round_trips(layer, index, component):
    n = NeuronId(layer, index, component)
    assert NeuronId.parse(str(n)) == n
    assert NeuronId.parse(n.url_path()) == NeuronId(layer, index)


@given(layers, indices)
def test_user_forms_parse_to_the_same_id(layer, index):
    n = NeuronId(layer, index)
    assert str(n) == f"L{layer}:{index}" == neuron_str(layer, index)
    for text in (f"L{layer}:{index}", f"l{layer}:{index}", f"{layer}:{index}", f"L{layer}/{index}", f" L{layer}:{index} "):
        assert NeuronId.parse(text) == n


@pytest.mark.parametrize("bad", ["", "L12", "L12:", ":3", "L-1:3", "Lx:3", "L1:2:3", "L1:2-4", "M1:2", "L1.MLP:2"])
def test_bad_ids_name_the_text_and_the_forms(bad):
    with pytest.raises(SelectionError, match=r"cannot parse neuron id .*L<layer>:<index>"):
        NeuronId.parse(bad)


def test_negative_parts_are_refused():
    with pytest.raises(SelectionError, match="negative"):
        NeuronId(-1, 3)


def test_neuron_set_and_viewer_use_the_vocabulary():
    ns = NeuronSet.parse("l3:4 12:345 L5:1-3")
    assert ns.pairs == ((3, 4), (5, 1), (5, 2), (5, 3), (12, 345))
    assert str(ns) == "L3:4 L5:1,2,3 L12:345" and NeuronSet.parse(str(ns)) == ns
    assert [str(n) for n in ns.ids()][:2] == ["L3:4", "L5:1"]
    assert neuron_from_url("L3", "17") == NeuronId(3, 17) == neuron_from_url("3", "17")
    for layer, neuron in (("L3", "x"), ("L3.gate", "1"), ("Q3", "1")):
        with pytest.raises(BadRequest, match="malformed neuron id"):
            neuron_from_url(layer, neuron)


def test_find_reads_search_box_forms():
    for text in ("L12:345", "l12/345", "12 345", "12,345", " 12 . 345 "):
        assert NeuronId.find(text) == NeuronId(12, 345)
    assert NeuronId.find("capital") is None and NeuronId.find("L12") is None
