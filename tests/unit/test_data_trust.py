"""Data input never crashes and every bad row is reported: held-out splits
from one file, empty splits, broken JSON records, blank lines, NULs, BOMs, path
errors, inspect's exit code, international phones and IPv6, and the full
read = kept + rejected + duplicates + removed identity."""

import json
import random
import subprocess
import sys

import pytest

from tuneforge.data import studio
from tuneforge.data.load import DataError, load_file
from tuneforge.data.pii import apply_pii, find_pii
from tuneforge.recipe import load_recipe

from conftest import write_csv


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(studio, "cache_dir", lambda: tmp_path / "prepared-cache")


def _recipe(train, **data):
    return load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": str(train), **data}})


WORDS = ("river stone quiet engine purple market winter lantern copper violin garden signal "
         "harbor meadow thunder pencil orchard velvet canyon marble falcon biscuit glacier tunnel").split()


def _sentence(i):
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(14)) + f" {i}"


def _rows(n, offset=0):
    """Distinct rows (no two near-duplicates), labels alternating."""
    return [{"text": _sentence(i + offset), "label": "pos" if i % 2 else "neg"} for i in range(n)]


def _cli(*args, cwd=None, home=None):
    """A real `tuneforge` process (for the end-to-end training run)."""
    import os

    env = {**os.environ, "TUNEFORGE_HOME": str(home)} if home is not None else None
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _invoke(*args):
    """The CLI in this process: (exit code, everything printed); an exception escaping is a traceback."""
    from typer.testing import CliRunner

    from tuneforge.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# ------------------------------------------- 1. one file as validation and test


def test_same_file_as_validation_and_test_keeps_both_and_warns(tmp_path):
    train = write_csv(tmp_path / "train.csv", _rows(60) + _rows(3, offset=1000))  # 3 rows repeat dev rows
    dev = write_csv(tmp_path / "dev.csv", _rows(20, offset=1000))
    logged = []
    splits = studio.prepare_data(_recipe(train, validation=str(dev), test=str(dev), near_dup={"enabled": True}),
                                 log=logged.append)
    assert len(splits.validation) == len(splits.test) == 20
    assert splits.validation == splits.test
    assert len(splits.train) == 60  # train rows repeating a held-out row still go
    assert not {r["text"] for r in splits.train} & {r["text"] for r in splits.test}
    warning = next(w for w in splits.report["warnings"] if "same" in w)
    assert "optimistic" in warning and any(warning in m for m in logged)
    files = splits.report["files"]
    assert files["validation"]["kept"] == files["test"]["kept"] == 20
    assert files["train"]["duplicates_removed"] == 3


def test_train_with_the_same_file_as_validation_and_test_runs(tmp_path):
    """The issue's command: it ended in IndexError inside the tokenizer."""
    write_csv(tmp_path / "train.csv", _rows(40))
    write_csv(tmp_path / "dev.csv", _rows(12, offset=500))
    (tmp_path / "r.yaml").write_text("model: tiny-bert\ntask: classification\ndata:\n  train: train.csv\n"
                                     "train:\n  epochs: 1\n  batch_size: 8\n")
    proc = _cli("train", "r.yaml", "data.train=train.csv", "data.validation=dev.csv", "data.test=dev.csv",
                "--output", str(tmp_path / "run"), "--quiet", cwd=tmp_path, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "optimistic" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] is not None


def test_a_held_out_file_emptied_by_preparation_is_a_clear_error(tmp_path):
    train = write_csv(tmp_path / "train.csv", _rows(40))
    test = write_csv(tmp_path / "test.csv", _rows(10, offset=100))
    val = write_csv(tmp_path / "val.csv", _rows(10, offset=100)[:5])  # every row repeats a test row
    with pytest.raises(DataError) as err:
        studio.prepare_data(_recipe(train, validation=str(val), test=str(test)))
    message = str(err.value)
    assert "val.csv" in message and "no rows left" in message and "duplicate 5" in message


def test_a_split_left_empty_by_data_split_warns_and_training_still_runs(tmp_path):
    from tuneforge import api

    train = write_csv(tmp_path / "train.csv", _rows(40))
    logged = []
    splits = studio.prepare_data(_recipe(train, split=[0.85, 0.15, 0.0]), log=logged.append)
    assert splits.test == [] and any("test split is empty" in w for w in splits.report["warnings"])
    assert any("test split is empty" in m for m in logged)
    result = api.train({"model": "tiny-bert", "task": "classification",
                        "data": {"train": str(train), "split": [0.85, 0.15, 0.0]},
                        "train": {"epochs": 1, "batch_size": 8}}, output=str(tmp_path / "run"), quiet=True)
    assert result["validation"] is not None
    # Evaluating the empty split later is one clear line (exit 3), not scikit-learn's "empty input array".
    code, out = _invoke("eval", str(tmp_path / "run"))
    assert code == 3 and "test split has no rows" in out and "--split validation" in out, out
    assert "Traceback" not in out


# --------------------------------------------------- 2. JSON arrays, JSONL blanks


def test_broken_records_in_a_json_array_are_rejected_one_by_one(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n'
        '  {"text": "good one", "label": "pos"},\n'      # 2 ok
        '  {"text": "bad" "label": "neg"},\n'            # 3 missing ':' / ','
        '  {"text": "fine again", "label": "neg"}\n'     # 4 ok, but no ',' after it
        '  {"text": "after a missing comma", "label": "pos"},\n'  # 5 rejected: no ',' before it
        '  {"text": "no closing brace", "label": "pos",\n'        # 6 never closed
        '  {"text": "still read", "label": "neg"},\n'    # 7 ok
        '  {"text": "trailing comma next", "label": "pos"},\n'    # 8 ok
        ']\n')
    cfg = _recipe(path, on_invalid="skip").data
    loaded = load_file(str(path), "classification", cfg)
    assert [e.fields["text"] for e in loaded.examples] == ["good one", "fine again", "still read",
                                                           "trailing comma next"]
    assert [r.line for r in loaded.rejects] == [3, 5, 6]
    assert all("unparsable JSON" in r.reason for r in loaded.rejects)
    assert loaded.read == 7


def test_a_truncated_json_array_keeps_the_records_before_the_cut(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "one", "label": "a"},\n{"text": "two", "label": "b"},\n{"text": "thr')
    loaded = load_file(str(path), "classification", _recipe(path).data)
    assert [e.fields["text"] for e in loaded.examples] == ["one", "two"]
    assert [(r.line, "unparsable JSON" in r.reason) for r in loaded.rejects] == [(4, True)]


def test_prepare_skips_a_broken_json_record_with_on_invalid_skip(tmp_path):
    rows = _rows(30)
    body = ",\n".join(json.dumps(r) for r in rows[:10]) + ',\n{"text": broken, "label": "pos"},\n' + \
        ",\n".join(json.dumps(r) for r in rows[10:])
    path = tmp_path / "d.json"
    path.write_text("[\n" + body + "\n]\n")
    splits = studio.prepare_data(_recipe(path, on_invalid="skip"))
    assert [str(r) for r in splits.rejects] == [f"{path}:12: unparsable JSON: Expecting value (column 10)"]
    assert splits.report["files"]["train"]["read"] == 31


def test_blank_lines_in_jsonl_are_counted_and_reported_like_csv(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in _rows(4)]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n   \n" + "\n".join(lines[2:]) + "\n")
    loaded = load_file(str(path), "classification", _recipe(path).data)
    assert len(loaded.examples) == 4
    assert [(r.line, r.reason) for r in loaded.rejects] == [(2, "empty line"), (4, "empty line")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nfirst,pos\n\nsecond,neg\n")
    csv_loaded = load_file(str(csv_path), "classification", _recipe(csv_path).data)
    assert [(r.line, r.reason) for r in csv_loaded.rejects] == [(3, "empty line")]


# ------------------------------------------------------------- 3. NUL and BOM


def test_text_with_a_nul_character_is_rejected_in_every_format(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text,label\nfine,pos\nnul \x00 inside,neg\n")
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text('{"text": "fine", "label": "pos"}\n{"text": "nul \\u0000 inside", "label": "neg"}\n')
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi\u0000"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    for path in (csv_path, jsonl_path):
        loaded = load_file(str(path), "classification", _recipe(path).data)
        assert [e.fields["text"] for e in loaded.examples] == ["fine"]
        assert [(r.line, r.reason) for r in loaded.rejects] == [(2 if path == jsonl_path else 3,
                                                                 "NUL character (\\x00) in field 'text'")]
    sft = load_recipe(
        {"model": "tiny-llama", "task": "sft", "data": {"train": str(chat), "messages_column": "messages"}}
    )
    loaded = load_file(str(chat), "sft", sft.data)
    assert not loaded.examples and "NUL character" in loaded.rejects[0].reason


def test_a_utf8_bom_is_stripped_in_jsonl_and_json(tmp_path):
    rows = _rows(3)
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    json_path = tmp_path / "d.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for path in (jsonl_path, json_path):
        loaded = load_file(str(path), "classification", _recipe(path).data)
        assert [e.fields["text"] for e in loaded.examples] == [r["text"] for r in rows] and not loaded.rejects


# ------------------------------------------------------------------ 4. inspect


def test_inspect_lists_malformed_rows_and_exits_like_train(tmp_path):
    path = tmp_path / "d.csv"
    body = "".join(f"row {i} fine,{'pos' if i % 2 else 'neg'}\n" if i % 3 else "only one field\n" for i in range(75))
    path.write_text("text,label\n" + body)
    code, out = _invoke("data", "inspect", str(path), "-o", str(tmp_path / "report.html"))
    assert code == 3, out
    bad_lines = [i + 2 for i in range(75) if i % 3 == 0]
    assert len(bad_lines) == 25
    for line in bad_lines[:20]:
        assert f"{path}:{line}: expected 2 fields" in out
    assert f"{path}:{bad_lines[20]}:" not in out and "and 5 more" in out
    rejects = [json.loads(x) for x in (tmp_path / "report.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == bad_lines
    assert (tmp_path / "report.html").is_file()  # the report is still written


@pytest.mark.parametrize("content,fragment", [("", "is empty"), ("text,label\n", "header but no rows"),
                                              ("\n\n", "is empty")])
def test_a_file_without_rows_gets_a_hint_that_fits(tmp_path, content, fragment):
    path = tmp_path / "d.csv"
    path.write_text(content)
    code, out = _invoke("data", "inspect", str(path), "-o", str(tmp_path / "report.html"))
    assert code == 3 and fragment in out and "data.kind" not in out, out


def test_inspect_of_a_recipe_with_on_invalid_skip_exits_zero(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(30))
                    + "broken line\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-bert\ntask: classification\ndata:\n  train: {path}\n  on_invalid: skip\n")
    code, out = _invoke("data", "inspect", str(recipe), "-o", str(tmp_path / "report.html"))
    assert code == 0, out
    assert f"{path}:32: expected 2 fields" in out


# --------------------------------------------------------------- 5. data paths


def _problem_paths(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "adir.csv").mkdir()
    (tmp_path / "u16.csv").write_bytes("text,label\nhello,pos\nbye,neg\n".encode("utf-16"))
    (tmp_path / "latin1.csv").write_bytes("texte,étiquette\ncafé,pos\n".encode("latin-1"))
    return {"loop1": "symlink loop", "adir.csv": "is a directory", "u16.csv": "UTF-16",
            "latin1.csv": "not valid UTF-8"}


def test_every_data_path_error_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "train.csv", _rows(20))
    (tmp_path / "r.yaml").write_text("model: tiny-bert\ntask: classification\ndata:\n  train: train.csv\n")
    for name, fragment in _problem_paths(tmp_path).items():
        for cmd in (
            ["data", "prepare", "r.yaml", f"data.train={name}"],
            ["train", "r.yaml", f"data.test={name}", "--output", f"run-{name}"],
            ["data", "inspect", name],
        ):
            code, out = _invoke(*cmd)
            assert code in (2, 3) and fragment in out, (cmd, out)


def test_rows_in_another_encoding_get_a_hint(tmp_path):
    from tuneforge.data.splits import InvalidRows

    path = tmp_path / "d.csv"
    rows = [f"{'caf' + chr(233) if i % 3 == 0 else 'plain'} row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(12)]
    path.write_bytes(b"text,label\n" + "".join(rows).encode("latin-1"))
    with pytest.raises(InvalidRows) as err:
        studio.prepare_data(_recipe(path))
    assert f"{path}:2: invalid UTF-8" in str(err.value) and "probably in another encoding" in str(err.value)
    path.write_bytes(b"text,label\n" + "".join(rows[::3]).encode("latin-1"))  # no row readable at all
    with pytest.raises(DataError, match="probably in another encoding"):
        studio.prepare_data(_recipe(path))


def test_an_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    import builtins

    path = write_csv(tmp_path / "d.csv", _rows(20))
    recipe = _recipe(path)
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(DataError, match="cannot be read: Permission denied"):
        load_file(str(path), "classification", recipe.data)
    with pytest.raises(DataError, match="cannot be read: Permission denied"):
        studio.prepare_data(recipe)
    from tuneforge.recipe import RecipeError

    with pytest.raises(RecipeError, match="cannot be read: Permission denied"):
        _recipe(path)


# ---------------------------------------------------------------------- 6. PII


def test_pii_finds_international_phones_and_ipv6():
    text = ("UK +44 7700 900123, France +33 6 12 34 56 78, Berlin +49 30 123456, "
            "hosts 2001:db8:85a3::8a2e:370:7334 and fe80::1 and ::ffff:192.0.2.128.")
    masked, counts = apply_pii(text, {"phone": "mask", "ip": "mask"})
    assert masked == "UK <PHONE>, France <PHONE>, Berlin <PHONE>, hosts <IP> and <IP> and <IP>."
    assert counts == {"phone": 3, "ip": 3}
    # Look-alikes stay: times, MAC addresses, C++ scopes, dates, short numbers, a failed Luhn check.
    for clean in ("at 12:30:45 sharp", "mac 00:1A:2B:3C:4D:5E", "std::vector<int> a::b", "on 2021-03-03",
                  "dates 12/03/2021 and 03.12.2021", "order 12345 of 678", "card 4111 1111 1111 1112"):
        assert find_pii(clean) == [], clean
    assert [k for k, _, _ in find_pii("card 4111 1111 1111 1111 or +1 415 555 0100")] == ["card", "phone"]


# ---------------------------------------------- 7. read = kept + rejected + ...


def test_every_removal_kind_adds_up_per_file(tmp_path):
    from tuneforge.data.review import text_sha

    sentence = _sentence
    train = [{"text": sentence(i), "label": "a" if i % 3 else "b"} for i in range(90)]
    test = [{"text": sentence(1000 + i), "label": "a" if i % 2 else "b"} for i in range(20)]
    train += [dict(train[1]), dict(train[2])]                                 # 2 exact duplicates
    train += [{"text": train[5]["text"] + " !", "label": "a"}]                # 1 near-duplicate
    train += [{"text": test[3]["text"] + " .", "label": "a"}]                 # 1 contamination
    train += [{"text": "<b></b>", "label": "a"}, {"text": "x" * 400, "label": "b"}, {"text": "ab", "label": "a"}]
    train += [{"text": "someone@example.com", "label": "b"}]                  # empty after PII removal
    train_path = write_csv(tmp_path / "train.csv", train)
    with open(train_path, "a") as fh:
        fh.write("one field only\n")                                        # 1 malformed, skipped
    test_path = write_csv(tmp_path / "test.csv", test)
    decisions = {
        "train.csv:10": {"decision": "drop", "sha": text_sha({"text": train[8]["text"], "label": train[8]["label"]})},
        "test.csv:4": {"decision": "drop"},
    }
    (tmp_path / "decisions.json").write_text(json.dumps({"decisions": decisions}))
    recipe = _recipe(
        train_path,
        test=str(test_path),
        on_invalid="skip",
        review_decisions=str(tmp_path / "decisions.json"),
        clean={"strip_html": True, "min_chars": 5, "max_chars": 300},
        pii={"email": "remove"},
        near_dup={"enabled": True},
        max_rows=70,
        balance="undersample",
    )
    splits = studio.prepare_data(recipe)
    files = splits.report["files"]
    removed = files["train"]["removed"]
    assert files["train"]["rejected"] == 1 and files["train"]["duplicates_removed"] == 2
    for reason in ("review_drop", "empty_after_cleaning", "too_long", "too_short", "empty_after_pii_removal",
                   "near_duplicate", "contamination", "max_rows", "undersampled"):
        assert removed.get(reason, 0) >= 1, (reason, removed)
    assert files["test"]["removed"] == {"review_drop": 1}
    for split, info in files.items():
        assert info["read"] == info["kept"] + info["rejected"] + info["duplicates_removed"] + sum(
            info["removed"].values()), (split, info)
    assert files["train"]["read"] == len(train) + 1
    # kept = the file's rows in the prepared splits (train and the validation carved from it)
    assert files["train"]["kept"] == len(splits.train) + len(splits.validation)
    assert files["test"]["kept"] == len(splits.test) == 19
    labels = [r["label"] for r in splits.train]
    assert labels.count("a") == labels.count("b")
