import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneforge.data.load import DataError, load_file
from tuneforge.data.prepare import prepare_splits
from tuneforge.data.splits import InvalidRows
from tuneforge.recipe import load_recipe

from conftest import shared_data, write_csv, write_jsonl


def _recipe(train, **data):
    return load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": str(train), **data}})


@pytest.fixture
def bad_files(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(
        b"text,label\n"
        b"a fine row,pos\n"          # 2 ok
        b",neg\n"                    # 3 empty text
        b"only one field\n"          # 4 wrong field count
        b"nice,maybe\n"              # 5 unknown label
        b"bytes \xff\xfe here,pos\n"  # 6 invalid UTF-8
        b"   ,pos\n"                 # 7 whitespace-only text
        b"another fine row,neg\n"    # 8 ok
        b"\"never closed,pos\n"      # 9 unparsable (quote never closed)
    )
    jsonl_path = tmp_path / "bad.jsonl"
    jsonl_path.write_bytes(
        b'{"text": "good one", "label": "pos"}\n'   # 1 ok
        b'{"text": 5, "label": "pos"}\n'            # 2 wrong type
        b'{"text": "no label"}\n'                   # 3 missing field
        b'{"text": "broken", \n'                    # 4 unparsable JSON
        b'[1, 2]\n'                                 # 5 not an object
        b'{"text": "x", "label": 1.5}\n'            # 6 wrong label type
        b'{"text": "y", "label": null}\n'           # 7 missing value
        b'{"text": "\xc3\x28", "label": "neg"}\n'   # 8 invalid UTF-8
    )
    return csv_path, jsonl_path


EXPECTED = {
    ("bad.csv", 3): "empty text", ("bad.csv", 4): "expected 2 fields", ("bad.csv", 5): "unknown label",
    ("bad.csv", 6): "invalid UTF-8", ("bad.csv", 7): "empty text", ("bad.csv", 9): "unparsable",
    ("bad.jsonl", 2): "must be text", ("bad.jsonl", 3): "missing field 'label'", ("bad.jsonl", 4): "unparsable JSON",
    ("bad.jsonl", 5): "expected a JSON object", ("bad.jsonl", 6): "string or integer label",
    ("bad.jsonl", 7): "missing value", ("bad.jsonl", 8): "invalid UTF-8",
}


def test_every_malformed_row_reported_with_file_and_line(bad_files):
    csv_path, jsonl_path = bad_files
    recipe = _recipe(csv_path, validation=str(jsonl_path), labels=["neg", "pos"])
    with pytest.raises(InvalidRows) as err:
        prepare_splits(recipe)
    found = {(r.file.rsplit("/", 1)[-1], r.line): r.reason for r in err.value.rejects}
    assert set(found) == set(EXPECTED)
    for key, fragment in EXPECTED.items():
        assert fragment in found[key], (key, found[key])
    assert f"{csv_path}:5: unknown label 'maybe'" in str(err.value)


def test_cli_stops_before_training_and_writes_all_rejects(bad_files, tmp_path):
    csv_path, jsonl_path = bad_files
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "train", "/dev/null", "--output", str(out)],
        capture_output=True, text=True)
    assert proc.returncode == 2  # an empty recipe: missing keys
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-bert\ntask: classification\ndata:\n  train: {csv_path}\n"
                      f"  validation: {jsonl_path}\n  labels: [neg, pos]\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(recipe), "--output", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    for (name, line) in EXPECTED:
        assert f"{name}:{line}:" in proc.stderr
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == len(EXPECTED)
    assert not (out / "model").exists()


def test_skip_mode_counts_add_up(bad_files):
    csv_path, jsonl_path = bad_files
    rows = [{"text": f"row {i} {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    rows += rows[:5]  # 5 exact duplicates
    train = write_csv(csv_path.parent / "train.csv", rows)
    splits = prepare_splits(_recipe(train, validation=str(jsonl_path), test=str(csv_path), on_invalid="skip",
                                    labels=["neg", "pos"]))
    for info in splits.report["files"].values():
        assert info["read"] == info["kept"] + info["rejected"] + info["duplicates_removed"]
    files = splits.report["files"]
    assert files["train"] == {**files["train"], "read": 45, "duplicates_removed": 5, "kept": 40, "rejected": 0}
    assert files["test"]["rejected"] == 6 and files["test"]["kept"] == 2
    assert files["validation"]["rejected"] == 7 and files["validation"]["kept"] == 1
    assert len(splits.rejects) == 13


def test_all_formats_give_the_same_examples(tmp_path, sentiment_rows):
    rows = sentiment_rows[:20]
    paths = [write_csv(tmp_path / "d.csv", rows), write_jsonl(tmp_path / "d.jsonl", rows)]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    paths += [tmp_path / "d.json", tmp_path / "d.tsv", tmp_path / "d.parquet"]
    cfg = _recipe(paths[0]).data
    loaded = [load_file(str(p), "classification", cfg) for p in paths]
    for result in loaded:
        assert [e.fields for e in result.examples] == [{"text": r["text"], "label": r["label"]} for r in rows]
        assert not result.rejects
    json_lines = [e.line for e in loaded[2].examples]
    assert json_lines[:3] == [2, 6, 10]  # where each object starts in the indented array


def test_missing_column_is_one_clear_error(tmp_path, sentiment_rows):
    path = write_csv(tmp_path / "d.csv", sentiment_rows)
    with pytest.raises(DataError, match=r"d.csv:1: no column 'sentence'.*'text', 'label'"):
        load_file(str(path), "classification", _recipe(path, text_column="sentence").data)


def test_split_is_70_15_15_stratified_and_disjoint(tmp_path, sentiment_rows):
    rows = sentiment_rows + sentiment_rows[:10]  # duplicates must not leak across splits
    splits = prepare_splits(_recipe(write_csv(tmp_path / "d.csv", rows)))
    sizes = [len(splits.train), len(splits.validation), len(splits.test)]
    assert sizes == [112, 24, 24]
    for part in (splits.train, splits.validation, splits.test):
        assert sum(r["label"] == "pos" for r in part) == len(part) // 2
    texts = [set(r["text"] for r in part) for part in (splits.train, splits.validation, splits.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert splits.labels == ["neg", "pos"]


def test_train_rows_repeating_test_rows_are_removed(tmp_path, sentiment_rows):
    train = write_csv(tmp_path / "train.csv", sentiment_rows)
    test = write_csv(tmp_path / "test.csv", sentiment_rows[:30])
    splits = prepare_splits(_recipe(train, test=str(test)))
    assert splits.report["files"]["train"]["duplicates_removed"] == 30
    assert not {r["text"] for r in splits.train} & {r["text"] for r in splits.test}


def test_sms_spam_tsv_without_header_and_alpaca_json(tmp_path):
    tsv = shared_data("sms_spam", "SMSSpamCollection.tsv")
    cfg = _recipe(tsv, columns=["label", "text"]).data
    loaded = load_file(str(tsv), "classification", cfg)
    assert loaded.read == 5574 and not loaded.rejects
    alpaca = shared_data("alpaca", "alpaca_merged.json")
    sft = load_recipe({"model": "tiny-llama", "task": "sft", "data": {
        "train": str(alpaca), "prompt_template": "{instruction}\n\n{input}", "response_column": "output"}})
    loaded = load_file(str(alpaca), "sft", sft.data)
    # SOURCE.md: record 284 has an empty output; it is the one reject, at the line its object starts.
    assert loaded.read == 1332 and len(loaded.examples) == 1331
    assert [(r.line, r.reason) for r in loaded.rejects] == [(1422, "empty text in field 'output'")]
    assert alpaca.read_text().splitlines()[1421].strip() == "{"
    assert loaded.examples[1].line == 7  # 2-space indented array: 4 fields + braces per record
    assert "\n\n\n" not in loaded.examples[0].fields["prompt"]
