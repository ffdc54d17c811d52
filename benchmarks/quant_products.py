"""Products on a quantised frozen weight, on this CPU: dequantisation time per format, and x W^T for x 512 x 4096,
W 4096 x 4096 by each path (issue 29). Each timing is the median of repeats run alternately (one of each path per
round), so a machine shared with other work slows all paths alike. Writes benchmarks/results/quant_products.json.

    .venv/bin/python benchmarks/quant_products.py [--rows 512] [--dim 4096] [--repeats 5]   # ~2 minutes

Paths: bf16 / fp32 GEMM on a float W (the baselines); dequantise the whole W to fp32 (or bf16) then the GEMM (what
``adapters.storage.QuantizedWeight`` does); PyTorch's packed CPU kernels ``torch._weight_int8pack_mm`` (int8) and
``torch._weight_int4pack_mm_for_cpu`` after ``torch._convert_weight_to_int4pack_for_cpu`` (int4, group-wise).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lorakit.bench.workloads import machine
from lorakit.kernels import quantize as kq

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int, default=512)
parser.add_argument("--dim", type=int, default=4096)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_products.json"))
args = parser.parse_args()

torch.manual_seed(0)
n = args.dim
w = torch.randn(n, n) * 0.02
x = torch.randn(args.rows, n)
x_bf16, w_bf16 = x.bfloat16(), w.bfloat16()

formats = {"int8": kq.Int8Format(), "nf4": kq.NF4Format(64), "nf4_double_quant": kq.NF4Format(64, True),
           "int4_g64": kq.Int4Format(64), "int4_g128": kq.Int4Format(128)}
packed = {name: fmt.quantize(w) for name, fmt in formats.items()}
packed_bytes = {name: sum(t.nbytes for t in ts.values()) for name, ts in packed.items()}

q8, s8 = packed["int8"]["qweight"], packed["int8"]["scale"]
# int4 in torch's packed layout: codes q - 8 around a zero of min + 8 scale (same numbers as Int4Format, group 128)
g = 128
t4 = packed["int4_g128"]
codes = kq.unpack_nibbles(t4["qweight"]).to(torch.int32)
scales_zeros = torch.stack([t4["scale"], t4["zero"] + 8 * t4["scale"]], dim=-1).transpose(0, 1).contiguous()
w_int4pack = torch._convert_weight_to_int4pack_for_cpu(codes, 1)

paths = {
    "gemm_fp32": lambda: x @ w.t(),
    "gemm_bf16": lambda: x_bf16 @ w_bf16.t(),
}
for name, fmt in formats.items():
    paths[f"dequantize_{name}_fp32"] = lambda f=fmt, t=packed[name]: f.dequantize(t, torch.float32)
    paths[f"dequantize_{name}_bf16"] = lambda f=fmt, t=packed[name]: f.dequantize(t, torch.bfloat16)
    paths[f"product_{name}_dequantize_fp32_gemm"] = lambda f=fmt, t=packed[name]: x @ f.dequantize(t, torch.float32).t()
paths["product_int8_weight_int8pack_mm_fp32"] = lambda: torch._weight_int8pack_mm(x, q8, s8)
paths["product_int8_weight_int8pack_mm_bf16"] = lambda: torch._weight_int8pack_mm(x_bf16, q8, s8.bfloat16())
paths["product_int4_g128_weight_int4pack_mm_bf16"] = lambda: torch._weight_int4pack_mm_for_cpu(
    x_bf16, w_int4pack, g, scales_zeros.bfloat16())
paths["product_int4_g128_weight_int4pack_mm_fp32"] = lambda: torch._weight_int4pack_mm_for_cpu(
    x, w_int4pack, g, scales_zeros)

# the packed kernels compute what the formats mean
ref8 = x @ formats["int8"].dequantize(packed["int8"], torch.float32).t()
ref4 = x @ formats["int4_g128"].dequantize(t4, torch.float32).t()
checks = {"int8pack_max_rel_err": float((paths["product_int8_weight_int8pack_mm_fp32"]() - ref8).abs().max() / ref8.abs().max()),
          "int4pack_max_rel_err": float((paths["product_int4_g128_weight_int4pack_mm_fp32"]() - ref4).abs().max() / ref4.abs().max())}

times: dict[str, list[float]] = {k: [] for k in paths}
for f in paths.values():  # warm-up
    f()
for _ in range(args.repeats):
    for name, f in paths.items():
        t0 = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t0)

median_ms = {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}
fastest = {}
for name in formats:
    candidates = {k: v for k, v in median_ms.items() if k.startswith(f"product_{name}_")}
    fastest[name] = min(candidates, key=candidates.get)
result = {
    "machine": machine(),
    "command": f".venv/bin/python benchmarks/quant_products.py --rows {args.rows} --dim {args.dim} --repeats {args.repeats}",
    "shape": {"x": [args.rows, n], "w": [n, n]},
    "repeats": args.repeats,
    "median_ms": median_ms,
    "packed_bytes": packed_bytes,
    "float_bytes": {"fp32": w.nbytes, "bf16": w_bf16.nbytes},
    "fastest_product_per_format": fastest,
    "packed_kernel_checks": checks,
}
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
tmp = Path(args.out).with_suffix(".json.tmp")
tmp.write_text(json.dumps(result, indent=1) + "\n")
tmp.replace(args.out)
print(json.dumps(result, indent=1))
