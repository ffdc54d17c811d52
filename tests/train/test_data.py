import json

import pytest

from lorakit.errors import DataError
from lorakit.train import data as D


class WordTokenizer:
    """A tokenizer stand-in: one id per whitespace word, BOS=1, EOS=2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts, truncation=False, max_length=None, add_special_tokens=True):
        one = isinstance(texts, str)
        rows = []
        for t in [texts] if one else texts:
            ids = [3 + (sum(map(ord, w)) % 90) for w in t.split()]
            if add_special_tokens:
                ids = [1] + ids
            rows.append(ids[:max_length] if truncation and max_length else ids)
        return {"input_ids": rows[0] if one else rows}


TOK = WordTokenizer()


def write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_classification_with_named_columns(tmp_path):
    f = write(tmp_path / "d.csv", "review,stars\n" + "".join(f"text number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    ds = D.load_data(f, "classify", TOK, 16, text_column="review", label_column="stars")
    assert ds.label_names == ["neg", "pos"] and len(ds.train) == 18 and len(ds.eval) == 2
    assert {r["labels"] for r in ds.train} == {0, 1}
    assert D.infer_task(f, label_column="stars") == "classify"


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.load_data(str(tmp_path / "none.csv"), "classify", TOK, 16)
    with pytest.raises(DataError, match="is empty"):
        D.load_data(write(tmp_path / "e.csv", ""), "classify", TOK, 16)
    with pytest.raises(DataError, match="holds no rows"):
        D.load_data(write(tmp_path / "h.csv", "text,label\n"), "classify", TOK, 16)
    with pytest.raises(DataError, match="unsupported file type .xlsx"):
        D.load_data(write(tmp_path / "x.xlsx", "x"), "classify", TOK, 16)
    with pytest.raises(DataError, match="could not be read as Parquet"):
        D.load_data(write(tmp_path / "x.parquet", "x"), "classify", TOK, 16)
    with pytest.raises(DataError, match="holds no text"):
        D.load_data(write(tmp_path / "t.txt", "  \n\n"), "causal-lm", TOK, 16)


def test_missing_column_lists_the_columns(tmp_path):
    f = write(tmp_path / "d.csv", "sentence,label\na,1\nb,0\n")
    with pytest.raises(DataError, match=r"no column 'text'; columns are \['label', 'sentence'\]"):
        D.load_data(f, "classify", TOK, 16)
    f = write(tmp_path / "d2.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="no column 'label'"):
        D.load_data(f, "classify", TOK, 16)


def test_unknown_label_at_eval_names_it(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na b,good\nc d,bad\ne f,meh\n")
    with pytest.raises(DataError, match=r"label\(s\) \['meh'\].*known labels: \['bad', 'good'\]"):
        D.load_data(f, "classify", TOK, 16, label_names=["bad", "good"], split=False)


def test_malformed_rows_error_with_line_or_are_skipped(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n{"text": "c", "label": 0}\n[1]\n{"text": "d", "label": 1}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: malformed JSON row.*--skip-bad-rows"):
        D.load_data(f, "classify", TOK, 16)
    ds = D.load_data(f, "classify", TOK, 16, skip_bad_rows=True)
    assert ds.bad_rows == 2 and len(ds.train) + len(ds.eval) == 3 and "skipped 2 malformed" in ds.notes[0]
    f = write(tmp_path / "d.csv", "text,label\na,1\nb,0,extra\nc,0\n")
    with pytest.raises(DataError, match=r"d.csv, line 3: 3 fields where the header has 2"):
        D.load_data(f, "classify", TOK, 16)


def test_prompt_response_masks_the_prompt(tmp_path):
    rows = [{"prompt": "what is two", "response": "four"}, {"prompt": "say hi", "response": "hi there"}]
    f = write(tmp_path / "sft.jsonl", "\n".join(json.dumps(r) for r in rows * 5))
    assert D.infer_task(f) == "causal-lm"
    ds = D.load_data(f, "causal-lm", TOK, 32)
    for r in ds.train + ds.eval:
        n_prompt = r["labels"].index(next(x for x in r["labels"] if x != D.IGNORE_INDEX))
        assert r["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt
        assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:] and r["input_ids"][-1] == TOK.eos_token_id


def test_text_blocks_and_collate(tmp_path):
    f = write(tmp_path / "t.txt", " ".join(f"w{i}" for i in range(200)))
    ds = D.load_data(f, "causal-lm", TOK, 16)
    assert all(len(r["input_ids"]) <= 16 and r["input_ids"][0] == TOK.bos_token_id for r in ds.train)
    batch = D.collate(ds.train[:2] + [{"input_ids": [1, 5], "labels": [1, 5]}], pad_id=0)
    assert batch["input_ids"].shape == (3, 16) and batch["attention_mask"][2].sum() == 2
    assert (batch["labels"][2, 2:] == D.IGNORE_INDEX).all()


def test_builtin_sets():
    tx, ty, names, ex, ey = D.rotten_tomatoes()
    assert names == ["rotten", "fresh"] and len(ex) == D.HELD_OUT_SNIPPETS and len(tx) > 10_000
    assert not set(tx) & set(ex), "held-out snippets must not appear in training"
    assert 0.5 < sum(ty) / len(ty) < 0.65  # fresh is the majority, as in the corpus
    assert D.rotten_tomatoes()[3][:5] == ex[:5], "the split is fixed"
    assert "HAMLET" in D.hamlet_text()
    with pytest.raises(DataError, match="unknown built-in data 'builtin:imdb'"):
        D.infer_task("builtin:imdb")
    with pytest.raises(DataError, match="cannot be used for task 'classify'"):
        D.load_data("builtin:hamlet", "classify", TOK, 16)
