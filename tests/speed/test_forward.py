"""The fast forward belongs to the adapted model (issue 14): for every fast path, ``model(**batch).loss`` and every
trainable gradient equal the ``fast=False`` model's, in a plain loop and after one HF Trainer step with gradient
accumulation 2 (which passes num_items_in_batch); evaluation and no-grad calls are the model's own forward."""

import copy
import inspect

import pytest
import torch
import transformers as tf

import lorakit
from lorakit.speed import fast_path, own_forward
from lorakit.speed.families import causal_lm_parts

VOCAB = 97
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def build(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**DECODER))
    if family == "gemma3":  # Gemma3ForCausalLM, model_type gemma3_text: final logit soft-capping on
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**DECODER, head_dim=8, final_logit_softcapping=3.0,
                                                        sliding_window=4))
    if family == "vaultgemma":  # Gemma 2's layout trained with differential privacy, soft-capped logits
        return tf.VaultGemmaForCausalLM(tf.VaultGemmaConfig(**DECODER, head_dim=8, final_logit_softcapping=3.0))
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**DECODER, head_dim=8, final_logit_softcapping=2.0))
    if family == "granite":  # logits / logits_scaling
        return tf.GraniteForCausalLM(tf.GraniteConfig(**DECODER, logits_scaling=4.0))
    if family == "cohere":  # logits * logit_scale
        return tf.CohereForCausalLM(tf.CohereConfig(**DECODER, logit_scale=0.5))
    if family == "mixtral":  # mixture of experts: the router's aux loss only with output_router_logits
        return tf.MixtralForCausalLM(tf.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                              dropout=0.0, attention_dropout=0.0, pad_token_id=1))
    if family == "distilbert":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=40, max_position_embeddings=64, num_labels=3,
            dropout=0.1, attention_dropout=0.1))
    classes = {"bert": (tf.BertConfig, tf.BertForSequenceClassification),
               "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification),
               "electra": (tf.ElectraConfig, tf.ElectraForSequenceClassification)}
    config_class, model_class = classes[family]
    return model_class(config_class(**ENCODER))


DECODERS = ["llama", "qwen2", "gpt2", "opt", "gemma3", "gemma2", "vaultgemma", "granite", "cohere", "mixtral"]
ENCODERS = ["bert", "roberta", "electra", "distilbert"]


def pair(family: str, **cfg):
    """(fast model, fast=False model): the same base, the same non-zero adapters."""
    base = build(family)
    fast = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", **cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(fast):
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.2)
    slow = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", **cfg), fast=False)
    slow.load_state_dict(fast.state_dict())
    return fast.train(), slow.train()


def rows(family: str, n: int = 4, length: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 3:] = 0
    if family in ENCODERS:
        labels = torch.randint(0, 3, (n,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :5] = -100  # a prompt: different label counts per row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch):
    torch.manual_seed(11)  # the same dropout masks for both
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_own_loop_loss_and_gradients_equal_the_plain_model(family):
    fast, slow = pair(family)
    path = fast_path(fast)
    assert path.kind == ("first-token" if family in ENCODERS else "fused-head"), family
    assert type(fast).__name__ == type(slow).__name__ and inspect.signature(fast.forward) == inspect.signature(slow.forward)
    batch = rows(family)
    out, grads = loss_and_grads(fast, batch)
    ref, ref_grads = loss_and_grads(slow, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5, msg=n)
    if family in DECODERS:
        assert out.logits is None  # never formed in a training call (documented)
    with torch.no_grad():  # no autograd: the model's own forward, logits and all (dropout on: the same seed)
        torch.manual_seed(2)
        logits = fast(**batch).logits
        torch.manual_seed(2)
        torch.testing.assert_close(logits, slow(**batch).logits, rtol=0, atol=1e-6)  # (lorakit_sdpa vs sdpa)
    fast.eval()
    torch.testing.assert_close(fast(**batch).logits, slow.eval()(**batch).logits, rtol=0, atol=1e-6)


def hf_trainer_step(model, family, folder):
    """One optimizer step of HF Trainer (SGD, lr 1: the update is the gradient) over 2 micro-batches of 2 rows."""
    data = [{k: v[i] for k, v in rows(family).items()} for i in range(4)]
    args = tf.TrainingArguments(output_dir=str(folder), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", use_cpu=True,
                                report_to=[], save_strategy="no", logging_strategy="no", seed=5, dataloader_num_workers=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result.training_loss, trained, trainer.model_accepts_loss_kwargs


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_hf_trainer_step_with_gradient_accumulation(family, tmp_path):
    """The fused loss honours num_items_in_batch exactly as transformers' loss does; the first-token layer too."""
    fast, slow = pair(family)
    ours, ref = hf_trainer_step(fast, family, tmp_path / "fast"), hf_trainer_step(slow, family, tmp_path / "slow")
    assert ours[2] == ref[2]  # HF Trainer reads the same signature in both
    assert ours[0] == pytest.approx(ref[0], rel=1e-5)
    for n, p in ref[1].items():
        torch.testing.assert_close(ours[1][n], p, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_hf_trainer_step_with_bf16_storage(family, tmp_path):
    """bf16 frozen weights on both sides: the fast and the own forward differ only in bf16 rounding."""
    fast, slow = pair(family)
    for model in (fast, slow):
        lorakit.use_bf16(model, fast_dropout=False, when="always")
    ours, ref = hf_trainer_step(fast, family, tmp_path / "fast"), hf_trainer_step(slow, family, tmp_path / "slow")
    assert ours[0] == pytest.approx(ref[0], rel=1e-2)
    for n, p in ref[1].items():
        torch.testing.assert_close(ours[1][n], p, rtol=5e-2, atol=5e-3, msg=n)


def test_router_logits_asked_for_take_the_own_forward_with_its_aux_loss():
    fast, slow = pair("mixtral")
    batch = rows("mixtral")
    out, grads = loss_and_grads(fast, {**batch, "output_router_logits": True})
    ref, ref_grads = loss_and_grads(slow, {**batch, "output_router_logits": True})
    assert out.logits is not None and out.aux_loss is not None  # the model's own forward ran
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    fused = fast(**batch)
    assert fused.logits is None and fused.aux_loss is None  # router logits not asked for: the fused loss
    torch.testing.assert_close(fused.loss, out.loss - fast.config.router_aux_loss_coef * out.aux_loss, rtol=1e-5,
                               atol=1e-6)


def test_calls_the_fast_path_does_not_cover_run_the_own_forward():
    fast, slow = pair("llama")
    batch = rows("llama")
    for extra in ({"output_hidden_states": True}, {"return_dict": False}):
        out = fast(**batch, **extra)
        ref = slow(**batch, **extra)
        torch.testing.assert_close(out[0], ref[0], msg=str(extra))
        assert (out[1] if isinstance(out, tuple) else out.logits) is not None
    without_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert fast(**without_labels).logits is not None
    with own_forward(fast):
        assert fast(**batch).logits is not None
    assert fast(**batch).logits is None  # fast again after the block


def test_what_has_no_fast_path_and_the_switch():
    head_adapted = lorakit.attach(build("llama"), lorakit.LoraConfig(r=4, targets=["q_proj", "lm_head"]))
    assert causal_lm_parts(head_adapted) is None and fast_path(head_adapted).kind is None  # the head's logits change
    pooled_last = lorakit.attach(tf.LlamaForSequenceClassification(tf.LlamaConfig(**DECODER, num_labels=2)),
                                 lorakit.LoraConfig(r=4))
    assert fast_path(pooled_last).kind is None  # reads the last token, not the first
    off = lorakit.attach(build("llama"), lorakit.LoraConfig(r=4), fast=False)
    assert fast_path(off) is None and type(off) is tf.LlamaForCausalLM
    on = lorakit.attach(build("llama"), lorakit.LoraConfig(r=4))
    assert type(on) is not tf.LlamaForCausalLM and isinstance(on, tf.LlamaForCausalLM)
    plain = lorakit.unload(on)
    assert type(plain) is tf.LlamaForCausalLM and fast_path(plain) is None
    assert plain.config._attn_implementation == "sdpa"  # a merged model saves with transformers' own attention


def test_bf16_storage_takes_the_fast_forward_too():
    fast, slow = pair("llama")
    lorakit.use_bf16(fast, fast_dropout=False, when="always")
    lorakit.use_bf16(slow, fast_dropout=False, when="always")
    batch = rows("llama")
    out, grads = loss_and_grads(fast, batch)
    ref, ref_grads = loss_and_grads(slow, batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-2, atol=1e-2)  # bf16 logits, rounded differently
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=5e-2, atol=5e-3, msg=n)


def test_trl_sft_trainer_step(minilm_tokenizer, tmp_path):
    """TRL's SFTTrainer (1.16 computes its loss with its own fused LM head, ``fused_lm_head=True``, on top of the
    model's forward): with the fast forward the step is the fast=False model's."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = minilm_tokenizer
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(tf.LlamaConfig(**{**DECODER, "vocab_size": tok.vocab_size, "pad_token_id": tok.pad_token_id}))
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (9, 12, 7, 10)]})
    trained = {}
    for fast in (True, False):
        torch.manual_seed(3)  # the same adapter initialisation
        model = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"), fast=fast)
        args = trl.SFTConfig(output_dir=str(tmp_path / str(fast)), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=1, learning_rate=1.0, optim="sgd", use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", seed=5, disable_tqdm=True,
                             eos_token=tok.sep_token, pad_token=tok.pad_token)
        result = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train()
        trained[fast] = (result.training_loss, {n: p.detach().clone() for n, p in model.named_parameters()
                                                 if p.requires_grad})
    assert trained[True][0] == pytest.approx(trained[False][0], rel=1e-5)
    for n, p in trained[False][1].items():
        torch.testing.assert_close(trained[True][1][n], p, rtol=1e-5, atol=1e-5, msg=n)


def test_torch_save_and_deepcopy_keep_the_fast_model():
    import io

    fast, _ = pair("llama")
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for model in (torch.load(buffer, weights_only=False), copy.deepcopy(fast)):
        assert type(model) is type(fast) and fast_path(model).kind == "fused-head"
        batch = rows("llama")
        assert model.train()(**batch).logits is None
        torch.testing.assert_close(model(**batch).loss, fast(**batch).loss)
        model.eval()
        out = model(input_ids=batch["input_ids"], adapter_names=["default", "__base__", "default", "__base__"])
        assert out.logits.shape[0] == 4  # the mixed-batch hook survives too
