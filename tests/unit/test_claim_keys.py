"""The compiled path's claim keys (``arrow_claim_keys``) are the reference's (``claim_keys``).

A writer's claims must name an event the same way whichever path read it, or a repeat read by
one path would not be found among the claims the other made: exactly once per CloudEvent would
silently stop holding. So the two are compared byte for byte on generated text (empty strings,
astral characters, separators inside ids), on sliced and chunked arrays, both Arrow string types.
"""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from common.wire import claim_keys, owner_digest
from common.write.dedupe import arrow_claim_keys

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40
)  # no lone surrogates: neither path lets one through
rows = st.lists(st.tuples(text, text, text), max_size=30)


def _column(values: list[str], kind: pa.DataType, cut: int) -> pa.ChunkedArray:
    """``values`` in two chunks cut at ``cut``, the first a slice of a longer array (a non-zero
    offset into Arrow's buffers)."""
    head = pa.array(["padding", *values[:cut]], kind).slice(1)
    return pa.chunked_array([head, pa.array(values[cut:], kind)], kind)


@settings(max_examples=300, deadline=None)
@given(
    events=rows,
    offset=st.integers(min_value=0, max_value=2**31),
    cut=st.integers(min_value=0, max_value=30),
    large=st.booleans(),
)
def test_arrow_claim_keys_equal_the_reference(
    events: list[tuple[str, str, str]], offset: int, cut: int, large: bool
) -> None:
    # Given: events as the reference reads them, and as Arrow columns the compiled path holds
    owner = owner_digest("orders~7")
    kind = pa.large_string() if large else pa.string()
    cut = min(cut, len(events))
    columns = [_column([event[i] for event in events], kind, cut) for i in range(3)]

    # When: both make the keys
    identities, values = arrow_claim_keys(owner, offset, *columns)
    expected_ids, expected_values = claim_keys(
        owner, offset, [(i, *event) for i, event in enumerate(events)]
    )

    # Then: byte for byte the same
    assert identities == expected_ids
    assert values == b"".join(expected_values)


def test_an_identity_is_not_ambiguous_where_source_ends() -> None:
    # Given: two events whose source and id run together into the same text
    owner = owner_digest("b")
    columns = [pa.chunked_array([pa.array(values)]) for values in (["ab", "a"], ["c", "bc"])]
    raws = pa.chunked_array([pa.array(["{}", "{}"])])

    # When: their keys are made
    identities, _ = arrow_claim_keys(owner, 0, columns[0], columns[1], raws)

    # Then: they are two identities (the source's length is part of the identity)
    assert identities[0] != identities[1]
