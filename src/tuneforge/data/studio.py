"""The prepare pipeline: load -> review decisions -> clean -> PII -> exact dedup ->
near-dup/contamination -> subsample -> split -> balance -> augment -> tokenize.

Every step reports `{"step", "in", "out", "removed": {reason: n}}` (plus
`"added"` for steps that add rows), with in + added = out + removed. The
result is cached under TUNEFORGE_HOME/prepared/<key>/ where the key is a
sha256 of the input files, the data settings, the tokenizer files and the
term lists, so a re-run with unchanged inputs reads Parquet and skips the work.

Held-out files win de-duplication ties (the train copy goes); one file given as
both validation and test keeps every row in both, with a warning. A split given
as a file and left empty is an error; one that data.split sets to 0 is a warning.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence

from tuneforge.data.formats import LABELLED, map_texts, resolve_kind, row_text
from tuneforge.data.load import DataError, Reject, check_file, load_file, no_rows_reason
from tuneforge.data.splits import InvalidRows, Splits, example_key, sort_labels
from tuneforge.fsio import atomic_dir, atomic_write_json, is_complete, sha256_file

PIPELINE_VERSION = "1"  # bump when a step's behaviour changes, so old caches are not trusted
SPLITS = ("train", "validation", "test")
PRIORITY = ("test", "validation", "train")  # held-out rows win ties: the train copy is the one dropped


@dataclass
class Row:
    id: str  # file:line of the source row, stable across runs (review decisions use it)
    fields: dict


# ----------------------------------------------------------------- steps


def _step(name: str, before: dict[str, list[Row]], after: dict[str, list[Row]],
          removed: dict[str, dict[str, int]], added: Optional[dict[str, int]] = None, **extra) -> dict:
    """One report entry, with per-split counts; checks the books balance."""
    by_split = {}
    for split in before:
        rem = {k: v for k, v in removed.get(split, {}).items() if v}
        add = (added or {}).get(split, 0)
        entry = {"in": len(before[split]), "out": len(after[split]), "removed": rem}
        if add:
            entry["added"] = add
        assert entry["in"] + add == entry["out"] + sum(rem.values()), (name, split, entry)
        by_split[split] = entry
    total_removed: dict[str, int] = {}
    for entry in by_split.values():
        for k, v in entry["removed"].items():
            total_removed[k] = total_removed.get(k, 0) + v
    out = {"step": name, "in": sum(e["in"] for e in by_split.values()),
           "out": sum(e["out"] for e in by_split.values()), "removed": total_removed}
    if added:
        out["added"] = sum(added.values())
    out.update(extra)
    out["by_split"] = by_split
    return out


def apply_review(rows: dict[str, list[Row]], decisions: dict, label_set: Optional[set]) -> tuple[dict, dict]:
    """Apply keep/drop/relabel decisions by row id. A decision whose row text
    changed since it was made (sha differs) is stale and not applied."""
    from tuneforge.data.review import text_sha

    out, removed = {}, {}
    counts = {"kept": 0, "dropped": 0, "relabelled": 0, "stale": 0, "not_found": 0}
    seen = set()
    for split, items in rows.items():
        kept, dropped = [], 0
        for row in items:
            d = decisions.get(row.id)
            if d is None:
                kept.append(row)
                continue
            seen.add(row.id)
            if d.get("sha") and d["sha"] != text_sha(row.fields):
                counts["stale"] += 1
                kept.append(row)
                continue
            if d["decision"] == "drop":
                dropped += 1
                counts["dropped"] += 1
                continue
            if d["decision"] == "relabel":
                if label_set is not None and str(d["label"]) not in label_set:
                    raise DataError(f"review decisions: {row.id} is relabelled to {d['label']!r}, which is not a "
                                    f"known label ({', '.join(sorted(label_set))}).")
                kept.append(Row(row.id, {**row.fields, "label": str(d["label"])}))
                counts["relabelled"] += 1
            else:
                kept.append(row)
                counts["kept"] += 1
        out[split] = kept
        removed[split] = {"review_drop": dropped}
    counts["not_found"] = len(set(decisions) - seen)
    return out, {"removed": removed, "decisions": counts}


def clean_rows(rows: dict[str, list[Row]], clean: Callable[[str], str], min_chars: Optional[int],
               max_chars: Optional[int]) -> tuple[dict, dict, int]:
    from tuneforge.data.formats import has_empty_text

    out, removed, changed = {}, {}, 0
    for split, items in rows.items():
        kept, why = [], {"empty_after_cleaning": 0, "too_short": 0, "too_long": 0}
        for row in items:
            fields = map_texts(row.fields, clean)
            changed += fields != row.fields
            size = len(row_text(fields))
            if has_empty_text(fields):
                why["empty_after_cleaning"] += 1
            elif min_chars is not None and size < min_chars:
                why["too_short"] += 1
            elif max_chars is not None and size > max_chars:
                why["too_long"] += 1
            else:
                kept.append(Row(row.id, fields))
        out[split], removed[split] = kept, why
    return out, removed, changed


def pii_rows(rows: dict[str, list[Row]], actions: dict[str, str]) -> tuple[dict, dict, dict]:
    from tuneforge.data.formats import has_empty_text
    from tuneforge.data.pii import apply_pii

    changed: dict[str, int] = {}
    out, removed = {}, {}
    for split, items in rows.items():
        kept, emptied = [], 0
        for row in items:
            counts: dict[str, int] = {}

            def fix(text: str) -> str:
                new, found = apply_pii(text, actions)
                for k, v in found.items():
                    counts[k] = counts.get(k, 0) + v
                return new

            fields = map_texts(row.fields, fix)
            for k, v in counts.items():
                changed[k] = changed.get(k, 0) + v
            if has_empty_text(fields):  # a text that was nothing but an e-mail address, removed
                emptied += 1
            else:
                kept.append(Row(row.id, fields))
        out[split], removed[split] = kept, {"empty_after_pii_removal": emptied}
    return out, removed, changed


def exact_dedup(rows: dict[str, list[Row]], twins: Collection[str] = ()) -> tuple[dict, dict]:
    """Drop every row whose example repeats one seen before, in priority order
    (test, validation, train). Splits named in `twins` come from one file (the
    same file as validation and test): a row there is not a duplicate of its own
    copy in the twin split, so both keep it."""
    seen: dict[str, str] = {}  # example key -> the split that holds it first
    out, removed = {}, {}
    for split in PRIORITY:
        if split not in rows:
            continue
        kept, dropped, here = [], 0, set()
        for row in rows[split]:
            key = example_key(row.fields)
            holder = seen.get(key)
            if key in here or (holder is not None and not (split in twins and holder in twins)):
                dropped += 1
                continue
            here.add(key)
            seen.setdefault(key, split)
            kept.append(row)
        out[split], removed[split] = kept, {"duplicate": dropped}
    return {s: out[s] for s in rows}, removed


def near_dedup(rows: dict[str, list[Row]], cfg, twins: Collection[str] = ()) -> tuple[dict, dict, list]:
    """In each cluster keep the member of the highest-priority split (test, then
    validation, then train), earliest first; drop the rest as near_duplicate
    (same split) or contamination (another split). Twin splits (one file, see
    exact_dedup) each keep their own first member."""
    from tuneforge.data.neardup import NearDuplicates

    order = [(split, i) for split in PRIORITY if split in rows for i in range(len(rows[split]))]
    texts = [row_text(rows[s][i].fields) for s, i in order]
    nd = NearDuplicates(cfg.threshold, cfg.shingle, cfg.ngram, cfg.num_perm).fit(texts)
    drop: dict[tuple, str] = {}
    examples = []
    for cluster in nd.clusters():
        keepers: set[str] = set()  # `order` is priority-sorted, so the first member wins
        for member in cluster:
            split, i = order[member]
            if split in keepers:
                drop[(split, i)] = "near_duplicate"
            elif keepers and not (split in twins and keepers <= set(twins)):
                drop[(split, i)] = "contamination"
            else:
                keepers.add(split)
        if len(examples) < 20:
            examples.append([{"split": order[m][0], "id": rows[order[m][0]][order[m][1]].id, "text": texts[m][:200]}
                             for m in cluster[:5]])
    out, removed = {}, {}
    for split, items in rows.items():
        why = {"near_duplicate": 0, "contamination": 0}
        kept = []
        for i, row in enumerate(items):
            reason = drop.get((split, i))
            if reason:
                why[reason] += 1
            else:
                kept.append(row)
        out[split], removed[split] = kept, why
    return out, removed, examples


def balance_train(train: list[Row], mode: str, seed: int) -> tuple[list[Row], dict, int, dict]:
    """class_weights: weight n/(k*n_c) on each row (mean weight 1); oversample:
    repeat random minority rows up to the largest class; undersample: keep a
    random n_min of each class. Seeded; train split only."""
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(train):
        by_label.setdefault(row.fields["label"], []).append(i)
    counts = {lab: len(ix) for lab, ix in by_label.items()}
    n, k = len(train), len(by_label)
    rng = random.Random(seed)
    if mode == "class_weights":
        weights = {lab: n / (k * c) for lab, c in counts.items()}
        out = [Row(r.id, {**r.fields, "weight": weights[r.fields["label"]]}) for r in train]
        return out, {}, 0, {"weights": weights}
    if mode == "oversample":
        top = max(counts.values())
        extra = []
        for lab in sorted(by_label):
            need = top - counts[lab]
            # Copies, not the same Row: trainers edit rows in place (pair joining,
            # fairness reweighing), and a shared dict would be edited twice.
            extra += [Row(train[i].id, dict(train[i].fields)) for i in rng.choices(by_label[lab], k=need)] \
                if need else []
        return train + extra, {}, len(extra), {}
    low = min(counts.values())
    keep = set()
    for lab in sorted(by_label):
        keep.update(rng.sample(by_label[lab], low))
    out = [r for i, r in enumerate(train) if i in keep]
    return out, {"undersampled": n - len(out)}, 0, {}


def swapped_copy(fields: dict, lexicon, keep_columns: Sequence[str]) -> Optional[dict]:
    """The row with every term of `lexicon` swapped in all its texts, or None
    when nothing swaps. A kept column holding one of the lexicon's group names
    (e.g. a gender column) is swapped too: the copy is about the other group."""
    from tuneforge.fairness.terms import swap_terms

    swaps = 0

    def swap(text: str) -> str:
        nonlocal swaps
        new, n = swap_terms(text, lexicon)
        swaps += n
        return new

    out = map_texts(fields, swap)
    if not swaps:
        return None
    a, b = lexicon.groups
    for col in keep_columns:
        if out.get(col) in (a, b):
            out[col] = b if out[col] == a else a
    return out


def counterfactual_copies(train: list[Row], cfg, keep_columns: list[str]) -> tuple[list[Row], dict]:
    """One swapped copy per row and lexicon that swaps at least one term."""
    from tuneforge.fairness.terms import load_lexicons

    lexicons = load_lexicons(cfg.extra_terms)
    names = cfg.lexicons or sorted(lexicons)
    unknown = [n for n in names if n not in lexicons]
    if unknown:
        raise DataError(f"data.augment.lexicons: unknown term list(s) {unknown}; known: {sorted(lexicons)}.")
    copies, per_lexicon = [], {}
    for name in names:
        made = 0
        for row in train:
            fields = swapped_copy(row.fields, lexicons[name], keep_columns)
            if fields is not None:
                copies.append(Row(f"{row.id}+{name}", fields))
                made += 1
        per_lexicon[name] = made
    return copies, per_lexicon


# ------------------------------------------------------------- tokenizer


def tokenizer_identity(model: str) -> str:
    """What identifies the tokenizer without loading it: the sha256 of its files."""
    from tuneforge import catalog

    folder = None
    if model in catalog.CATALOG:
        folder = catalog.CATALOG[model].locate()
        if folder is None or not Path(folder).is_dir():
            folder = Path(catalog.resolve(model))
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser()
    if folder is None or not Path(folder).is_dir():
        return f"hub:{model}"
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "chat_template.jinja"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def load_tokenizer(model: str):
    from tuneforge import catalog
    from tuneforge.models import DEFAULT_CHAT_TEMPLATE, quiet_transformers
    from tuneforge.models import load_tokenizer as load_plain

    quiet_transformers()
    tok = load_plain(catalog.resolve(model))  # pad token set as training sets it
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE  # as models.load_causal_lm does, so counts match training
    return tok


def token_counts(tokenizer, rows: list[dict], kind: str, system_prompt: Optional[str]) -> list[int]:
    """Tokens per row as the model sees it (chat template applied for SFT kinds)."""
    if not rows:
        return []
    if kind == "pair":
        enc = tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows])
    elif kind == "classification":
        enc = tokenizer([r["text"] for r in rows])
    elif kind in ("chat", "prompt_response"):
        from tuneforge.data.render import to_messages

        texts = [tokenizer.apply_chat_template(to_messages(r, system_prompt), tokenize=False) for r in rows]
        enc = tokenizer(texts, add_special_tokens=False)
    elif kind == "preference":
        enc = tokenizer([r["prompt"] + r["chosen"] for r in rows], add_special_tokens=False)
    else:
        enc = tokenizer([r["text"] for r in rows], add_special_tokens=False)
    return [len(x) for x in enc["input_ids"]]


# ----------------------------------------------------------------- cache


def cache_dir() -> Path:
    from tuneforge.catalog import cache_root

    return cache_root() / "prepared"


def terms_digest(cfg) -> str:
    if not cfg.augment.counterfactual:
        return ""
    from importlib import resources

    digest = hashlib.sha256()
    folder = resources.files("tuneforge.templates").joinpath("terms")
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            digest.update(entry.read_bytes())
    for path in cfg.augment.extra_terms:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _code_digest() -> str:
    """The data package's source, and the term-swapping code the augment step
    runs (fairness/terms.py): editing a step invalidates what it cached."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted(here.glob("*.py")) + [here.parent / "fairness" / "terms.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_key(recipe) -> str:
    cfg = recipe.data
    files = {s: sha256_file(Path(getattr(cfg, s))) for s in SPLITS if getattr(cfg, s)}
    settings = cfg.model_dump(mode="json")
    for s in SPLITS + ("review_decisions",):
        settings.pop(s, None)  # paths do not matter, their content does
    settings.pop("cache", None)
    material = {
        "version": PIPELINE_VERSION, "code": _code_digest(), "files": files, "data": settings, "task": recipe.task,
        "seed": recipe.train.seed, "max_length": recipe.train.max_length,
        "tokenizer": {"model": recipe.model, "files": tokenizer_identity(recipe.model)},
        "review": sha256_file(Path(cfg.review_decisions)) if cfg.review_decisions else None,
        "terms": terms_digest(cfg),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


CACHE_ENTRIES = 24  # prepared data sets kept; the least recently written go first


def _prune(root: Path, keep: int) -> None:
    import shutil

    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def write_prepared(folder: Path, splits: Splits) -> None:
    """Parquet per split (with `_source` = file:line and `_n_tokens`), blocks
    for raw text, and prepare_report.json holding labels, report and rejects."""
    for split in SPLITS:
        rows = getattr(splits, split)
        ids, ntok = splits.ids.get(split, []), splits.n_tokens.get(split, [])
        table = [{**r, "_source": ids[i], "_n_tokens": ntok[i] if ntok else None} for i, r in enumerate(rows)]
        _write_parquet(folder / f"{split}.parquet", table)
        if splits.blocks is not None:
            _write_parquet(folder / f"{split}.blocks.parquet", [{"input_ids": b} for b in splits.blocks[split]])
    meta = {"kind": splits.kind, "labels": splits.labels, "report": splits.report,
            "rejects": [{"file": r.file, "line": r.line, "reason": r.reason} for r in splits.rejects]}
    atomic_write_json(folder / "prepare_report.json", meta)


def read_prepared(folder: Path) -> Splits:
    meta = json.loads((folder / "prepare_report.json").read_text())
    parts, ids, ntok = {}, {}, {}
    for split in SPLITS:
        rows = _read_parquet(folder / f"{split}.parquet")
        ids[split] = [r.pop("_source") for r in rows]
        counts = [r.pop("_n_tokens") for r in rows]
        ntok[split] = counts if counts and counts[0] is not None else []
        for r in rows:  # columns absent from some rows come back as None: drop them
            for k in [k for k, v in r.items() if v is None]:
                del r[k]
        parts[split] = rows
    blocks = None
    if (folder / "train.blocks.parquet").is_file():
        blocks = {s: [r["input_ids"] for r in _read_parquet(folder / f"{s}.blocks.parquet")] for s in SPLITS}
    rejects = [Reject(r["file"], r["line"], r["reason"]) for r in meta["rejects"]]
    return Splits(parts["train"], parts["validation"], parts["test"], meta["labels"], meta["report"], rejects,
                  kind=meta["kind"], ids=ids, n_tokens=ntok, blocks=blocks)


# ------------------------------------------------------------------ main


def _ids_for(files: dict[str, str]) -> dict[str, str]:
    """A short, stable name per file for row ids: the base name, or split/base
    name when two splits' files share a base name."""
    names = {s: Path(p).name for s, p in files.items()}
    return {s: (f"{s}/{n}" if list(names.values()).count(n) > 1 else n) for s, n in names.items()}


def _row_ids(name: str, examples) -> list[str]:
    """file:line, plus #k for the k-th record when several share a line (a JSON
    array written on one line), so every id names exactly one row."""
    per_line: dict[int, int] = {}
    for ex in examples:
        per_line[ex.line] = per_line.get(ex.line, 0) + 1
    seen: dict[int, int] = {}
    out = []
    for ex in examples:
        if per_line[ex.line] == 1:
            out.append(f"{name}:{ex.line}")
        else:
            seen[ex.line] = seen.get(ex.line, 0) + 1
            out.append(f"{name}:{ex.line}#{seen[ex.line]}")
    return out


def load_rows(kind_cfg, kind: str) -> tuple[dict[str, list[Row]], dict, list[Reject], Optional[set]]:
    """Load every file of the recipe as Rows; (rows, per-file info, rejects, allowed labels)."""
    cfg = kind_cfg
    labelled = kind in LABELLED
    allowed = {str(lab) for lab in cfg.labels} if (cfg.labels is not None and labelled) else None
    paths = {s: getattr(cfg, s) for s in SPLITS if getattr(cfg, s)}
    names = _ids_for(paths)
    loaded = {"train": load_file(cfg.train, kind, cfg, allowed)}
    if labelled and allowed is None:
        allowed = {ex.fields["label"] for ex in loaded["train"].examples}
    for split in ("validation", "test"):
        if split in paths:
            loaded[split] = load_file(paths[split], kind, cfg, allowed)
    for f in loaded.values():
        if not f.read:
            raise DataError(f"{f.path}: {no_rows_reason(f.path, cfg.format)}; there is nothing to prepare or train on.")
    rows = {s: [Row(i, ex.fields) for i, ex in zip(_row_ids(names[s], f.examples), f.examples)]
            for s, f in loaded.items()}
    info = {s: {"path": f.path, "sha256": sha256_file(Path(f.path)), "read": f.read, "rejected": len(f.rejects)}
            for s, f in loaded.items()}
    rejects = [r for f in loaded.values() for r in f.rejects]
    return rows, info, rejects, allowed


def same_file_splits(files: dict) -> tuple[set[str], list[str]]:
    """Splits given the same file (by content): (twin splits to keep whole,
    warnings). The same file as validation and test is allowed, and both keep
    every row (GLUE-style data hides its test labels, so dev serves as both);
    train sharing a file with a held-out split would lose every training row
    to de-duplication, so that is an error."""
    by_sha: dict[str, list[str]] = {}
    for split in SPLITS:
        if split in files:
            by_sha.setdefault(files[split]["sha256"], []).append(split)
    twins: set[str] = set()
    warnings = []
    for splits in by_sha.values():
        if len(splits) < 2:
            continue
        if "train" in splits:
            other = next(s for s in splits if s != "train")
            raise DataError(f"data.train and data.{other} are the same file ({files[other]['path']}): every training "
                            f"row would be removed as a copy of a {other} row. Give a separate {other} file, or "
                            f"leave data.{other} out to carve it from train.")
        twins.update(splits)
        warnings.append(f"data.validation and data.test are the same file ({files['test']['path']}): both keep all "
                        "its rows, but test scores are optimistic, since validation also picked the checkpoint. "
                        "Give a separate test file for an unbiased estimate.")
    return twins, warnings


def _removed_in(steps: list[dict], split: str) -> dict[str, int]:
    """Rows of `split` removed by every step after loading, by reason."""
    out: dict[str, int] = {}
    for st in steps[1:]:
        for k, v in st.get("by_split", {}).get(split, {}).get("removed", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def _check_given_splits(rows: dict[str, list[Row]], files: dict, steps: list[dict]) -> None:
    """A split given as a file that preparation left empty is an error that says
    where its rows went: a held-out split without rows cannot be scored (and
    would crash every encoder), and an empty train split has nothing to learn."""
    for split in SPLITS:
        if split not in files or rows[split]:
            continue
        f = files[split]
        why = {"malformed": f["rejected"], **_removed_in(steps, split)}
        where = ", ".join(f"{k} {v}" for k, v in why.items() if v) or "none"
        hint = ("Fix the rows, or check data.on_invalid, data.clean and data.near_dup." if split == "train" else
                f"Give a file with rows of its own, or leave data.{split} out to carve it from train.")
        raise DataError(f"data.{split} ({f['path']}): no rows left after preparation ({f['read']} read; removed: "
                        f"{where}). {hint}")


def _file_books(files: dict, steps: list[dict], rows: dict[str, list[Row]]) -> None:
    """Per file: read = kept + rejected + duplicates_removed + sum(removed),
    where removed counts every later step's removals by reason (cleaning, PII,
    near-dup, contamination, review drops, max_rows, undersampling) and kept is
    the file's rows in the prepared splits (train's include the splits carved
    from it). Copies made from its rows (oversampling, augmentation) are `added`."""
    carved = [s for s in ("validation", "test") if s not in files]
    for split, f in files.items():
        removed = _removed_in(steps, split)
        added = sum(st.get("by_split", {}).get(split, {}).get("added", 0) for st in steps[1:])
        f["duplicates_removed"] = removed.pop("duplicate", 0)
        f["removed"] = removed
        f["kept"] = len(rows[split]) - added + (sum(len(rows[c]) for c in carved) if split == "train" else 0)
        if added:
            f["added"] = added


def carve_missing(rows: dict[str, list[Row]], files: dict, cfg, seed: int, labelled: bool,
                   warn: Callable[[str], None]) -> dict[str, list[Row]]:
    """Carve the splits without a file out of train (70/15/15 of what it holds,
    stratified by label); a part data.split sets to 0 stays empty, with a warning."""
    train = rows["train"]
    total = len(train)
    held = {s: rows.get(s, []) for s in ("validation", "test")}
    pairs = [(r.id, r.fields) for r in train]
    for split, fraction, s in (("test", cfg.split[2], seed), ("validation", None, seed + 1)):
        if split in files:
            continue
        if fraction is None:
            fraction = cfg.split[1] * total / max(len(pairs), 1)
        pairs, out = carve_rows(pairs, fraction, s, stratify=labelled)
        held[split] = [Row(i, f) for i, f in out]
        if not out:
            warn(f"the {split} split is empty (data.split gives it 0): "
                 + ("no test metrics." if split == "test" else "no validation scores, checkpoint choice or early "
                    "stopping; the last step's model is kept."))
    return {"train": [Row(i, f) for i, f in pairs], **held}


def _clean_steps(rows: dict[str, list[Row]], cfg, allowed, twins: set[str], record) -> dict[str, list[Row]]:
    """Review, clean, PII, exact dedup, near-dup: each through `record`, which
    books the step and returns the rows it keeps."""
    if cfg.review_decisions:
        from tuneforge.data.review import read_decisions

        new, info = apply_review(rows, read_decisions(Path(cfg.review_decisions)), allowed)
        rows = record("review", new, info["removed"], decisions=info["decisions"])
    from tuneforge.data.clean import make_cleaner

    new, removed, changed = clean_rows(rows, make_cleaner(cfg.clean), cfg.clean.min_chars, cfg.clean.max_chars)
    rows = record("clean", new, removed, changed_rows=changed)
    from tuneforge.data.pii import actions_of

    actions = actions_of(cfg.pii)
    if any(a != "keep" for a in actions.values()):
        new, removed, changed = pii_rows(rows, actions)
        rows = record("pii", new, removed, changed=changed)
    if cfg.dedup:
        new, removed = exact_dedup(rows, twins)
        rows = record("exact_dedup", new, removed)
    if cfg.near_dup.enabled:
        new, removed, examples = near_dedup(rows, cfg.near_dup, twins)
        rows = record("near_dup", new, removed, threshold=cfg.near_dup.threshold, examples=examples)
    return rows


def _split_sizes(splits: Splits, files: dict) -> dict:
    out = {}
    for name in SPLITS:
        part = getattr(splits, name)
        entry: dict = {"rows": len(part), "carved_from_train": name not in files}
        if splits.labels is not None:
            entry["labels"] = {lab: sum(1 for r in part if r["label"] == lab) for lab in splits.labels}
        out[name] = entry
    return out


def prepare_data(recipe, use_cache: Optional[bool] = None, log: Callable[[str], None] = lambda m: None) -> Splits:
    """The whole pipeline, or its cached result. Raises InvalidRows (all
    malformed rows) when data.on_invalid is 'error', DataError for unusable data
    (a split given as a file and left without rows included). Warnings (one file
    as validation and test, a split left empty by data.split) go to `log` and
    the report's "warnings"."""
    cfg = recipe.data
    for split in SPLITS:
        if getattr(cfg, split):
            check_file(getattr(cfg, split))  # a clear error before hashing reads it
    use_cache = cfg.cache if use_cache is None else use_cache
    key = cache_key(recipe)
    folder = cache_dir() / key
    if use_cache and (splits := read_cached(folder, key, log)) is not None:
        return splits
    splits = run_pipeline(recipe, log)
    if use_cache:
        with atomic_dir(folder) as tmp:
            write_prepared(tmp, splits)
        _prune(cache_dir(), keep=CACHE_ENTRIES)
    splits.report["cache"] = {"key": key, "hit": False, "path": str(folder) if use_cache else None}
    return splits


def read_cached(folder: Path, key: str, log: Callable[[str], None]) -> Optional[Splits]:
    """The prepared splits cached under `key`, or None (absent, or pruned or
    replaced by another process meanwhile: recompute). Its warnings are logged again."""
    if not is_complete(folder):
        return None
    try:
        splits = read_prepared(folder)
    except (OSError, ValueError, KeyError):
        return None
    splits.report["cache"] = {"key": key, "hit": True, "path": str(folder)}
    for warning in splits.report.get("warnings", []):
        log(f"[yellow]warning: {warning}")
    return splits


def run_pipeline(recipe, log: Callable[[str], None]) -> Splits:
    """Load, clean, dedup, split, balance, augment and tokenize, booking every step."""
    cfg = recipe.data
    t0 = time.perf_counter()
    kind, kcfg, why = resolve_kind(cfg, recipe.task)
    log(f"data kind: {why}")
    rows, files, rejects, allowed = load_rows(kcfg, kind)
    if rejects and cfg.on_invalid == "error":
        raise InvalidRows(rejects)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"[yellow]warning: {message}")

    twins, same = same_file_splits(files)
    for message in same:
        warn(message)
    steps = [{"step": "load", "in": sum(f["read"] for f in files.values()),
              "out": sum(len(r) for r in rows.values()), "removed": {"malformed": len(rejects)} if rejects else {},
              "by_split": {s: {"in": f["read"], "out": len(rows[s]), "removed": {"malformed": f["rejected"]}
                               if f["rejected"] else {}} for s, f in files.items()}}]

    def record(name, new_rows, removed, **extra):
        nonlocal rows
        steps.append(_step(name, rows, new_rows, removed, **extra))
        rows = new_rows
        return rows

    rows = _clean_steps(rows, cfg, allowed, twins, record)
    _check_given_splits(rows, files, steps)
    seed = recipe.train.seed
    if cfg.max_rows is not None and len(rows["train"]) > cfg.max_rows:
        sub = random.Random(seed).sample(rows["train"], cfg.max_rows)
        record("subsample", {**rows, "train": sub}, {"train": {"max_rows": len(rows["train"]) - len(sub)}})
        files["train"]["subsampled_to"] = cfg.max_rows
    labelled = kind in LABELLED
    before_split = sum(len(v) for v in rows.values())
    rows = carve_missing(rows, files, cfg, seed, labelled, warn)
    steps.append({"step": "split", "in": before_split, "removed": {}, "out": sum(len(v) for v in rows.values()),
                  "carved": [s for s in ("validation", "test") if s not in files]})
    labels = _label_set(rows["train"], allowed, cfg) if labelled else None
    rows = _train_only_steps(rows, cfg, kind, seed, record)
    _file_books(files, steps, rows)
    splits = Splits(*(
        [r.fields for r in rows[s]] for s in SPLITS), labels, {}, rejects, kind=kind,
        ids={s: [r.id for r in rows[s]] for s in SPLITS})
    _tokenize(splits, recipe, kind, steps, log)
    splits.report = {"kind": kind, "kind_detected_from": why, "files": files, "splits": _split_sizes(splits, files),
                     "steps": steps, "warnings": warnings, "seconds": round(time.perf_counter() - t0, 3)}
    return splits


def _label_set(train: list[Row], allowed: Optional[set], cfg) -> list[str]:
    labels = sort_labels({r.fields["label"] for r in train} | (allowed or set()))
    if len(labels) < 2:
        raise DataError(f"{cfg.train}: classification needs at least two labels, found {labels}.")
    return labels


def _train_only_steps(rows: dict, cfg, kind: str, seed: int, record) -> dict:
    """Balancing and counterfactual augmentation: training rows only."""
    if cfg.balance != "none":
        if kind not in LABELLED:
            raise DataError(f"data.balance={cfg.balance} needs labelled data; this is {kind} data. "
                            "Set data.balance: none.")
        new_train, rem, add, extra = balance_train(rows["train"], cfg.balance, seed)
        rows = record("balance", {**rows, "train": new_train}, {"train": rem}, added={"train": add} if add else None,
                      mode=cfg.balance, **extra)
    if cfg.augment.counterfactual:
        copies, per_lexicon = counterfactual_copies(rows["train"], cfg.augment, cfg.keep_columns)
        rows = record("augment", {**rows, "train": rows["train"] + copies}, {}, added={"train": len(copies)},
                      counterfactual=per_lexicon)
    return rows


def carve_rows(pairs: list[tuple], fraction: float, seed: int, stratify: bool) -> tuple[list, list]:
    """prepare._carve on (id, fields) pairs: the same sizes, seed and stratification."""
    from sklearn.model_selection import train_test_split

    if fraction <= 0 or not pairs:
        return pairs, []
    n_out = max(1, round(len(pairs) * fraction))
    if n_out >= len(pairs):
        raise DataError(f"only {len(pairs)} usable training rows: too few to carve out a split of {fraction:.0%}. "
                        "Add rows, give data.validation / data.test files, or lower those parts of data.split.")
    labels = [f["label"] for _, f in pairs] if stratify else None
    counts: dict = {}
    for lab in labels or []:
        counts[lab] = counts.get(lab, 0) + 1
    if labels is not None and (min(counts.values()) < 2 or n_out < len(counts) or len(pairs) - n_out < len(counts)):
        labels = None
    keep, out = train_test_split(pairs, test_size=n_out, random_state=seed, shuffle=True, stratify=labels)
    return keep, out


def _tokenize(splits: Splits, recipe, kind: str, steps: list, log) -> None:
    """Token counts per row (and blocks for raw text): the model's tokenizer,
    the model's view (chat template for SFT kinds)."""
    try:
        tokenizer = load_tokenizer(recipe.model)
    except Exception as exc:  # a model whose files are missing: prepare still works, without token counts
        log(f"[yellow]token counts skipped: cannot load the tokenizer of {recipe.model}: {exc}")
        steps.append({"step": "tokenize", "in": 0, "out": 0, "removed": {}, "skipped": str(exc)})
        return
    max_length = recipe.train.max_length
    stats = {}
    for name in SPLITS:
        counts = token_counts(tokenizer, getattr(splits, name), kind, recipe.data.system_prompt)
        splits.n_tokens[name] = counts
        if counts:
            stats[name] = {"max": max(counts), "mean": round(sum(counts) / len(counts), 1),
                           "truncated": sum(c > max_length for c in counts),
                           "truncated_share": round(sum(c > max_length for c in counts) / len(counts), 4)}
    if kind == "text":
        from tuneforge.data.formats import chunk_blocks

        splits.blocks = {}
        for name in SPLITS:
            ids = tokenizer([r["text"] for r in getattr(splits, name)], add_special_tokens=False)["input_ids"] \
                if getattr(splits, name) else []
            splits.blocks[name] = chunk_blocks(ids, max_length, tokenizer.eos_token_id)
            stats.setdefault(name, {})["blocks"] = len(splits.blocks[name])
    rows = sum(len(getattr(splits, s)) for s in SPLITS)
    steps.append({"step": "tokenize", "in": rows, "out": rows, "removed": {}, "max_length": max_length,
                  "tokenizer": recipe.model, "stats": stats})
