import json
import math

import pytest
import torch

import lorakit
from conftest import tiny_model
from lorakit.limits import measure_norms, rescale_query_key, use_attention
from lorakit.limits.norms import ABOVE, BELOW


def batch(length=12):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def with_adapter(kind, targets="attn-qkv"):
    model = tiny_model(kind)
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=4, targets=targets))
    for _, layer in lorakit.lora_layers(model):
        torch.nn.init.normal_(layer.B, std=0.05)
    return model


def test_columns_match_a_direct_computation():
    """q_max, the adapter share and the max logit recomputed by hand for one Llama layer (GQA, RoPE, padding)."""
    model = with_adapter("llama")
    b = batch()
    report = measure_norms(model, b)
    attn = model.model.layers[0].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0], q=o))]
    orig = model.config._attn_implementation

    def capture(module, q, k, v, mask, *args, **kw):
        if module is attn:
            seen.update(qr=q, kr=k, scale=kw["scaling"])
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, q, k, v, mask, *args, **kw)

    from transformers import AttentionInterface
    AttentionInterface.register("test_capture", capture)
    model.set_attn_implementation("test_capture")
    with torch.no_grad():
        model(**b)
    model.set_attn_implementation(orig)
    hooks[0].remove()
    valid = b["attention_mask"].bool()
    q = seen["q"][valid]  # [tokens, heads * d]
    d = attn.head_dim
    rows = [r for r in report.rows if r.layer == "model.layers.0.self_attn"]
    assert len(rows) == 4
    qp = attn.q_proj
    with torch.no_grad():
        delta = qp.adapter_delta(seen["x"])[valid]
    for r in rows:
        assert r.q_max == pytest.approx(float(q[:, r.head * d : (r.head + 1) * d].abs().max()), rel=1e-5)
        want_share = float(delta[:, r.head * d : (r.head + 1) * d].abs().max()) / r.q_max
        assert r.q_share == pytest.approx(want_share, rel=1e-4)
        kh = r.head // 2  # two query heads per key head
        s = seen["scale"] * seen["qr"][:, r.head] @ seen["kr"][:, kh].transpose(-1, -2)
        allowed = torch.ones(12, 12, dtype=torch.bool).tril() & valid[:, None, :] & valid[:, :, None]
        assert r.max_logit == pytest.approx(float(s.abs()[allowed].max()), rel=1e-5)
        assert r.max_logit <= r.logit_bound * (1 + 1e-6)
        assert r.threshold == pytest.approx(math.sqrt(math.log(12)))
        assert r.regime == (BELOW if r.max_logit < r.threshold else ABOVE)


def test_padding_does_not_change_the_report():
    model = with_adapter("bert-cls")
    b = batch()
    other = {k: v.clone() for k, v in b.items()}
    other["input_ids"][0, -3:] = 7
    a, c = measure_norms(model, b), measure_norms(model, other)
    assert [r.q_max for r in a.rows] == pytest.approx([r.q_max for r in c.rows], rel=1e-5)
    assert [r.max_logit for r in a.rows] == pytest.approx([r.max_logit for r in c.rows], rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "opt", "bert-cls"])
def test_architectures_and_outputs(kind, tmp_path):
    model = with_adapter(kind)
    report = measure_norms(model, batch())
    assert len({r.layer for r in report.rows}) == 2 and all(r.q_max is not None and r.q_share is not None for r in report.rows)
    table = report.table()
    assert "sqrt(log L)" in table and "max_logit" in table and len(table.splitlines()) >= 2 + len(report.rows)
    assert len(report.table(by="layer").splitlines()) < len(table.splitlines())
    doc = json.loads(report.to_json(tmp_path / "n.json").read_text())
    assert doc["length"] == 12 and len(doc["rows"]) == len(report.rows) and len(doc["layers"]) == 2
    assert report.plot(tmp_path / "n.png").stat().st_size > 1000


def test_model_is_left_as_it_was():
    model = with_adapter("llama")
    model.train()
    use_attention(model, "auto", crossover_per_feature=0.0)
    report = measure_norms(model, batch())
    assert model.training and model.config._attn_implementation == "lorakit_auto"
    assert all(r.attention and (r.attention.startswith("poly") or r.attention == "exact") for r in report.rows)
    assert "attention" in report.table()


def test_rescale_query_key_makes_a_certified_variant():
    model = with_adapter("llama")
    b = batch()
    for _, layer in lorakit.lora_layers(model):
        layer.B.data.mul_(40)  # push the logits up
    before = measure_norms(model, b)
    assert max(r.logit_bound for r in before.rows) > 1.0
    factors = rescale_query_key(model, b, 0.5)
    after = measure_norms(model, b)
    assert factors and all(0 < c < 1 for c in factors.values())
    assert max(r.logit_bound for r in after.rows) <= 0.5 * (1 + 1e-4)
    with pytest.raises(ValueError, match="max_logit_bound=0"):
        rescale_query_key(model, b, 0)


def test_bad_batch():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="batch must be"):
        measure_norms(model, {})
    with pytest.raises(lorakit.LorakitError, match="AttentionInterface"):
        measure_norms(torch.nn.Linear(2, 2), torch.ones(1, 2, dtype=torch.long))
