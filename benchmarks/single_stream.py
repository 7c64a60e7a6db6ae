"""Single-stream latency: time to first token (32- and 512-token prompts) and decode tokens/s.

One request at a time, greedy, EOS ignored, prefix caching off (every run recomputes its
prompt). Engines, all in this invocation on the same prompts:
- kvflow `LLM` in float32, in bfloat16 (weights and KV cache; both dtypes named, not
  "auto") and with quantization="int8" (float32 activations);
- transformers `generate`, float32;
- llama.cpp (llama-cpp-python, `bench` extra) on the default model's GGUF re-encoded as F32,
  BF16 and Q8_0 (skipped when llama_cpp is not installed or the model is not the default).
Also: the bare forward pass of kvflow's float32 model over the 512-token prompt (no engine
around it), the int8 model's perplexity on a fixed text against float32, and the roofline
(float32 and bf16). Ratios: bf16 decode over float32 decode, float32 TTFT 512 over bf16
TTFT 512 (how many times lower), each kvflow decode over llama.cpp's at the same precision.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from common import TEXT_SEED, cpu_isa_line, write_result

PROMPT_LENGTHS = (32, 512)
# Natural text for the perplexity check (a repeated text would be predicted almost exactly).
PERPLEXITY_TEXT = (
    "The history of the city begins with a small settlement on the river bank, where traders "
    "from the north and the south met to exchange salt, cloth and iron tools. Over the "
    "centuries the settlement grew into a market town, then into a walled city with a "
    "cathedral, a university and a harbour that welcomed ships from the sea. In the winter of "
    "the great flood the lower streets were under water for weeks, and the council decided to "
    "build a stone embankment that still stands today. Merchants paid for it with a tax on "
    "every barrel of wine that passed the bridge, and the records of that tax are the oldest "
    "documents in the city archive. Later the railway arrived, the old walls were torn down "
    "to make room for wide avenues, and factories rose along the canal on the eastern side."
)


def _best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def prompts_from(tokenizer: Any, lengths: tuple[int, ...]) -> dict[int, list[int]]:
    corpus = tokenizer(TEXT_SEED * 60)["input_ids"]
    return {n: corpus[7:7 + n] for n in lengths}


class KvflowEngine:
    """kvflow's LLM, one request at a time (prefix caching off: every prompt recomputed)."""

    def __init__(self, path: Path, dtype: str, quantization: str | None = None) -> None:
        from kvflow import LLM

        self.llm = LLM(str(path), enable_prefix_caching=False, quantization=quantization,
                       dtype=dtype, disable_log_stats=True, kv_cache_memory_gb=1.0)

    def _timed(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        from kvflow import SamplingParams

        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - t0, list(out[0].outputs[0].token_ids)

    def ttft(self, prompt: list[int]) -> float:
        return self._timed(prompt, 1)[0]

    def generate(self, prompt: list[int], tokens: int) -> tuple[list[int], float]:
        first = min(self.ttft(prompt) for _ in range(2))
        elapsed, ids = self._timed(prompt, tokens)
        return ids, (tokens - 1) / (elapsed - first)


class HfEngine:
    def __init__(self, path: Path) -> None:
        from hf_baselines import SingleStream

        self.hf = SingleStream(path)

    def ttft(self, prompt: list[int]) -> float:
        return self.hf.ttft(prompt)

    def generate(self, prompt: list[int], tokens: int) -> tuple[list[int], float]:
        return [], self.hf.decode_tok_s(prompt, tokens)


def measure(engines: dict[str, Any], prompts: dict[int, list[int]], tokens: int,
            rounds: int) -> dict[str, dict[str, Any]]:
    """Round-robin over the engines, `rounds` times; each figure is an engine's best round.

    Interleaving keeps slow drifts of this shared machine from favouring whichever engine
    happened to run first."""
    short = prompts[PROMPT_LENGTHS[0]]
    for engine in engines.values():
        engine.ttft(short)  # warm-up
    results: dict[str, dict[str, Any]] = {name: {} for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            r = results[name]
            for n, prompt in prompts.items():
                key = f"ttft_{n}_ms"
                r[key] = min(r.get(key, float("inf")), round(1000 * engine.ttft(prompt), 1))
            ids, rate = engine.generate(short, tokens)
            if rate > r.get("decode_tok_s", 0.0):
                r["decode_tok_s"], r["tokens"] = round(rate, 1), ids
    return results


def bare_forward_ms(path: Path, prompt: list[int], repeats: int) -> float:
    """kvflow's model alone over one prompt: forward + logits of the last token."""
    from kvflow.model import hugepages
    from kvflow.model.attention import build_attention_metadata, kv_cache_shape
    from kvflow.model.loader import load_model

    model = hugepages.move_to_hugepages_(load_model(path, torch.float32, torch.device("cpu")))
    block = 16
    blocks = -(-len(prompt) // block)
    shape = kv_cache_shape(blocks, block, model.num_kv_heads, model.head_dim)
    caches = [torch.zeros(shape) for _ in range(model.num_layers)]
    ids, positions = torch.tensor(prompt), torch.arange(len(prompt))

    def once() -> float:
        t0 = time.perf_counter()
        metadata = build_attention_metadata([len(prompt)], [len(prompt)], [list(range(blocks))],
                                            block, torch.device("cpu"), cpu_kernel=True)
        with torch.inference_mode():
            hidden = model(ids, positions, caches, metadata)
            model.compute_logits(hidden[-1:])
        return time.perf_counter() - t0

    once()
    return round(1000 * _best(once, repeats), 1)


def perplexity(path: Path, text_ids: list[int], quantization: str | None,
               chunk: int = 64) -> float:
    """exp(mean next-token cross-entropy) of kvflow's model over one fixed text, fed in
    chunks of `chunk` tokens over the cached context: at up to 64 tokens int8 layers take
    the decode kernel (int8 activations too), the path that generation uses."""
    from kvflow.model import hugepages
    from kvflow.model.attention import build_attention_metadata, kv_cache_shape
    from kvflow.model.loader import load_model

    model = hugepages.move_to_hugepages_(
        load_model(path, torch.float32, torch.device("cpu"), quantization))
    block = 16
    blocks = -(-len(text_ids) // block)
    shape = kv_cache_shape(blocks, block, model.num_kv_heads, model.head_dim)
    caches = [torch.zeros(shape) for _ in range(model.num_layers)]
    table = [list(range(blocks))]
    losses = []
    with torch.inference_mode():
        for start in range(0, len(text_ids) - 1, chunk):
            ids = text_ids[start:start + chunk]
            metadata = build_attention_metadata([len(ids)], [start + len(ids)], table, block,
                                                torch.device("cpu"), cpu_kernel=True)
            hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), caches,
                           metadata)
            targets = text_ids[start + 1:start + 1 + len(ids)]
            logits = model.compute_logits(hidden[:len(targets)]).float()
            losses.append(torch.nn.functional.cross_entropy(
                logits, torch.tensor(targets), reduction="sum"))
    return math.exp((sum(losses) / (len(text_ids) - 1)).item())


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two runs share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(b))


def ratios_of(engines: dict[str, dict[str, Any]], bare: float, ppl: dict[str, float],
              limits: dict[str, Any]) -> dict[str, float]:
    """kvflow against itself across precisions, its bounds, and the other engines."""
    ours, bf16, int8 = engines["kvflow"], engines["kvflow_bf16"], engines["kvflow_int8"]
    ratios: dict[str, float] = {
        "ttft_512_vs_bare_forward": round(ours["ttft_512_ms"] / bare, 2),
        "int8_decode_vs_fp32": round(int8["decode_tok_s"] / ours["decode_tok_s"], 2),
        "int8_ppl_change_pct": round(100 * (ppl["int8"] / ppl["float32"] - 1), 2),
        "decode_vs_bandwidth_bound": round(
            ours["decode_tok_s"] / limits["bandwidth_bound_tok_s_fp32"], 2),
        "bf16_decode_vs_fp32": round(bf16["decode_tok_s"] / ours["decode_tok_s"], 2),
        "fp32_ttft_512_vs_bf16": round(ours["ttft_512_ms"] / bf16["ttft_512_ms"], 2),
        "bf16_decode_vs_bandwidth_bound": round(
            bf16["decode_tok_s"] / limits["bandwidth_bound_tok_s_bf16"], 2),
        "greedy_prefix_bf16_equal_to_fp32": _same_prefix(bf16["tokens"], ours["tokens"]),
    }
    for name, base in (("hf", ours), ("llamacpp_f32", ours), ("llamacpp_bf16", bf16),
                       ("llamacpp_q8_0", int8)):
        if name in engines:
            theirs = engines[name]["decode_tok_s"]
            ratios[f"decode_vs_{name}"] = round(base["decode_tok_s"] / theirs, 2)
    for name, base in (("llamacpp_f32", ours), ("llamacpp_bf16", bf16)):
        if name in engines:
            ratios[f"greedy_prefix_equal_to_{name}"] = _same_prefix(base["tokens"],
                                                                     engines[name]["tokens"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128, help="decode length")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all engines")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/single_stream.json")
    args = parser.parse_args()

    import llamacpp
    import roofline
    from transformers import AutoTokenizer

    from kvflow.model.registry import resolve_model

    torch.set_num_threads(2)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = prompts_from(tokenizer, PROMPT_LENGTHS)
    runners: dict[str, Any] = {"kvflow": KvflowEngine(path, "float32"),
                               "kvflow_bf16": KvflowEngine(path, "bfloat16"),
                               "kvflow_int8": KvflowEngine(path, "float32", "int8")}
    if not args.skip_hf:
        runners["hf"] = HfEngine(path)
    if not args.skip_llamacpp and llamacpp.available() and args.model is None:
        for qtype in ("F32", "BF16", "Q8_0"):
            runners[f"llamacpp_{qtype.lower()}"] = llamacpp.LlamaCpp(
                llamacpp.default_model_as(qtype), seq_len=max(PROMPT_LENGTHS) + args.tokens + 8)
    engines = measure(runners, prompts, args.tokens, args.repeats)
    del runners
    bare = bare_forward_ms(path, prompts[512], args.repeats)
    text = tokenizer(PERPLEXITY_TEXT)["input_ids"]
    ppl = {q or "float32": round(perplexity(path, text, q), 4) for q in (None, "int8")}
    limits = roofline.measure(path)

    ratios = ratios_of(engines, bare, ppl, limits)
    for e in engines.values():
        e.pop("tokens", None)
    result = {"benchmark": "single_stream", "model": path.name, "decode_tokens": args.tokens,
              "engines": engines, "bare_forward_512_ms": bare, "perplexity": ppl,
              "roofline": limits, "ratios": ratios}
    write_result(args.json, result)
    parts = [f"{name} {e['decode_tok_s']} tok/s ttft32 {e['ttft_32_ms']} ms ttft512 "
             f"{e['ttft_512_ms']} ms" for name, e in engines.items()]
    print(f"single_stream: {'; '.join(parts)}; bare forward 512 {bare} ms; ratios {ratios}; "
          f"roofline {roofline.describe(limits)} ({path.name}; {cpu_isa_line()})")


if __name__ == "__main__":
    main()
