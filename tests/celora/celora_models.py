"""The tiny Llama and the helpers the CE-LoRA tests share."""

import copy

import torch

import lorakit
from lorakit import celora


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
