"""The data studio: cleaning, PII, near-duplicates, contamination, balance,
augmentation, formats, cache, label issues, preview and human review."""

import csv
import json
import random

import pytest

from tuneforge.data import studio
from tuneforge.data.clean import encoding_anomalies, handle_urls, make_cleaner, nfkc, normalise_whitespace, strip_html
from tuneforge.data.load import DataError
from tuneforge.data.neardup import NearDuplicates
from tuneforge.data.pii import apply_pii, find_pii, luhn_valid
from tuneforge.recipe import CleanConfig, load_recipe

from conftest import shared_data, write_csv, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Prepared data goes to a per-test cache, not the user's."""
    monkeypatch.setattr(studio, "cache_dir", lambda: tmp_path / "prepared-cache")


def _recipe(train, task="classification", model=None, **data):
    model = model or ("tiny-bert" if task == "classification" else "tiny-llama")
    return load_recipe({"model": model, "task": task, "data": {"train": str(train), **data}})


def _check_books(report):
    """in + added = out + removed for every step, overall and per split."""
    for step in report["steps"]:
        assert step["in"] + step.get("added", 0) == step["out"] + sum(step["removed"].values()), step
        for split, e in step.get("by_split", {}).items():
            assert e["in"] + e.get("added", 0) == e["out"] + sum(e["removed"].values()), (step["step"], split)
    for info in report["files"].values():
        assert info["read"] == info["kept"] + info["rejected"] + info["duplicates_removed"] + sum(
            info["removed"].values())


def _sentences(n, seed=0):
    rng = random.Random(seed)
    words = ("river stone quiet engine purple market winter lantern copper violin garden signal "
             "harbor meadow thunder pencil orchard velvet canyon marble falcon biscuit glacier tunnel").split()
    return [" ".join(rng.choice(words) for _ in range(14)) + f" {i}" for i in range(n)]


# ------------------------------------------------------------------ cleaning


def test_each_cleaning_step_exact():
    assert nfkc("ﬁne Ｆｕｌｌ ①") == "fine Full 1"
    assert normalise_whitespace("  a \t b\u00a0 c \r\n\n\n\nd  ") == "a b c\n\nd"
    assert normalise_whitespace("def f():\n    return  1   \n\tpass") == "def f():\n    return 1\n\tpass"
    assert strip_html("<p>Fish &amp; chips</p><script>alert(1)</script><div>now<br>later</div>") == \
        "Fish & chips\nnow\nlater\n"
    assert handle_urls("see https://example.com/a?b=1. or www.x.org!", "mask") == "see <URL>. or <URL>!"
    assert handle_urls("see https://example.com/a?b=1. or www.x.org!", "remove") == "see . or !"
    assert handle_urls("see https://example.com", "keep") == "see https://example.com"
    everything = make_cleaner(CleanConfig(strip_html=True, urls="mask", lowercase=True))
    assert everything("<b>Ｈｅｌｌｏ</b>   See  HTTPS://X.COM/Page\n\n\n\nBye ") == "hello see <url>\n\nbye"
    default = make_cleaner(CleanConfig())
    assert default("<b>Ｈｅｌｌｏ</b>  Wörld ") == "<b>Hello</b> Wörld"  # no HTML stripping, case kept
    assert encoding_anomalies("cafÃ© ok") == ["mojibake"]
    assert encoding_anomalies("a\u200bb") == ["zero_width"]
    assert encoding_anomalies("bad \ufffd byte") == ["replacement_char"]
    assert encoding_anomalies("plain é text") == []


def test_cleaning_and_length_filters_in_prepare(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in [
        ("Good   movie", "pos"), ("good movie", "neg"), ("   ", "pos"), ("x", "neg"), ("a" * 50, "pos"),
        ("fine film here", "neg"), ("<i>tags only</i>", "pos"), ("another decent one", "neg"),
    ] * 1] + [{"text": f"row number {i}", "label": "pos" if i % 2 else "neg"} for i in range(12)]
    path = write_csv(tmp_path / "d.csv", rows)
    recipe = _recipe(path, on_invalid="skip", clean={"lowercase": True, "strip_html": True, "min_chars": 2,
                                                     "max_chars": 40})
    splits = studio.prepare_data(recipe)
    report = splits.report
    _check_books(report)
    clean = next(s for s in report["steps"] if s["step"] == "clean")
    assert clean["removed"] == {"too_short": 1, "too_long": 1}
    assert report["files"]["train"]["rejected"] == 1  # the whitespace-only text, at load
    dedup = next(s for s in report["steps"] if s["step"] == "exact_dedup")
    assert dedup["removed"] == {"duplicate": 1}  # "Good   movie" == "good movie" after cleaning
    texts = {r["text"] for part in (splits.train, splits.validation, splits.test) for r in part}
    assert "tags only" in texts and "good movie" in texts and len(texts) == 20 - 1 - 2 - 1


# ----------------------------------------------------------------------- PII


def test_pii_masks_planted_values_and_leaves_lookalikes():
    text = ("Mail bob.smith@example.com or call +1 (555) 123-4567 / 020 7946 0958. Card 4111 1111 1111 1111, "
            "typo card 4111 1111 1111 1112. Server 192.168.0.1, not 999.1.1.1 nor version 1.2.3.4.5. "
            "Born 2021-03-03, order 12345, user@localhost.")
    masked, counts = apply_pii(text, {"email": "mask", "card": "mask", "ip": "mask", "phone": "mask"})
    assert masked == ("Mail <EMAIL> or call <PHONE> / <PHONE>. Card <CARD>, typo card 4111 1111 1111 1112. "
                      "Server <IP>, not 999.1.1.1 nor version 1.2.3.4.5. Born 2021-03-03, order 12345, "
                      "user@localhost.")
    assert counts == {"email": 1, "phone": 2, "card": 1, "ip": 1}
    removed, _ = apply_pii("write to a@b.org now", {"email": "remove"})
    assert removed == "write to  now"
    kept, counts = apply_pii(text, {"email": "keep", "card": "mask"})
    assert "bob.smith@example.com" in kept and counts == {"card": 1}
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert [k for k, _, _ in find_pii("card 4111-1111-1111-1111 phone 555-123-4567")] == ["card", "phone"]


def test_pii_step_in_prepare_counts(tmp_path):
    rows = [{"text": f"contact me at user{i}@mail.com please" if i < 4 else f"nothing personal {i}",
             "label": "a" if i % 2 else "b"} for i in range(20)]
    splits = studio.prepare_data(_recipe(write_csv(tmp_path / "d.csv", rows), pii={"email": "mask"}))
    step = next(s for s in splits.report["steps"] if s["step"] == "pii")
    assert step["changed"] == {"email": 4} and step["in"] == step["out"] == 20
    texts = [r["text"] for part in (splits.train, splits.validation, splits.test) for r in part]
    # Masked before de-duplication: four rows that differ only in the address become one.
    assert sum(t == "contact me at <EMAIL> please" for t in texts) == 1
    assert next(s for s in splits.report["steps"] if s["step"] == "exact_dedup")["removed"] == {"duplicate": 3}
    assert not any("@" in t for t in texts)


# ---------------------------------------------------------- near-duplicates


def test_neardup_finds_planted_near_duplicates_and_leaves_distinct_rows():
    texts = _sentences(300)
    planted = {}
    for k, i in enumerate(range(0, 60, 6)):  # 10 planted copies with one small edit each
        copy = texts[i].replace(texts[i].split()[3], texts[i].split()[3].upper() + "s", 1) + " !"
        planted[len(texts)] = i
        texts.append(copy)
    nd = NearDuplicates(threshold=0.7).fit(texts)
    clusters = nd.clusters()
    assert sorted(tuple(c) for c in clusters) == sorted((i, j) for j, i in planted.items())
    assert len(nd.signatures_) == 310


def test_contamination_between_planted_train_and_test_rows(tmp_path):
    base = _sentences(120, seed=3)
    test_rows = [{"text": t, "label": "a" if i % 2 else "b"} for i, t in enumerate(base[:30])]
    train_rows = [{"text": t, "label": "a" if i % 2 else "b"} for i, t in enumerate(base[30:])]
    # 5 training rows are near-copies of test rows; 3 are near-copies of other training rows.
    train_rows += [{"text": base[i] + " again", "label": "a"} for i in (0, 4, 8, 12, 16)]
    train_rows += [{"text": base[40 + i].replace(" ", "  ") + " too", "label": "b"} for i in (0, 1, 2)]
    recipe = _recipe(
        write_csv(tmp_path / "train.csv", train_rows),
        test=str(write_csv(tmp_path / "test.csv", test_rows)),
        near_dup={"enabled": True},
    )
    splits = studio.prepare_data(recipe)
    _check_books(splits.report)
    step = next(s for s in splits.report["steps"] if s["step"] == "near_dup")
    assert step["by_split"]["train"]["removed"] == {"contamination": 5, "near_duplicate": 3}
    assert step["by_split"]["test"]["removed"] == {}
    assert len(splits.test) == 30
    assert not any(r["text"].endswith(" again") for r in splits.train + splits.validation)
    assert splits.report["files"]["train"]["removed"] == {"contamination": 5, "near_duplicate": 3}


# ------------------------------------------------------- balance / augment


@pytest.fixture
def imbalanced_csv(tmp_path):
    rows = [{"text": f"alpha sample {i}", "label": "a"} for i in range(60)]
    rows += [{"text": f"beta sample {i}", "label": "b"} for i in range(20)]
    return write_csv(tmp_path / "imb.csv", rows)


@pytest.mark.parametrize("mode,expected", [("class_weights", {"a": 42, "b": 14}), ("oversample", {"a": 42, "b": 42}),
                                           ("undersample", {"a": 14, "b": 14})])
def test_balance_modes(imbalanced_csv, mode, expected):
    splits = studio.prepare_data(_recipe(imbalanced_csv, balance=mode))
    _check_books(splits.report)
    counts = {lab: sum(r["label"] == lab for r in splits.train) for lab in ("a", "b")}
    assert counts == expected
    assert splits.report["splits"]["test"]["labels"] == {"a": 9, "b": 3}  # held-out splits untouched
    if mode == "class_weights":
        weights = {r["label"]: r["weight"] for r in splits.train}
        assert weights == pytest.approx({"a": 56 / (2 * 42), "b": 56 / (2 * 14)})
        assert all("weight" not in r for r in splits.validation + splits.test)
    else:
        assert all("weight" not in r for r in splits.train)
    # Every row is its own dict: trainers edit rows in place (pair joining, reweighing).
    assert len({id(r) for r in splits.train}) == len(splits.train)


def test_counterfactual_augmentation_swaps_terms_in_train_only(tmp_path):
    rows = [{"text": "He said his work was done", "label": "x", "group": "male"},
            {"text": "She is a great mother", "label": "y", "group": "female"},
            {"text": "The weather is fine", "label": "x", "group": "none"}] * 1
    rows += [{"text": f"neutral line number {i}", "label": "x" if i % 2 else "y", "group": "none"} for i in range(10)]
    test = write_csv(tmp_path / "test.csv", [{"text": "he is here", "label": "x", "group": "male"},
                                             {"text": "it is here", "label": "y", "group": "none"}])
    recipe = _recipe(
        write_csv(tmp_path / "d.csv", rows),
        test=str(test),
        keep_columns=["group"],
        augment={"counterfactual": True, "lexicons": ["gender"]},
    )
    splits = studio.prepare_data(recipe)
    _check_books(splits.report)
    step = next(s for s in splits.report["steps"] if s["step"] == "augment")
    assert step["added"] == 2 and step["counterfactual"] == {"gender": 2}
    copies = splits.train[-2:]
    assert copies == [{"text": "She said her work was done", "label": "x", "group": "female"},
                      {"text": "He is a great father", "label": "y", "group": "male"}]
    assert [r["text"] for r in splits.test] == ["he is here", "it is here"]
    assert splits.ids["train"][-2:] == ["d.csv:2+gender", "d.csv:3+gender"]


# ------------------------------------------------------------------ formats


def test_formats_are_detected_and_mapped(tmp_path):
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]}] * 1 + [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(12)])
    splits = studio.prepare_data(_recipe(sharegpt, task="sft"))
    assert splits.kind == "chat" and "ShareGPT" in splits.report["kind_detected_from"]
    everything = splits.train + splits.validation + splits.test
    assert {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]} in everything

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Do {i}", "input": "ctx" if i % 2 else "", "output": f"done {i}"}
                                  for i in range(12)]))
    splits = studio.prepare_data(_recipe(alpaca, task="sft"))
    assert splits.kind == "prompt_response"
    everything = splits.train + splits.validation + splits.test
    assert {"prompt": "Do 1\n\nctx", "response": "done 1"} in everything
    assert {"prompt": "Do 2", "response": "done 2"} in everything

    pairs = write_csv(tmp_path / "pairs.csv", [{"text": f"premise {i}", "text_pair": f"hypothesis {i}",
                                                "label": "yes" if i % 2 else "no"} for i in range(20)])
    splits = studio.prepare_data(_recipe(pairs))
    assert splits.kind == "pair" and set(splits.train[0]) == {"text", "text_pair", "label"}
    same_premise = write_csv(tmp_path / "pairs2.csv", [{"text": "one premise", "text_pair": f"hypothesis {i}",
                                                        "label": "yes" if i % 2 else "no"} for i in range(20)])
    splits = studio.prepare_data(_recipe(same_premise))
    assert sum(len(p) for p in (splits.train, splits.validation, splits.test)) == 20  # pairs differ: no duplicates
    # The classification trainer joins a pair around the separator: the pair layout.
    from tuneforge.data.splits import Splits
    from tuneforge.trainers.classification import join_pairs

    tok = studio.load_tokenizer("tiny-bert")
    joined = Splits([{"text": "a cat", "text_pair": "a dog", "label": "no"}], [], [], ["no", "yes"])
    join_pairs(tok, joined)
    assert tok.decode(tok(joined.train[0]["text"])["input_ids"]) == "[CLS] a cat [SEP] a dog [SEP]"

    weird = write_jsonl(tmp_path / "weird.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=r"cannot tell the data kind from the columns 'foo', 'bar'"):
        studio.prepare_data(_recipe(weird, task="sft"))
    with pytest.raises(DataError, match="does not suit task 'sft'"):
        studio.prepare_data(_recipe(pairs, task="sft", kind="pair"))


def test_raw_text_is_chunked_into_max_length_blocks(tmp_path):
    docs = [{"text": " ".join(f"word{j}" for j in range(30 + i))} for i in range(10)]
    recipe = load_recipe({"model": "tiny-llama", "task": "sft", "train": {"max_length": 32},
                          "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", docs))}})
    splits = studio.prepare_data(recipe)
    assert splits.kind == "text"
    tok = studio.load_tokenizer("tiny-llama")
    for split in ("train", "validation", "test"):
        stream = []
        for r in getattr(splits, split):
            stream += tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        blocks = splits.blocks[split]
        assert all(len(b) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 32
        assert [t for b in blocks for t in b] == stream
    # The preview shows the blocks as trained: every token but a block's first carries loss, EOS marked.
    from tuneforge.data.preview import build_block_preview

    p = build_block_preview(tok, splits.blocks["train"], n=2)
    stream = [t for b in splits.blocks["train"] for t in b]
    eos_blocks = {i // 32 for i, t in enumerate(stream) if t == tok.eos_token_id and i % 32}
    assert p.warnings == [] and p.eos_trained == len(eos_blocks) > 0 and p.checked == len(splits.blocks["train"])
    first = p.samples[0].tokens
    assert [t.id for t in first] == splits.blocks["train"][0] and [t.loss for t in first] == [False] + [True] * 31
    assert "".join(t.text for t in first) == tok.decode(splits.blocks["train"][0])
    assert [t.eos for t in first] == [t == tok.eos_token_id for t in splits.blocks["train"][0]]


def test_hh_rlhf_transcripts_become_preference_pairs():
    raw = shared_data("hh_rlhf_harmless", "harmless_base_test.jsonl")
    pcr = shared_data("hh_rlhf_harmless", "harmless_base_test_pcr.jsonl")
    recipe = _recipe(raw, task="dpo", on_invalid="skip", dedup=False, split=[1.0, 0.0, 0.0])
    rows, files, rejects, _ = studio.load_rows(recipe.data, "preference")
    assert files["train"]["read"] == 2312 and len(rows["train"]) == 2307  # SOURCE.md: 5 prefixes differ
    assert sum(r.fields["chosen"] == "" for r in rows["train"]) == 4  # silence preferred: kept
    assert {r.reason for r in rejects} == {"chosen and rejected transcripts differ before the final Assistant turn"}
    derived = [json.loads(x) for x in pcr.read_text().splitlines()[:50]]
    assert [r.fields for r in rows["train"][:50]] == derived
    splits = studio.prepare_data(_recipe(pcr, task="dpo", max_rows=300))
    with pytest.raises(DataError, match="does not suit task 'sft'.*preference data trains with task: reward, dpo"):
        studio.prepare_data(_recipe(pcr, task="sft", max_rows=300))
    assert splits.kind == "preference" and "prompt/chosen/rejected" in splits.report["kind_detected_from"]
    _check_books(splits.report)
    assert set(splits.train[0]) == {"prompt", "chosen", "rejected"}


# ------------------------------------------------------------ cache / report


def test_prepare_is_cached_by_content(tmp_path, sentiment_rows):
    path = write_csv(tmp_path / "d.csv", sentiment_rows)
    recipe = _recipe(path, keep_columns=[])
    first = studio.prepare_data(recipe)
    assert first.report["cache"]["hit"] is False
    _check_books(first.report)
    again = studio.prepare_data(recipe)
    assert again.report["cache"]["hit"] is True
    for split in ("train", "validation", "test"):
        assert getattr(again, split) == getattr(first, split)
    assert again.ids == first.ids and again.n_tokens == first.n_tokens and again.labels == first.labels
    assert again.n_tokens["train"] and again.report["steps"] == first.report["steps"]
    changed = studio.prepare_data(_recipe(path, clean={"lowercase": True}))
    assert changed.report["cache"]["hit"] is False
    path.write_text(path.read_text() + "one more row,pos\n")
    assert studio.prepare_data(recipe).report["cache"]["hit"] is False


def test_keep_columns_survive_cleaning_and_parquet(tmp_path):
    rows = [{"text": f"Text  number {i}", "label": "a" if i % 2 else "b", "group": ["g1", "g2"][i % 2],
             "age": 20 + i} for i in range(20)]
    recipe = _recipe(write_csv(tmp_path / "d.csv", rows), keep_columns=["group"])
    first = studio.prepare_data(recipe)
    cached = studio.prepare_data(recipe)
    assert cached.train == first.train
    assert all(set(r) == {"text", "label", "group"} for r in cached.train)
    assert {r["text"]: r["group"] for r in cached.train} == {
        f"Text number {i}": ["g1", "g2"][i % 2] for i in range(20) if f"Text number {i}" in
        {x["text"] for x in cached.train}}


# ------------------------------------------------------------- label issues


def test_label_issue_finder_ranks_flipped_labels_first():
    from tuneforge.data.labelissues import LabelIssues

    rng = random.Random(1)
    good = "great wonderful superb lovely excellent delightful".split()
    bad = "awful terrible dreadful boring poor horrible".split()
    texts, labels = [], []
    for i in range(240):
        pos = i % 2 == 0
        texts.append(f"the film was {rng.choice(good if pos else bad)} and {rng.choice(good if pos else bad)}")
        labels.append("pos" if pos else "neg")
    flipped = [3, 10, 51, 88, 120, 177, 200, 231]
    for i in flipped:
        labels[i] = "neg" if labels[i] == "pos" else "pos"
    li = LabelIssues(seed=0).fit(texts, labels)
    assert set(li.ranking_[:8].tolist()) == set(flipped)
    assert set(li.flagged(0.5)) == set(flipped)


# ------------------------------------------------------------------ preview


@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m-instruct"])
def test_preview_marks_loss_tokens(model, dates_jsonl):
    from tuneforge.data.preview import build_preview, to_html

    tok = studio.load_tokenizer(model)
    rows = [{"prompt": "Rewrite 9-FEB-1974 as ISO", "response": "1974-02-09"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]}]
    p = build_preview(tok, rows, "chat", None, 256, n=2)
    assert p.warnings == [] and p.eos_trained == 2 and p.template["generation_marker"] == "<|im_start|>assistant\n"
    trained = "".join(t.text for t in p.samples[0].tokens if t.loss)
    assert trained == "1974-02-09<|im_end|>"
    assert "".join(t.text for t in p.samples[1].tokens if t.loss) == "Hello there<|im_end|>Goodbye<|im_end|>"
    assert p.samples[0].tokens[-1].eos is False or p.samples[0].tokens[-1].loss  # a trailing newline is masked
    page = to_html(p, 256)
    assert '<span class="eos loss"' in page and '<span class="mask"' in page and "http" not in page

    short = build_preview(tok, rows, "chat", None, 12, n=1)
    assert short.samples[0].truncated and any("truncated" in w for w in short.warnings)
    assert any("EOS" in w for w in short.warnings)  # cut before the response's EOS
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    plain = build_preview(tok, rows[:1], "chat", None, 256)
    assert any("no generation marker" in w for w in plain.warnings)


# ------------------------------------------------------------ human review


def test_review_round_trip_applies_decisions_exactly(tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    rng = random.Random(2)
    rows = []
    for i, filler in enumerate(_sentences(80, seed=9)):
        pos = i % 2 == 0
        word = rng.choice(["great", "lovely", "superb"] if pos else ["awful", "dreadful", "boring"])
        rows.append({"text": f"{word} {filler} {word}", "label": "pos" if pos else "neg"})
    rows[7]["label"] = "pos"  # a planted label error (text says 'neg')
    rows.append({"text": rows[20]["text"], "label": rows[20]["label"]})  # an exact duplicate, line 82
    rows.append({"text": "call me on +44 20 7946 0958", "label": "pos"})  # PII, line 83
    data = write_csv(tmp_path / "d.csv", rows)
    held = _sentences(20, seed=10)
    val = write_csv(
        tmp_path / "v.csv", [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(held[:10])]
    )
    test = write_csv(
        tmp_path / "t.csv", [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(held[10:])]
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-bert\ntask: classification\ndata:\n  train: {data}\n  validation: {val}\n"
                      f"  test: {test}\n")
    runner = CliRunner()
    out = tmp_path / "review.csv"
    result = runner.invoke(app, ["data", "review", "export", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    exported = list(csv.DictReader(out.open()))
    by_id = {r["id"]: r for r in exported}
    assert "label_issue" in by_id["d.csv:9"]["reasons"] and by_id["d.csv:9"]["suggested_label"] == "neg"
    assert by_id["d.csv:82"]["reasons"] == "exact_duplicate" and by_id["d.csv:82"]["duplicate_of"] == "d.csv:22"
    assert "pii:phone" in by_id["d.csv:83"]["reasons"].split(";")

    by_id["d.csv:9"].update(decision="relabel", new_label="neg")
    by_id["d.csv:83"].update(decision="drop")
    by_id["d.csv:82"].update(decision="keep")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(exported[0]))
        writer.writeheader()
        writer.writerows(exported)
    decisions = tmp_path / "decisions.json"
    result = runner.invoke(app, ["data", "review", "apply", str(out), "--recipe", str(recipe), "-o", str(decisions)])
    assert result.exit_code == 0, result.output
    assert "keep 1, drop 1, relabel 1" in result.output

    splits = studio.prepare_data(load_recipe(recipe, [f"data.review_decisions={decisions}"]))
    step = next(s for s in splits.report["steps"] if s["step"] == "review")
    assert step["decisions"] == {"kept": 1, "dropped": 1, "relabelled": 1, "stale": 0, "not_found": 0}
    assert step["removed"] == {"review_drop": 1}
    _check_books(splits.report)
    everything = {i: r for s in ("train", "validation", "test") for i, r in zip(splits.ids[s], getattr(splits, s))}
    assert "d.csv:83" not in everything and everything["d.csv:9"]["label"] == "neg"
    assert "d.csv:82" not in everything  # kept by review, then removed by exact dedup as before

    # Bad decisions are all reported, with csv:line, and nothing is written.
    bad = tmp_path / "bad.csv"
    bad.write_text("id,decision,new_label\nd.csv:9,relabel,\nd.csv:10,maybe,\nd.csv:11,relabel,meh\nd.csv:12,drop,\n")
    result = runner.invoke(
        app, ["data", "review", "apply", str(bad), "--recipe", str(recipe), "-o", str(tmp_path / "x.json")]
    )
    assert result.exit_code == 3
    for fragment in (f"{bad}:2: decision 'relabel' needs a new_label", f"{bad}:3: decision 'maybe' is not one of",
                     f"{bad}:4: new_label 'meh' is not a known label"):
        assert fragment in result.output
    assert not (tmp_path / "x.json").exists()


def test_review_csv_is_spreadsheet_safe_and_errors_name_the_first_line_of_a_record(tmp_path):
    from tuneforge.data.review import export_review, parse_review
    from tuneforge.data.studio import Row

    rows = [Row("d.csv:2", {"text": "=HYPERLINK(\"http://x\")", "label": "-1"}),
            Row("d.csv:3", {"text": "two\nlines", "label": "@a"})]
    report = {"flags": {r.id: {"split": "train", "row": r, "reasons": ["pii:email"], "score": None} for r in rows}}
    out = tmp_path / "review.csv"
    assert export_review(report, out) == 2
    exported = list(csv.DictReader(out.open(newline="")))
    assert [(r["text"], r["label"]) for r in exported] == [("'=HYPERLINK(\"http://x\")", "-1"), ("two\nlines", "'@a")]
    exported[0]["decision"], exported[1]["decision"] = "drop", "maybe"
    exported[0]["text"] = "edited\nover\nthree lines"  # the record now spans lines 2-4
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(exported[0]))
        writer.writeheader()
        writer.writerows(exported)
    with pytest.raises(DataError) as err:
        parse_review(out)
    assert f"{out}:5: decision 'maybe'" in str(err.value)


def test_html_reports_escape_the_data(tmp_path):
    """Row text, labels and group names are data: every HTML report escapes them."""
    from tuneforge.data.inspect import analyse, write_html
    from tuneforge.data.preview import Preview, Sample, Token, to_html
    from tuneforge.data.studio import Row
    from tuneforge.fairness.audit import GroupAudit
    from tuneforge.fairness.render import audit_page

    evil = "<script>alert(1)</script>"
    rows = {"train": [Row(f"d.csv:{i}", {"text": f"{evil} number {i}", "label": evil if i % 2 else "ok"})
                      for i in range(12)]}
    report = analyse(rows, [], "classification")
    report.update(source=evil, kind_detail=evil, tokenizer=None)
    page = write_html(report, tmp_path / "r.html", evil).read_text()
    page += to_html(Preview([Sample(0, [Token(1, evil, True, False)], False, 1, label=evil)]), 8, evil)
    audit = GroupAudit(n_boot=0).fit(["1", "0"] * 4, ["1", "1"] * 4, {"g": [evil, "b"] * 4}, labels=["0", "1"])
    page += audit_page(
        {"audit": audit.results_, "target": evil, "gate": audit.score({"equalized_odds_difference": 0.1})},
        evil,
        tmp_path,
    )[0]
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# -------------------------------------------------------------- commands


def test_inspect_writes_self_contained_report(tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    base = _sentences(60, seed=5)
    train = [{"text": t, "label": "a" if i % 3 else "b"} for i, t in enumerate(base[:50])]
    train += [{"text": base[0], "label": "b"}, {"text": "mail me: x.y@z.com", "label": "a"},
              {"text": base[55] + " again", "label": "a"}, {"text": "", "label": "a"}]
    test = [{"text": t, "label": "a" if i % 2 else "b"} for i, t in enumerate(base[50:])]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: tiny-bert\ntask: classification\ndata:\n  train: {write_csv(tmp_path / 'tr.csv', train)}\n"
        f"  test: {write_csv(tmp_path / 'te.csv', test)}\n  validation: {tmp_path / 'te.csv'}\n"
    )
    html_path = tmp_path / "out" / "data_report.html"
    result = CliRunner().invoke(app, ["data", "inspect", str(recipe), "-o", str(html_path)])
    # The empty text is a malformed row: listed as file:line, and exit 3 as train would stop.
    assert result.exit_code == 3 and f"{tmp_path / 'tr.csv'}:55: empty text" in result.output, result.output
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 3 and "http://" not in page and "https://" not in page
    report = json.loads(html_path.with_suffix(".json").read_text())
    train_info = report["splits"]["train"]
    assert train_info["rows"] == 53 and train_info["exact_duplicates"] == 1 and train_info["pii"] == {"email": 1}
    assert train_info["labels"] == {"a": 35, "b": 18} and train_info["imbalance_ratio"] == round(35 / 18, 3)
    assert report["rejects"] == {"empty_or_missing": 1}
    assert report["contamination"]["train_rows"] == 1
    # Short sentences: none truncated at max_length 256; at max_length 8 every row over 8 tokens is.
    assert train_info["truncated"] == 0 and train_info["truncated_share"] == 0.0 and "tokens median" in result.output
    short = tmp_path / "out8" / "data_report.html"
    CliRunner().invoke(app, ["data", "inspect", str(recipe), "train.max_length=8", "-o", str(short)])
    info8 = json.loads(short.with_suffix(".json").read_text())["splits"]["train"]
    assert 40 <= info8["truncated"] <= 53 and info8["truncated_share"] == round(info8["truncated"] / 53, 4)


def test_prepare_command_twice_hits_the_cache(tmp_path, sentiment_csv):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-bert\ntask: classification\ndata:\n  train: {sentiment_csv}\n")
    runner = CliRunner()
    out = tmp_path / "prep"
    first = runner.invoke(app, ["data", "prepare", str(recipe), "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert "cache miss" in first.output
    second = runner.invoke(app, ["data", "prepare", str(recipe), "-o", str(out)])
    assert "cache hit" in second.output
    import pyarrow.parquet as pq

    assert pq.read_table(out / "train.parquet").num_rows == 112
    report = json.loads((out / "prepare_report.json").read_text())
    assert [s["step"] for s in report["report"]["steps"]] == ["load", "clean", "exact_dedup", "split", "tokenize"]


def test_train_runs_the_pipeline_and_pins_the_template(tmp_path, dates_jsonl):
    from tuneforge import api

    out = tmp_path / "run"
    api.train({"model": "tiny-llama", "task": "sft", "data": {"train": str(dates_jsonl), "pii": {"phone": "mask"}},
               "train": {"max_steps": 1, "batch_size": 4}, "eval": {"max_new_tokens": 2, "max_generate": 2,
                                                                    "baseline": False}},
              output=str(out), quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in manifest["data"]["steps"]][:3] == ["load", "clean", "pii"]
    template = manifest["template"]
    assert template["generation_marker"] == "<|im_start|>assistant\n" and template["preview"]["warnings"] == []
    import hashlib

    assert hashlib.sha256((out / "chat_template.jinja").read_bytes()).hexdigest() == template["sha256"]


def test_train_refuses_data_its_objective_does_not_take(tmp_path, monkeypatch):
    from tuneforge import api, objectives
    from tuneforge.data.formats import check_trainable

    pairs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"question {i}", "chosen": f"good answer {i}",
                                                    "rejected": f"bad answer {i}"} for i in range(20)])
    with pytest.raises(DataError, match="does not suit task 'sft'.*preference data trains with task: reward, dpo"):
        api.train({"model": "tiny-llama", "task": "sft", "data": {"train": str(pairs)}}, output=str(tmp_path / "r"),
                  quiet=True)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["status"] == "failed: unusable data"
    # a kind no objective takes still prepares (data tools), and training says so
    monkeypatch.setitem(objectives.OBJECTIVES, "reward", objectives.OBJECTIVES["sft"])
    monkeypatch.setitem(objectives.OBJECTIVES, "dpo", objectives.OBJECTIVES["sft"])
    with pytest.raises(DataError, match="preference pairs .*no trainer takes them yet"):
        check_trainable("preference", "sft")


def test_continued_pretraining_on_raw_text_trains_on_blocks(tmp_path):
    """Raw text trains as continued pre-training: loss on every token of max_length blocks."""
    from tuneforge import api

    docs = write_jsonl(tmp_path / "raw.jsonl", [{"text": f"the tide table for harbour {i} reads high water at noon"}
                                                for i in range(60)])
    result = api.train(
        {
            "model": "tiny-llama",
            "task": "sft",
            "data": {"train": str(docs)},
            "method": {"name": "full"},
            "train": {"max_length": 32, "epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "log_every": 1},
            "eval": {"bootstrap": False},
        },
        output=str(tmp_path / "cpt"),
        quiet=True,
    )
    log = [json.loads(line) for line in (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "split" not in r and "loss" in r]
    assert losses[-1] < losses[0] - 1.0  # nats per token
    assert result["test"]["perplexity"] < result["baseline"]["perplexity"]


def test_pair_classification_trains(tmp_path):
    """The label is in the second text only, so beating the majority class shows
    the pair reaches the model."""
    from tuneforge import api

    rng = __import__("random").Random(0)
    rows = []
    for i in range(240):
        question = rng.choice(["is it sunny", "is it raining"])
        answer = rng.choice(["sun is out", "rain is falling"])
        rows.append(
            {"text": f"{question} number {i}", "text_pair": answer, "label": "yes" if "sun" in answer else "no"}
        )
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = api.train({"model": "tiny-bert", "task": "classification", "data": {"train": str(data)},
                        "method": {"name": "full"},
                        "train": {"epochs": 6, "batch_size": 16, "max_length": 32, "learning_rate": 2e-3},
                        "eval": {"bootstrap": False}}, output=str(tmp_path / "pair"), quiet=True)
    assert json.loads((tmp_path / "pair" / "manifest.json").read_text())["data"]["kind"] == "pair"
    assert result["test"]["accuracy"] >= 0.9 > result["baseline"]["accuracy"]

