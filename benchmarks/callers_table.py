"""The README's per-caller table from benchmarks/results/issue14_callers/<model>-<caller>.json (callers.sh writes them).

    .venv/bin/python benchmarks/callers_table.py

A cell: lorakit exact fp32 / PEFT fp32 step time, then lorakit bf16 / PEFT fp32 (the medians of the per-round
ratios in brackets); the last column is the largest lorakit bf16 / lorakit exact step time of the row's runs.
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "issue14_callers"
MODELS = {"minilm-d01": "MiniLM, 16 x 128, dropout 0.1 (its own)", "minilm-d0": "MiniLM, 16 x 128, dropout 0",
          "smollm2": "SmolLM2, 4 x 256", "gemma3": "Gemma 3 270M GGUF, 4 x 128, attn-qv"}
CALLERS = ("loop", "lorakit", "hf-trainer")


def cell(modes: dict) -> str:
    parts = [f"{modes[m]['ratio_to_peft_fp32']:.3f} ({modes[m]['median_round_ratio_to_peft_fp32']:.3f})"
             for m in ("exact", "bf16") if m in modes]
    return " / ".join(parts)


def bf16_over_exact(modes: dict) -> float:
    return modes["bf16"]["contenders"]["lorakit bf16"]["median_s"] / modes["exact"]["contenders"]["lorakit exact"]["median_s"]


def main() -> None:
    print("| model, batch | " + " | ".join(CALLERS) + " | lorakit bf16 / exact (worst caller) |")
    print("|---|" + "---|" * (len(CALLERS) + 1))
    peaks = []
    for model, label in MODELS.items():
        cells, bf16_ratios = [], []
        for caller in CALLERS:
            path = RESULTS / f"{model}-{caller}.json"
            if not path.exists():
                cells.append("-")
                continue
            run = json.loads(path.read_text())
            peaks.append(run["peak_gemm_gflops"])
            cells.append(cell(run["modes"]))
            if "bf16" in run["modes"]:
                bf16_ratios.append(bf16_over_exact(run["modes"]))
        worst = f"{max(bf16_ratios):.2f}" if bf16_ratios else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {worst} |")
    if peaks:
        fp32 = [p["float32"] for p in peaks]
        bf16 = [p["bfloat16"] for p in peaks]
        print(f"\nPeak GEMM over these runs: fp32 {min(fp32):.0f}-{max(fp32):.0f} GFLOP/s, "
              f"bf16 {min(bf16):.0f}-{max(bf16):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
