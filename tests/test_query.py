"""The reference query language: what DataFrame.query selects on well-formed queries, nothing that runs
code, and errors that show where the query is wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normdiff_bids.data.query import QueryError, parse_query, query_mask, select_rows
from normdiff_bids.data.reference import reference_participants, select_reference

LEVELS = ["HC", "PT", "MCI", "x y"]
OPS = ["==", "!=", "<", "<=", ">", ">="]


def cohort(n=8):
    return pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(n)],
        "age": [10.0, 20.5, np.nan, 40.0, 55.0, 61.0, 18.0, 33.0][:n],
        "sex": ["F", "M", "F", None, "M", "F", "M", "F"][:n],
        "diagnosis": ["HC", "PT", "HC", "HC", "MCI", "HC", "PT", "HC"][:n],
        "site": [1, 1, 2, 2, 3, 3, 1, 2][:n],
        "Left-Hippocampus": [3.1, 3.4, 3.0, 2.8, 3.9, 4.1, 3.3, 3.5][:n],
        "control": [True, False, True, True, False, True, False, True][:n],
    })


def selected(table, query):
    return list(table.loc[query_mask(table, query), "participant_id"])


@pytest.mark.parametrize(("query", "expected"), [
    ("diagnosis == 'HC' and age >= 18", ["sub-03", "sub-05", "sub-07"]),
    ('diagnosis == "HC" & age >= 18', ["sub-03", "sub-05", "sub-07"]),
    ("18 <= age < 40", ["sub-01", "sub-06", "sub-07"]),
    ("diagnosis in ['PT', 'MCI']", ["sub-01", "sub-04", "sub-06"]),
    ("diagnosis not in ('HC',)", ["sub-01", "sub-04", "sub-06"]),
    ("site in [2, 3] | age < 15", ["sub-00", "sub-02", "sub-03", "sub-04", "sub-05", "sub-07"]),
    ("`Left-Hippocampus` > 3.9", ["sub-05"]),
    ("not (sex == 'M' or site == 2)", ["sub-00", "sub-05"]),
    ("~control", ["sub-01", "sub-04", "sub-06"]),
    ("control == True and site == 1", ["sub-00"]),
    ("age > -1e3 and age != 20.5", ["sub-00", "sub-03", "sub-04", "sub-05", "sub-06", "sub-07"]),
    ("sex == 'F' and\n diagnosis == 'HC'", ["sub-00", "sub-02", "sub-05", "sub-07"]),
])
def test_queries_select_the_documented_rows(query, expected):
    assert selected(cohort(), query) == expected


def test_missing_values_compare_false_and_not_negates():
    table = cohort()
    # sub-02 has no age, sub-03 no sex: no comparison (not even !=) nor membership selects them
    assert "sub-02" not in selected(table, "age != 20.5")
    assert "sub-02" not in selected(table, "age not in [20.5]")
    assert "sub-03" not in selected(table, "sex != 'M'")
    assert "sub-03" not in selected(table, "sex not in ['M']")
    assert "sub-02" in selected(table, "not age > 30")
    text = pd.DataFrame({"participant_id": ["a", "b"], "group": ["n/a", "HC"]})
    assert selected(text, "group != 'HC'") == []


# -- agreement with pandas' own DataFrame.query on random tables -----------------------------------

def _literal(kind, draw):
    if kind == "text":
        return repr(draw(st.sampled_from(LEVELS)))
    return repr(draw(st.one_of(st.integers(-5, 60), st.sampled_from([0.5, 20.25, -3.75, 1e1]))))


@st.composite
def comparisons(draw):
    column, kind = draw(st.sampled_from([("age", "number"), ("site", "number"), ("dx", "text"),
                                         ("`my col`", "number")]))
    form = draw(st.sampled_from(["cmp", "flip", "chain", "in", "not in"]))
    if form in ("in", "not in"):
        items = draw(st.lists(st.just(None), min_size=1, max_size=3))
        values = ", ".join(_literal(kind, draw) for _ in items)
        brackets = draw(st.sampled_from(["[]", "()"]))
        values = values + ("," if brackets == "()" and len(items) == 1 else "")
        text = f"{column} {form} {brackets[0]}{values}{brackets[1]}"
        return text, text
    op = draw(st.sampled_from(OPS))
    if form == "flip":
        text = f"{_literal(kind, draw)} {op} {column}"
    elif form == "chain" and kind == "number":
        text = f"{_literal(kind, draw)} {op} {column} {draw(st.sampled_from(OPS))} {_literal(kind, draw)}"
    else:
        text = f"{column} {op} {_literal(kind, draw)}"
    return text, text


def combine(children):
    pairs = st.tuples(children, children)

    def join(draw_pair, words):
        (a, pa), (b, pb) = draw_pair
        ours, pandas_op = words
        return f"({a}) {ours} ({b})", f"({pa}) {pandas_op} ({pb})"

    return st.one_of(
        st.builds(join, pairs, st.sampled_from([("and", "&"), ("&", "&"), ("or", "|"), ("|", "|")])),
        st.builds(lambda c, word: (f"{word}({c[0]})", f"~({c[1]})"), children,
                  st.sampled_from(["not ", "~"])),
    )


queries = st.recursive(comparisons(), combine, max_leaves=6)


@st.composite
def tables(draw):
    n = draw(st.integers(0, 12))
    return pd.DataFrame({
        "age": draw(st.lists(st.sampled_from([-3.75, 0, 0.5, 10, 20.25, 33, 60]), min_size=n, max_size=n)),
        "site": draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n)),
        "dx": draw(st.lists(st.sampled_from(LEVELS), min_size=n, max_size=n)),
        "my col": draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=n, max_size=n)),
    }, index=pd.RangeIndex(n) + 100)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), query=queries)
def test_valid_queries_select_what_pandas_query_selects(table, query):
    ours, theirs = query
    expected = table.query(theirs, engine="python") if len(table) else table
    pd.testing.assert_frame_equal(select_rows(table, ours), expected)


# -- nothing runs, errors point at the problem ------------------------------------------------------

ATTACKS = [
    "@pd.io.common.os.system('touch {marker}') == 0",
    "__import__('os').system('touch {marker}') == 0",
    "age.__class__.__mro__[1].__subclasses__() == 0",
    "`age`.__class__ == 0",
    "open('{marker}', 'w') == 0",
    "age == 1 or @os.system('touch {marker}')",
    "(lambda: 0)() == 0",
    "[x for x in ()] == 0",
    "age == 1; import os",
    "age + 1 > 2",
    "age == {{1: 2}}",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_code_in_a_query_is_refused_and_never_run(attack, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(QueryError, match="query"):
        query_mask(cohort(), attack.format(marker=marker))
    assert not marker.exists()


def test_a_syntax_error_shows_the_query_with_a_caret_and_what_was_expected():
    with pytest.raises(QueryError) as error:
        parse_query("age >= 18 and diagnosis ==")
    message = str(error.value)
    lines = message.splitlines()
    assert "position 27" in lines[0] and "expected a column name, a number or a quoted text" in lines[0]
    assert lines[1] == "    age >= 18 and diagnosis =="
    assert lines[2] == "    " + " " * 26 + "^"
    with pytest.raises(QueryError, match=r"single '='; write '=='"):
        parse_query("age = 18")
    with pytest.raises(QueryError, match="never closed"):
        parse_query("diagnosis == 'HC")
    with pytest.raises(QueryError, match=r"expected '\)'"):
        parse_query("(age > 3")
    with pytest.raises(QueryError, match="empty"):
        parse_query("   ")
    with pytest.raises(QueryError, match="nested deeper"):
        parse_query("(" * 200 + "age > 1" + ")" * 200)


def test_an_unknown_column_is_named_with_the_available_ones():
    with pytest.raises(QueryError) as error:
        query_mask(cohort(), "diagnosys == 'HC'")
    message = str(error.value)
    assert "'diagnosys'" in message and "did you mean 'diagnosis'" in message
    assert "available columns: participant_id, age, sex, diagnosis, site, Left-Hippocampus" in message


def test_text_compared_with_a_number_is_an_error_not_an_empty_selection():
    with pytest.raises(QueryError, match=r"column 'diagnosis' \(text\) with 1 \(a number\)"):
        query_mask(cohort(), "diagnosis == 1")
    with pytest.raises(QueryError, match="not true/false"):
        query_mask(cohort(), "age")


def test_reference_selection_uses_the_safe_query(tmp_path):
    table = cohort(8)
    table = pd.concat([table, table.assign(participant_id=[f"sub-1{i}" for i in range(8)])],
                      ignore_index=True)
    assert len(select_reference(table, query="diagnosis == 'HC'")) == 10
    with pytest.raises(QueryError, match="IDP table"):
        select_reference(table, query="@pd.io.common.os.system('true') == 0")
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_bytes(
        "\ufeffparticipant_id\tdiagnosis\r\nsub-00\tHC\r\n01\tPT\r\nsub-02\tn/a\r\n".encode())
    ids = reference_participants(bids, "diagnosis == 'HC'", table)
    assert ids == ["sub-00"]
    assert reference_participants(bids, "diagnosis != 'HC'", table) == ["sub-01"]
    with pytest.raises(QueryError, match=r"participants.tsv.*'age'"):
        reference_participants(bids, "age > 3", table)


def test_empty_cells_of_participants_tsv_are_missing_in_the_query_as_in_the_covariates(tmp_path):
    """One empty age cell must not turn the age column into text ('compares text with a number')."""
    table = cohort(4)
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tage\tdiagnosis\nsub-00\t30\tHC\nsub-01\t\tHC\n"
                                           "sub-02\t12\tHC\nsub-03\t \tPT\n")
    assert reference_participants(bids, "diagnosis == 'HC' and age >= 18", table) == ["sub-00"]
    assert reference_participants(bids, "diagnosis == 'HC'", table) == ["sub-00", "sub-01", "sub-02"]
