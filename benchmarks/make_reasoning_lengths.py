"""Regenerate data/bench/reasoning_lengths_20k.csv, the speed benchmark's length list.

    python benchmarks/make_reasoning_lengths.py [--out PATH]

20,000 math reasoning requests drawn with a fixed seed from the project's length
laws (conf/workload/lengths/reasoning.yaml, domain ``math`` at its default
difficulty mix: easy = GSM8K, medium = MATH-500, hard = AIME output lengths of
R1-Distill-Qwen-7B, as published by the study). Those laws are fitted by
``python -m simulator.workload.length_fit`` from ServeGen's DeepSeek-R1 data (Apache-2.0)
and the study's published means. Outputs are cut so that prompt + output fits a
32,768-token context (no request the default engine must reject).
Columns: num_prefill_tokens, num_decode_tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from simulator.workload.lengths import LengthModel

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "data/bench/reasoning_lengths_20k.csv"
ROWS = 20_000
SEED = 20_000
MIX = {"math": 1.0}
MAX_MODEL_LEN = 32_768  # vLLM's default for the 7B models: prompt + output must fit


def lengths(rows: int = ROWS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, output tokens) of ``rows`` requests, the same for the same seed."""
    sampled = LengthModel.default().sample(np.random.default_rng(seed), rows, mix=MIX)
    prompt = sampled.prompt_tokens.astype(np.int64)
    output = np.minimum(sampled.output_tokens, MAX_MODEL_LEN - prompt).astype(np.int64)
    return prompt, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    out = parser.parse_args().out
    prompt, output = lengths()
    lines = ["num_prefill_tokens,num_decode_tokens"]
    lines += [f"{p},{o}" for p, o in zip(prompt.tolist(), output.tolist(), strict=True)]
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: {len(prompt)} rows, prompt mean {prompt.mean():.0f}, "
          f"output mean {output.mean():.0f}, max {output.max()}")


if __name__ == "__main__":
    main()
