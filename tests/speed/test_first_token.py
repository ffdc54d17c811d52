"""first_token: the last layer of a first-token classifier computes row 0 only, with the full model's loss,
gradients and random stream (dropout on, padding in the batch)."""

import pytest
import torch
import transformers as tf

import lorakit
from lorakit.speed import own_forward
from lorakit.speed.attention import use_fast_attention
from lorakit.architectures import families_with

FIRST_TOKEN = families_with("first_token")
from lorakit.speed.first_token import first_token_layer, first_token_only

SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
             max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
FAMILIES = {"bert": (tf.BertConfig, tf.BertForSequenceClassification),
            "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification),
            "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaForSequenceClassification),
            "camembert": (tf.CamembertConfig, tf.CamembertForSequenceClassification),
            "electra": (tf.ElectraConfig, tf.ElectraForSequenceClassification),
            "ernie": (tf.ErnieConfig, tf.ErnieForSequenceClassification),
            "data2vec-text": (tf.Data2VecTextConfig, tf.Data2VecTextForSequenceClassification),
            "distilbert": (tf.DistilBertConfig, tf.DistilBertForSequenceClassification)}
DISTILBERT_NAMES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "intermediate_size": "hidden_dim", "hidden_dropout_prob": "dropout",
                    "attention_probs_dropout_prob": "attention_dropout"}


def classifier(family: str, attention: str = "sdpa", **overrides):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    sizes = {**SIZES, **overrides}
    if family == "distilbert":
        sizes = {DISTILBERT_NAMES.get(k, k): v for k, v in sizes.items()} | {"seq_classif_dropout": 0.1}
    config = config_class(**sizes, attn_implementation="eager" if attention == "eager" else "sdpa")
    model = lorakit.attach(model_class(config), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.B.normal_(0, 0.2)
    if attention == "lorakit":
        use_fast_attention(model)
    return model.train()


def batch(rows: int = 4, length: int = 13):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 8:] = 0
    mask[3, 4:] = 0
    return {"input_ids": torch.randint(3, 97, (rows, length), generator=g), "attention_mask": mask,
            "labels": torch.tensor([0, 2, 1, 2])[:rows]}


def loss_grads_and_random_state(model, step):
    torch.manual_seed(7)
    loss = step()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, torch.get_rng_state()


@pytest.mark.parametrize("family, attention", [("bert", "lorakit"), ("bert", "eager"), ("bert", "sdpa"),
                                               ("roberta", "lorakit"), ("xlm-roberta", "lorakit"),
                                               ("camembert", "lorakit"), ("electra", "lorakit"), ("ernie", "lorakit"),
                                               ("data2vec-text", "lorakit"), ("distilbert", "lorakit"),
                                               ("distilbert", "eager"), ("distilbert", "sdpa")])
def test_same_loss_gradients_and_dropout_draws_as_the_full_forward(family, attention):
    model, data = classifier(family, attention), batch()
    found = first_token_layer(model)
    assert found is not None and found.layout.query.endswith(("query", "q_lin"))
    with own_forward(model):
        full = loss_grads_and_random_state(model, lambda: model(**data).loss)
    ours = loss_grads_and_random_state(model, lambda: model(**data).loss)  # the attached model's fast forward
    torch.testing.assert_close(ours[0], full[0], rtol=1e-6, atol=1e-7)
    for name, grad in full[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(ours[2], full[2])  # every later draw (the next step's masks) is the same too
    assert "forward" not in found.layer.__dict__  # the layer is itself again after the loss


def test_row_zero_of_the_last_hidden_state_is_the_full_ones():
    model, data = classifier("bert", "lorakit"), batch()
    model.eval()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        full = model.bert(**inputs).last_hidden_state
        with first_token_only(first_token_layer(model)):
            first = model.bert(**inputs).last_hidden_state
    assert first.shape == (4, 1, 32)
    torch.testing.assert_close(first[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)


def test_bf16_fast_dropout_draws_the_full_masks():
    model, data = lorakit.use_bf16(classifier("bert", "lorakit"), when="always"), batch()
    with own_forward(model):
        full = loss_grads_and_random_state(model, lambda: model(**data).loss)
    ours = loss_grads_and_random_state(model, lambda: model(**data).loss)
    torch.testing.assert_close(ours[0], full[0], rtol=2e-2, atol=1e-3)
    assert torch.equal(ours[2], full[2])


def test_every_family_of_the_table_is_tested_here():
    assert set(FAMILIES) == set(FIRST_TOKEN)
    for family, (_, model_class) in FAMILIES.items():
        assert FIRST_TOKEN[family].classifier == model_class.__name__


def test_only_models_whose_head_reads_the_first_token(make_model):
    assert first_token_layer(make_model("llama-cls")) is None  # pools the last token
    token = tf.BertForTokenClassification(tf.BertConfig(**SIZES))
    assert first_token_layer(token) is None  # reads every row
    decoder = classifier("bert", is_decoder=True)
    assert first_token_layer(decoder) is None
    poly = classifier("bert", "lorakit")
    from lorakit.limits import use_attention

    use_attention(poly, "poly", degree=2)
    assert first_token_layer(poly) is None  # the poly kernel decides per layer; left alone
    assert first_token_layer(classifier("distilbert", chunk_size_feed_forward=4)) is None  # a chunked feed-forward


def test_a_forward_set_on_the_instance_is_put_back():
    model = classifier("bert", "lorakit")
    found = first_token_layer(model)
    own = found.layer.forward
    found.layer.forward = own  # e.g. a hook library's wrapper
    with first_token_only(found):
        assert found.layer.forward.func.__name__ == "_first_token_forward"
    assert found.layer.__dict__["forward"] is own
