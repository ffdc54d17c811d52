"""The command line, end to end, on tiny model directories and (marked real_model) the built-ins."""

import os

import pytest
import torch

import lorakit
from lorakit.cli import main


@pytest.fixture
def cli(capsys):
    def call(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's refusals: one `lorakit: error:` line, status 2
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    out = tmp_path_factory.mktemp("cls")
    assert main(["train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "20", "--batch-size", "8",
                 "--lr", "1e-2", "--out", str(out), "--quiet"]) == 0
    return str(out)


def test_train_eval_info_merge_classifier(cli, trained_classifier, tiny_bert_dir, sentiment_csv, tmp_path):
    code, out, _ = cli("eval", "--adapter", trained_classifier, "--data", sentiment_csv)
    assert code == 0 and "(240 rows): loss" in out and "accuracy" in out
    code, out, _ = cli("info", trained_classifier)
    assert code == 0 and "labels: ['neg', 'pos']" in out and "target_modules: ['query', 'value']" in out
    merged = tmp_path / "merged"
    code, out, _ = cli("merge", "--adapter", trained_classifier, "--out", merged)
    assert code == 0 and (merged / "config.json").exists()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    tok = AutoTokenizer.from_pretrained(merged)
    batch = tok(["a superb film", "boring plot and dull actor"], padding=True, return_tensors="pt")
    from lorakit.train.apply import load_with_adapter

    with_adapter = load_with_adapter(trained_classifier, tiny_bert_dir)[0].model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, with_adapter(**batch).logits, atol=1e-5, rtol=0)
    code, _, err = cli("merge", "--adapter", trained_classifier, "--out", merged)
    assert code == 2 and "not empty" in err


def test_causal_lm_train_and_merge(cli, tiny_llama_dir, corpus_txt, tmp_path):
    out = tmp_path / "lm"
    code, stdout, _ = cli("train", "--model", tiny_llama_dir, "--data", corpus_txt, "--steps", "8", "--batch-size", "4",
                          "--max-length", "32", "--targets", "all-linear", "--out", out, "--quiet")
    assert code == 0 and "held-out loss:" in stdout
    code, stdout, _ = cli("eval", "--adapter", out, "--data", corpus_txt, "--max-length", "32")
    assert code == 0 and "perplexity" in stdout
    code, _, _ = cli("merge", "--adapter", out, "--out", tmp_path / "merged")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~umask  # not a temporary directory's 0700
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in (tmp_path / "merged").iterdir())
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 100, 200, 300]])
    from lorakit.train.apply import load_with_adapter

    ref = load_with_adapter(out)[0].model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "argument --rank: 0 is not a positive integer; give 1 or more"),
    (["--alpha", "0"], "alpha=0.0 must be a positive number"),
    (["--rank", "64"], "exceeds min(in, out) = 32"),
    (["--targets", "qurey,value"], "'qurey' matches no module"),
    (["--label-column", "stars"], "no column 'stars'"),
    (["--data", "MISSING.csv"], "MISSING.csv does not exist"),
    (["--model", "/no/such/model"], "lorakit does not download from a hub"),
    (["--steps", "0"], "argument --steps: 0 is not a positive integer; give 1 or more"),
])
def test_bad_train_input_is_a_clear_error_and_writes_nothing(cli, tiny_bert_dir, sentiment_csv, tmp_path, args, needle):
    out = tmp_path / "out"
    base = ["train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "2", "--out", out, "--quiet"]
    code, _, err = cli(*base, *args)
    assert code == 2, err
    assert err.startswith("lorakit: error:") and needle in err and "Traceback" not in err
    assert not out.exists()


def test_empty_data_file(cli, tiny_bert_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = cli("train", "--model", tiny_bert_dir, "--data", empty, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "is empty" in err


def test_eval_refuses_unknown_labels_and_corrupt_adapters(cli, trained_classifier, tmp_path):
    data = tmp_path / "other.csv"
    data.write_text("text,label\ngreat film,pos\ndull film,meh\n")
    code, _, err = cli("eval", "--adapter", trained_classifier, "--data", data)
    assert code == 2 and "['meh']" in err and "known labels: ['neg', 'pos']" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / name).write_bytes((open(os.path.join(trained_classifier, name), "rb").read()))
    (broken / "adapter_model.safetensors").write_bytes((broken / "adapter_model.safetensors").read_bytes()[:-100])
    code, _, err = cli("info", broken)
    assert code == 2 and "corrupt or truncated" in err


def test_help_and_version(cli):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    code, out, _ = cli()
    assert code == 2 and "train" in out and "merge" in out


@pytest.mark.real_model
def test_builtin_minilm_short_run(cli, tmp_path):
    code, out, _ = cli("train", "--steps", "3", "--batch-size", "4", "--eval-limit", "64", "--out", tmp_path, "--quiet")
    assert code == 0 and "held-out accuracy:" in out
    assert lorakit.read_config(tmp_path).base_model == "builtin:minilm"


@pytest.mark.real_model
def test_builtin_smollm2_causal_lm_short_run(cli, tmp_path):
    code, out, err = cli("train", "--model", "builtin:smollm2", "--steps", "2", "--batch-size", "2", "--max-length", "64",
                         "--eval-limit", "8", "--out", tmp_path, "--quiet")
    assert code == 0, err
    assert "held-out loss:" in out
    assert lorakit.read_config(tmp_path).targets == ["q_proj", "v_proj"]


def test_train_with_celora_flags(cli, tiny_llama_dir, corpus_txt, tmp_path):
    code, out, err = cli("train", "--model", tiny_llama_dir, "--data", corpus_txt, "--steps", "4", "--batch-size", "2",
                         "--max-length", "32", "--targets", "all-linear", "--backward", "celora", "--keep-ratio",
                         "v_proj=0.5,down_proj=0.6", "--refresh-every", "2", "--svd-rank", "balanced", "--selection", "weight",
                         "--out", tmp_path, "--quiet")
    assert code == 0, err
    cfg = lorakit.read_config(tmp_path)
    assert cfg.rank_pattern and set(cfg.rank_pattern.values()) == {7}
    code, _, err = cli("train", "--model", tiny_llama_dir, "--data", corpus_txt, "--backward", "celora", "--keep-ratio", "v_proj=2",
                       "--targets", "all-linear", "--out", tmp_path / "x", "--quiet")
    assert code == 2 and "keep_ratio['v_proj']=2.0 must be in (0, 1]" in err
    with pytest.raises(SystemExit):
        main(["train", "--keep-ratio", "lots"])


@pytest.mark.real_model
def test_reproduce_celora_smoke(cli, tmp_path):
    code, out, err = cli("reproduce", "celora", "--parts", "minilm", "--seeds", "1", "--minilm-steps", "2",
                         "--eval-limit", "32", "--rank", "4", "--out", tmp_path)
    assert code == 0, err
    import json

    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rank"] == 4 and result["budget"]["seeds"] == 1 and result["budget"]["minilm_steps"] == 2
    assert result["budget"]["eval_limit"] == 32 and set(result["runs"]) == {"minilm"}
    runs = result["runs"]["minilm"]
    assert sorted(r["backward"] for r in runs) == ["celora", "exact"] and all(r["steps"] == 2 for r in runs)
    summary = result["summary"]["minilm"]
    assert 0 <= summary["accuracy_celora"] <= 1 and (tmp_path / "celora.png").stat().st_size > 0
    assert "MiniLM sentiment, seed 0, exact ..." in out
    code, _, err = cli("reproduce", "celora", "--parts", "minilm,nope", "--out", tmp_path / "x")
    assert code == 2 and err == "lorakit: error: --parts ['nope'] unknown; choose from minilm, smollm2, errors\n"
    assert not (tmp_path / "x").exists()


def test_adapter_works_from_another_directory_and_small_held_out_sets_are_named(tiny_bert_dir, sentiment_csv, tmp_path,
                                                                                monkeypatch, capsys):
    """The base is recorded by its absolute path (issue 17's frictions), and a tiny held-out split gets a note."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_bert_dir, work / "model")
    lines = open(sentiment_csv).read().splitlines()[:101]  # 100 rows: 10 held out
    (work / "small.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(work)
    assert main(["train", "--model", "model", "--data", "small.csv", "--steps", "2", "--batch-size", "8", "--out", "run"]) == 0
    assert "note: 10 of 100 rows of small.csv are held out" in capsys.readouterr().out
    assert lorakit.read_config(work / "run").base_model == str(work / "model")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--adapter", str(work / "run"), "--data", str(work / "small.csv")]) == 0


def test_info_into_a_closed_pipe_is_quiet(tmp_path):
    import subprocess
    import sys

    lorakit.save_adapter(lorakit.attach(__import__("conftest").tiny_model("llama"), lorakit.LoraConfig()), tmp_path)
    proc = subprocess.run(f"{sys.executable} -m lorakit info {tmp_path} | head -c 10", shell=True, capture_output=True,
                          text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert len(proc.stdout) == 10 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_eval_defaults_to_the_training_runs_held_out_rows(cli, trained_classifier):
    """No --data: the held-out rows of the run that wrote the adapter (run.json), so the metrics are the run's own."""
    import json

    code, out, err = cli("eval", "--adapter", trained_classifier, "--json")
    assert code == 0, err
    res = json.loads(out)
    after = json.loads(open(os.path.join(trained_classifier, "run.json")).read())["result"]["after"]
    assert res["rows"] == 24 and res["data"].endswith("sentiment.csv")  # 10% of 240
    assert abs(res["eval_loss"] - after["eval_loss"]) < 1e-6 and res["eval_accuracy"] == after["eval_accuracy"]


def test_adapters_without_label_names(cli, make_model, tiny_bert_dir, sentiment_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, base_model=tiny_bert_dir))
    lorakit.save_adapter(model, tmp_path / "plain")
    code, _, err = cli("eval", "--adapter", tmp_path / "plain", "--data", sentiment_csv)
    assert code == 2 and "--labels neg,pos" in err
    code, out, err = cli("eval", "--adapter", tmp_path / "plain", "--data", sentiment_csv, "--labels", "neg,pos")
    assert code == 0 and "(240 rows)" in out, err
    lorakit.save_adapter(model, tmp_path / "named", labels=["neg", "pos"])
    code, out, err = cli("eval", "--adapter", tmp_path / "named", "--data", sentiment_csv)
    assert code == 0 and "(240 rows)" in out, err
    code, _, err = cli("eval", "--adapter", tmp_path / "named", "--data", sentiment_csv, "--labels", "pos,neg")
    assert code == 2 and "drop --labels" in err
