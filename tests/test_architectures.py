"""lorakit.architectures: one table of what lorakit knows per model family; the other modules ask it."""

import transformers as tf

from lorakit import architectures as arch
from lorakit.celora.plan import KEEP_PRESETS
from lorakit.speed.families import causal_lm_parts, first_token_family


def test_every_model_type_is_one_transformers_knows():
    known = set(tf.models.auto.configuration_auto.CONFIG_MAPPING_NAMES)
    assert set(arch.FAMILIES) - known == set()


def test_the_entries_agree_with_each_other():
    for name, f in arch.FAMILIES.items():
        assert f.attention is not None, name
        if f.first_token is not None:
            assert f.encoder and f.first_token.classifier.endswith("ForSequenceClassification"), name
        if f.lm_head is not None:
            assert not f.encoder and f.lm_head.kind in ("none", "softcap", "scale", "divide"), name
        for ratio in (f.keep_ratio or {}).values():
            assert 0 < ratio <= 1, name
    # the families two modules used to call BERT-like and a third left out (issue 16)
    assert arch.is_encoder("camembert") and arch.is_encoder("ernie") and not arch.is_encoder("llama")
    assert KEEP_PRESETS["camembert"] == KEEP_PRESETS["bert"] == arch.BERT_KEEP


def test_exact_leaves_are_every_query_key_fused_and_gate_name():
    assert arch.EXACT_LEAVES == {"q_proj", "k_proj", "gate_proj", "query", "key", "q_lin", "k_lin", "q", "k",
                                 "query_proj", "key_proj", "c_attn", "query_key_value", "qkv_proj", "Wqkv"}


def test_lookups():
    assert arch.separate_projections("bert") == ("query", "key", "value") and arch.fused_projection("bert") is None
    assert arch.fused_projection("gpt2") == "c_attn" and arch.separate_projections("gpt2") is None
    assert arch.family("no-such-type") is None and arch.family(None) is None
    assert arch.FAMILIES["roberta"].position_offset == 2


def test_the_fast_paths_read_the_registry():
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=2))
    bert = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2))
    assert causal_lm_parts(llama) is not None and first_token_family(llama) is None
    assert first_token_family(bert).layout == arch.BERT_LAYER and causal_lm_parts(bert) is None


def test_a_family_added_to_the_registry_gets_presets_and_ce_lora():
    """VaultGemma was added by one registry line: attn-qv without guessing, CE-LoRA's preset, the fused head
    (its loss and gradients against the plain model: tests/speed/test_forward.py)."""
    import warnings

    import lorakit

    config = tf.VaultGemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=3.0)
    model = tf.VaultGemmaForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "guessed the projections" note
        lorakit.attach(model, lorakit.LoraConfig(r=2, targets="all-linear", backward="celora"))
    assert {n.rsplit(".", 1)[-1] for n, _ in lorakit.lora_layers(model)} >= {"q_proj", "v_proj", "down_proj"}
    assert KEEP_PRESETS["vaultgemma"] == arch.LLAMA_KEEP
    assert causal_lm_parts(model).softcap == 3.0
