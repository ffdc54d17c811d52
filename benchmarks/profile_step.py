"""What dominates a training step, and the micro-measurements behind the CPU choices in lorakit.

    .venv/bin/python benchmarks/profile_step.py --model builtin:smollm2 --batch-size 4 --max-length 256   # ~1 min
    .venv/bin/python benchmarks/profile_step.py --model builtin:minilm --batch-size 16 --max-length 128
    .venv/bin/python benchmarks/profile_step.py --micro                                                  # ~30 s

Step profile: one torch.profiler step of each `lorakit bench` contender of --mode (after two warm-up
steps), grouped as matrix products (mm/addmm/bmm), attention kernels, dropout masks (bernoulli_ / the
bit-based masks' randint) and the rest, as shares of the step's self CPU time, plus the top operators.
--micro: medians of torch's dropout vs kernels.dropout masks on MiniLM's attention probabilities,
CPU flash attention with enable_gqa vs repeated heads (SmolLM2 shapes), its bf16 vs float32 backward
(MiniLM shapes), the fused head + cross-entropy with its chunk buffers kept vs allocated each call,
torch's dropout mask drawn before vs beside GEMMs on a second thread, and bf16 weight storage with
fp32 products against fp32 weights (SmolLM2 layer shapes).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="builtin:smollm2")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--max-length", type=int, default=256)
parser.add_argument("--mode", default="exact")
parser.add_argument("--micro", action="store_true")
args = parser.parse_args()

GROUPS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm"),
          "attention kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
          "dropout masks": ("aten::bernoulli_", "aten::random_")}


def median_ms(fn, repeats=9):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def micro():
    probs = torch.rand(16, 12, 128, 128)
    from lorakit.kernels.dropout import fast_dropout

    print(f"dropout masks, [16, 12, 128, 128]: torch {median_ms(lambda: F.dropout(probs, 0.1, True)):.1f} ms, "
          f"kernels.dropout {median_ms(lambda: fast_dropout(probs, 0.1)):.1f} ms")

    import threading

    noise, x, w = torch.empty(16, 12, 128, 128), torch.randn(2048, 384), torch.randn(1536, 384)

    def masks_then_gemms():
        noise.bernoulli_(0.9)
        for _ in range(3):
            torch.mm(x, w.t())

    def masks_beside_gemms():  # torch's mask on a second thread while the main one runs the GEMMs
        drawer = threading.Thread(target=lambda: noise.bernoulli_(0.9))
        drawer.start()
        for _ in range(3):
            torch.mm(x, w.t())
        drawer.join()

    print(f"torch's attention mask then 3 MiniLM FFN GEMMs {median_ms(masks_then_gemms, 15):.1f} ms, "
          f"the mask on a second thread beside them {median_ms(masks_beside_gemms, 15):.1f} ms")

    def attention(dtype, heads, kv_heads, length, d, batch, repeat):
        q = torch.randn(batch, heads, length, d, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, kv_heads, length, d, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, kv_heads, length, d, dtype=dtype, requires_grad=True)
        g = heads // kv_heads

        def step():
            kk, vv = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if repeat else (k, v)
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not repeat and g > 1)
            out.sum().backward()

        return median_ms(step)

    print(f"flash attention fwd+bwd, SmolLM2 layer (4 x 9 heads / 3 kv, L 256, d 64): enable_gqa "
          f"{attention(torch.float32, 9, 3, 256, 64, 4, False):.1f} ms, repeated heads "
          f"{attention(torch.float32, 9, 3, 256, 64, 4, True):.1f} ms")
    print(f"flash attention fwd+bwd, MiniLM layer (16 x 12 heads, L 128, d 32): float32 "
          f"{attention(torch.float32, 12, 12, 128, 32, 16, False):.1f} ms, bf16 "
          f"{attention(torch.bfloat16, 12, 12, 128, 32, 16, False):.1f} ms")

    from lorakit.kernels import linear_cross_entropy as lce

    for dtype in (torch.float32, torch.bfloat16):  # SmolLM2's head at 4 x 256 tokens
        hidden = torch.randn(1024, 576, dtype=dtype, requires_grad=True)
        weight, labels = (0.05 * torch.randn(49152, 576)).to(dtype), torch.randint(0, 49152, (1024,))

        def loss(fresh):
            if fresh:
                lce.release_workspace()
            lce.linear_cross_entropy(hidden, weight, labels).backward()

        print(f"fused head + cross-entropy fwd+bwd, SmolLM2 4 x 256, {dtype}: buffers kept "
              f"{median_ms(lambda: loss(False)):.0f} ms, fresh each call {median_ms(lambda: loss(True)):.0f} ms")

    from lorakit.kernels.lora_linear import lora_linear

    # bf16 storage with fp32 products (the fallback for CPUs whose bf16 GEMMs are slow): one SmolLM2 layer's seven
    # LoRA projections at 4 x 256 tokens, forward + backward, frozen weights in fp32 vs bf16 upcast at every product
    n, h, inner, r = 1024, 576, 1536, 16
    shapes = [(h, h), (192, h), (192, h), (h, h), (inner, h), (inner, h), (h, inner)]
    inputs = {width: torch.randn(n, width, requires_grad=True) for width in (h, inner)}

    def projections(dtype):
        return [(torch.randn(o, i).mul_(0.02).to(dtype), torch.randn(r, i, requires_grad=True),
                 torch.zeros(o, r, requires_grad=True)) for o, i in shapes]

    def layer_step(weights):
        sum(lora_linear(inputs[w.shape[1]], w, None, a, b, 2.0).sum() for w, a, b in weights).backward()

    fp32_weights, bf16_weights = projections(torch.float32), projections(torch.bfloat16)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for round_ in range(23):  # alternating, the first 3 rounds warm-up
        for name, weights in (("fp32", fp32_weights), ("bf16", bf16_weights)):
            t = time.perf_counter()
            layer_step(weights)
            if round_ >= 3:
                times[name].append(1e3 * (time.perf_counter() - t))
    fp32_ms, bf16_ms = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"SmolLM2 layer's LoRA projections fwd+bwd, 4 x 256: fp32 weights {fp32_ms:.1f} ms, bf16 weights with fp32 "
          f"products {bf16_ms:.1f} ms ({bf16_ms / fp32_ms:.2f}x, half the frozen-weight memory)")


def profile():
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lorakit.bench import versus_peft as vp

    cfg = vp.BenchConfig(model=args.model, batch_size=args.batch_size, max_length=args.max_length, steps=3, warmup=0)
    task = vp.model_task(cfg.model, cfg.task)
    base, _, batches = vp._load(cfg, task)
    for runner in vp.contenders(base, cfg, args.mode, batches):
        runner.step()
        runner.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares = {group: sum(e.self_cpu_time_total for e in events if e.key in names) / total
                  for group, names in GROUPS.items()}
        shares["the rest"] = 1 - sum(shares.values())
        print(f"\n{runner.name}: {total / 1e6:.3f} s self CPU; " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        print(events.table(sort_by="self_cpu_time_total", row_limit=10))


micro() if args.micro else profile()
