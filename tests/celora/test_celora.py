"""CE-LoRA: exactness at keep 1.0, the refresh schedule, real-weight error figures, bad input."""

import copy
import json
import statistics

import pytest
import torch

import lorakit
from lorakit import celora
from lorakit.celora.measure import layer_errors
from lorakit.errors import ConfigError
from lorakit.kernels.amm import select_top


def llama(seed=0, hidden=64):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg)


def batches(n, seed=0, size=(4, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, size, generator=g) for _ in range(n)]


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.B.copy_(0.1 * torch.randn(layer.B.shape, generator=g))


def pair(**celora_kw):
    base = llama()
    exact = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, targets="all-linear"))
    approx = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, targets="all-linear", backward="celora",
                                                                     celora=lorakit.CeloraConfig(**celora_kw)))
    randomise_b(exact)
    with torch.no_grad():  # the same adapter weights in both
        source = dict(exact.named_parameters())
        for n, p in approx.named_parameters():
            if p.requires_grad:
                p.copy_(source[n])
    return exact, approx


def step_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = adapter_grads(model)
    celora.step(model)
    return grads


@pytest.mark.parametrize("selection", ["score", "weight"])
def test_keep_ratio_one_gives_the_exact_gradients(selection):
    """Acceptance 1: keep_ratio 1.0 matches plain autograd (rtol 1e-5), before and after refreshes."""
    exact, approx = pair(keep_ratio=1.0, refresh_every=2, selection=selection)
    for ids in batches(5):
        a, b = step_grads(exact, ids), step_grads(approx, ids)
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-8, msg=n)
    assert all(s.refreshes == 3 for s in celora.controller(approx).selectors.values())


def test_exact_until_the_first_refresh_then_approximate():
    exact, approx = pair(keep_ratio=0.5, refresh_every=100)
    ids = batches(2)
    first_e, first_a = step_grads(exact, ids[0]), step_grads(approx, ids[0])
    for n in first_e:
        torch.testing.assert_close(first_a[n], first_e[n], rtol=1e-5, atol=1e-8)
    second_e, second_a = step_grads(exact, ids[1]), step_grads(approx, ids[1])
    differs = [n for n in second_e if not torch.allclose(second_a[n], second_e[n], rtol=1e-4, atol=1e-7)]
    assert differs, "after the first refresh the frozen-weight dX is approximated"
    # layer 1's own adapter gradients do not depend on any approximated dX above them... the top
    # layer's down_proj sees the exact G from the head: its dA, dB stay exact
    top = "model.layers.1.mlp.down_proj.lora_B.default.weight"
    torch.testing.assert_close(second_a[top], second_e[top], rtol=1e-5, atol=1e-8)


def test_refresh_counts_optimizer_steps_under_gradient_accumulation():
    """Acceptance 3: with grad accumulation 4, refreshes follow optimizer steps, not forward calls,
    and the scores of a refresh step are summed over all its micro-batches."""
    model = lorakit.attach(llama(), lorakit.LoraConfig(r=4, targets="all-linear", backward="celora",
                                                             celora=lorakit.CeloraConfig(refresh_every=3, keep_ratio=0.5)))
    randomise_b(model)
    ctl = celora.controller(model)
    name = "model.layers.0.mlp.down_proj"
    sel = ctl.selectors[name]
    seen = []
    original = sel.__call__

    class Spy:
        def __call__(self, g):
            seen.append(g.detach().clone())
            return original(g)

    model.get_submodule(name).frozen_input_grad = Spy()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    history = []
    micro = iter(batches(4 * 7, seed=3))
    for step in range(7):
        seen.clear()
        exact_before = sel.exact or sel.refreshing
        for _ in range(4):
            ids = next(micro)
            (model(input_ids=ids, labels=ids).loss / 4).backward()
        opt.step()
        opt.zero_grad()
        idx_before = None if sel.idx is None else sel.idx.clone()
        celora.step(model)
        history.append((step, exact_before, sel.refreshes))
        if step in (0, 3, 6):
            col_sq = sum((g.float() ** 2).sum(0) for g in seen)
            expected = select_top(col_sq.sqrt() * model.get_submodule(name).celora_row_norms, sel.k)
            assert torch.equal(sel.idx, expected), f"step {step}: scores summed over the 4 micro-batches"
            assert len(seen) == 4
        elif idx_before is not None:
            assert torch.equal(sel.idx, idx_before), "no refresh between refresh steps"
    assert history == [(0, True, 1), (1, False, 1), (2, False, 1), (3, True, 2), (4, False, 2), (5, False, 2), (6, True, 3)]


def test_trainer_drives_refreshes_by_step(tiny_llama_dir, corpus_txt, tmp_path):
    from conftest import train_config
    from lorakit.train import run

    run(train_config(model=tiny_llama_dir, data=corpus_txt, out=str(tmp_path), steps=8, batch_size=2, grad_accum=4,
                    max_length=32, targets="all-linear", backward="celora", keep_ratio=0.5, refresh_every=3,
                    quiet=True, log_every=100, save_every=None))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("celora_refreshed_layers")] == [1, 4, 7]


def test_resume_restores_the_feature_cache(tiny_llama_dir, corpus_txt, tmp_path):
    from safetensors.torch import load_file

    from conftest import train_config
    from lorakit.train import run

    def cfg(out, **kw):
        return train_config(model=tiny_llama_dir, data=corpus_txt, out=str(out), steps=9, batch_size=4, max_length=32,
                           targets="all-linear", backward="celora", keep_ratio=0.5, refresh_every=4, save_every=3,
                           selection="sample", quiet=True, **kw)

    class Crash:
        def after_step(self, step, model):
            if step == 5:
                raise KeyboardInterrupt

    run(cfg(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "cut"), hooks=[Crash()])
    run(cfg(tmp_path / "cut", resume=True))
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def test_balanced_rank_lowers_trainable_rank_and_files_say_so(tmp_path):
    import peft

    base = llama()
    model = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=8, targets="all-linear", backward="celora",
                                                                        celora=lorakit.CeloraConfig(svd_rank="balanced")))
    ranks = {n.rsplit(".", 1)[1]: layer.r for n, layer in lorakit.lora_layers(model)}
    assert ranks == {"q_proj": 8, "k_proj": 8, "v_proj": 7, "o_proj": 7, "gate_proj": 8, "up_proj": 7, "down_proj": 7}
    sel = celora.controller(model).selectors["model.layers.0.mlp.up_proj"]
    assert sel.spec.svd_rank == 7 and model.get_submodule("model.layers.0.mlp.up_proj").celora_B0.shape == (128, 7)
    randomise_b(model)
    lorakit.save_adapter(model, tmp_path)
    ids = batches(1)[0]
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(twin(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_flops_of_one_layer():
    model = lorakit.attach(llama(), lorakit.LoraConfig(r=4, targets=["layers.1.mlp.up_proj", "layers.1.mlp.down_proj"],
                                                       backward="celora",
                                                       celora=lorakit.CeloraConfig(keep_ratio={"up_proj": 0.5}, svd_rank=2)))
    report = celora.flops(model, 10)
    up = next(layer for layer in report.layers if layer.name.endswith("layers.1.mlp.up_proj"))
    n, i, o, r, k, r0 = 10, 64, 128, 4, 64, 2
    assert up.forward == 2 * n * i * o + 2 * n * r * (i + o)
    assert up.backward_exact == 4 * n * r * (i + o) + 2 * n * o * i
    assert up.backward_approx == 4 * n * r * (i + o) + 2 * n * (k * i + o * r0 + r0 * i)
    down = next(layer for layer in report.layers if layer.name.endswith("layers.1.mlp.down_proj"))
    assert down.keep_ratio is None and down.backward_approx == down.backward_exact
    assert 0 < report.saving < report.backward_saving < 1
    assert "saves" in str(report)


@pytest.mark.parametrize("kw,needle", [
    (dict(keep_ratio=0.0), "keep_ratio=0.0 must be in (0, 1]"),
    (dict(keep_ratio=1.5), "keep_ratio=1.5 must be in (0, 1]"),
    (dict(keep_ratio={"v_proj": -0.1}), "keep_ratio['v_proj']=-0.1"),
    (dict(keep_ratio={"w_proj": 0.5}), "keep_ratio key 'w_proj' matches no adapted module"),
    (dict(svd_rank=32), "svd_rank=32 for model.layers.0.self_attn.v_proj must be below min(in, out) = 32"),
    (dict(svd_rank=-1), "svd_rank=-1"),
    (dict(selection="random"), "selection='random'"),
    (dict(refresh_every=0), "refresh_every=0"),
])
def test_bad_celora_options(kw, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        lorakit.attach(llama(), lorakit.LoraConfig(r=4, targets="all-linear", backward="celora",
                                                   celora=lorakit.CeloraConfig(**kw)))


def test_unknown_architecture_needs_explicit_keep_ratio(make_model):
    model = make_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="no CE-LoRA keep-ratio preset for model_type 'mystery'"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"], backward="celora"))


@pytest.mark.real_model
def test_double_lora_and_score_selection_on_minilm(minilm_dir):
    """Acceptance 2: on MiniLM's real weights and gradients, Double-LoRA lowers the dX error of
    plain top-k at the same keep ratio, and the column-row score beats weight-only ranking."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.train.data import rotten_tomatoes

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts, labels, *_ = rotten_tomatoes()
    def batch(lo, hi):
        enc = tok(texts[lo:hi], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor(labels[lo:hi])}
    torch.manual_seed(0)
    lorakit.attach(model, lorakit.LoraConfig(r=8, targets="all-linear"))
    plan = celora.keep_ratios("bert", [n for n, _ in lorakit.lora_layers(model)], None)
    errors = layer_errors(model, (batch(0, 32), batch(32, 64)), plan, svd_ranks=(0, 8), selections=("score", "weight"))
    mean = {(r0, s): statistics.mean(e.relative_error for e in errors if e.svd_rank == r0 and e.selection == s)
            for r0 in (0, 8) for s in ("score", "weight")}
    assert mean[(8, "score")] < mean[(0, "score")] and mean[(8, "weight")] < mean[(0, "weight")]
    assert mean[(0, "score")] < mean[(0, "weight")] and mean[(8, "score")] < mean[(8, "weight")]
    per_layer = {}
    for e in errors:
        per_layer.setdefault(e.name, {})[(e.svd_rank, e.selection)] = e.relative_error
    better = sum(v[(8, "score")] < v[(0, "score")] for v in per_layer.values())
    assert better >= 0.8 * len(per_layer), f"Double-LoRA helps in {better} of {len(per_layer)} layers"
