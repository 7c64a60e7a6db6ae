"""Single-stream latency: time to first token (32- and 512-token prompts) and decode tokens/s.

One request at a time, greedy, EOS ignored, prefix caching off (every run recomputes its
prompt). Engines, all in this invocation on the same prompts:
- kvflow `LLM` in float32 and with quantization="int8";
- transformers `generate`, float32;
- llama.cpp (llama-cpp-python, `bench` extra) on the default model's GGUF re-encoded as F32
  and as Q8_0 (skipped when llama_cpp is not installed or the model is not the default).
Also: the bare forward pass of kvflow's model over the 512-token prompt (no engine around
it), the int8 model's perplexity on a fixed text against float32, and the roofline.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from common import TEXT_SEED, write_result

PROMPT_LENGTHS = (32, 512)


def _best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def prompts_from(tokenizer: Any, lengths: tuple[int, ...]) -> dict[int, list[int]]:
    corpus = tokenizer(TEXT_SEED * 60)["input_ids"]
    return {n: corpus[7:7 + n] for n in lengths}


def run_kvflow(path: Path, prompts: dict[int, list[int]], tokens: int, repeats: int,
               quantization: str | None = None) -> dict[str, Any]:
    from kvflow import LLM, SamplingParams

    llm = LLM(str(path), enable_prefix_caching=False, quantization=quantization,
              disable_log_stats=True, kv_cache_memory_gb=1.0)

    def timed(prompt: list[int], n: int) -> tuple[float, list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - t0, list(out[0].outputs[0].token_ids)

    timed(prompts[PROMPT_LENGTHS[0]], 2)  # warm-up
    result: dict[str, Any] = {}
    for n, prompt in prompts.items():
        result[f"ttft_{n}_ms"] = round(1000 * _best(lambda p=prompt: timed(p, 1)[0], repeats), 1)
    short = prompts[PROMPT_LENGTHS[0]]
    first = result[f"ttft_{PROMPT_LENGTHS[0]}_ms"] / 1000
    elapsed, ids = min(timed(short, tokens) for _ in range(2))
    result["decode_tok_s"] = round((tokens - 1) / (elapsed - first), 1)
    result["tokens"] = ids
    return result


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


def perplexity(path: Path, text_ids: list[int], quantization: str | None) -> float:
    """exp(mean next-token cross-entropy) of kvflow's model over one fixed text."""
    from kvflow.model.attention import build_attention_metadata, kv_cache_shape
    from kvflow.model.loader import load_model

    model = load_model(path, torch.float32, torch.device("cpu"), quantization)
    block = 16
    blocks = -(-len(text_ids) // block)
    shape = kv_cache_shape(blocks, block, model.num_kv_heads, model.head_dim)
    caches = [torch.zeros(shape) for _ in range(model.num_layers)]
    metadata = build_attention_metadata([len(text_ids)], [len(text_ids)],
                                        [list(range(blocks))], block, torch.device("cpu"))
    with torch.inference_mode():
        hidden = model(torch.tensor(text_ids), torch.arange(len(text_ids)), caches, metadata)
        logits = model.compute_logits(hidden[:-1]).float()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(text_ids[1:]))
    return math.exp(loss.item())


def run_hf(path: Path, prompts: dict[int, list[int]], tokens: int, repeats: int) -> dict[str, Any]:
    from hf_baselines import SingleStream

    hf = SingleStream(path)
    hf.ttft(prompts[PROMPT_LENGTHS[0]])  # warm-up
    result = {f"ttft_{n}_ms": round(1000 * _best(lambda p=p: hf.ttft(p), repeats), 1)
              for n, p in prompts.items()}
    result["decode_tok_s"] = round(hf.decode_tok_s(prompts[PROMPT_LENGTHS[0]], tokens), 1)
    return result


def run_llamacpp(gguf_file: Path, prompts: dict[int, list[int]], tokens: int,
                 repeats: int) -> dict[str, Any]:
    from llamacpp import LlamaCpp

    engine = LlamaCpp(gguf_file, seq_len=max(PROMPT_LENGTHS) + tokens + 8)
    engine.ttft(prompts[PROMPT_LENGTHS[0]])  # warm-up
    result: dict[str, Any] = {f"ttft_{n}_ms": round(1000 * _best(lambda p=p: engine.ttft(p),
                                                                 repeats), 1)
                              for n, p in prompts.items()}
    runs = [engine.generate(prompts[PROMPT_LENGTHS[0]], tokens) for _ in range(2)]
    result["decode_tok_s"] = round(max(r[1] for r in runs), 1)
    result["tokens"] = runs[0][0]
    engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128, help="decode length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/single_stream.json")
    args = parser.parse_args()

    import llamacpp
    import roofline
    from transformers import AutoTokenizer

    from kvflow.model.registry import cache_dir, resolve_model

    torch.set_num_threads(2)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = prompts_from(tokenizer, PROMPT_LENGTHS)
    engines: dict[str, dict[str, Any]] = {}
    engines["kvflow"] = run_kvflow(path, prompts, args.tokens, args.repeats)
    engines["kvflow_int8"] = run_kvflow(path, prompts, args.tokens, args.repeats, "int8")
    if not args.skip_hf:
        engines["hf"] = run_hf(path, prompts, args.tokens, args.repeats)
    if not args.skip_llamacpp and llamacpp.available() and args.model is None:
        src = llamacpp.default_gguf()
        for qtype in ("F32", "Q8_0"):
            dst = cache_dir() / "bench" / f"{src.stem}.{qtype}.gguf"
            dst.parent.mkdir(parents=True, exist_ok=True)
            engines[f"llamacpp_{qtype.lower()}"] = run_llamacpp(
                llamacpp.write_gguf(src, dst, qtype), prompts, args.tokens, args.repeats)
    bare = bare_forward_ms(path, prompts[512], args.repeats)
    text = tokenizer(TEXT_SEED * 40)["input_ids"][:1024]
    ppl = {q or "float32": round(perplexity(path, text, q), 4) for q in (None, "int8")}
    limits = roofline.measure(path)

    ours, int8 = engines["kvflow"], engines["kvflow_int8"]
    ratios: dict[str, float] = {
        "ttft_512_vs_bare_forward": round(ours["ttft_512_ms"] / bare, 2),
        "int8_decode_vs_fp32": round(int8["decode_tok_s"] / ours["decode_tok_s"], 2),
        "int8_ppl_change_pct": round(100 * (ppl["int8"] / ppl["float32"] - 1), 2),
        "decode_vs_bandwidth_bound": round(
            ours["decode_tok_s"] / limits["bandwidth_bound_tok_s_fp32"], 2),
    }
    for name, base in (("hf", ours), ("llamacpp_f32", ours), ("llamacpp_q8_0", int8)):
        if name in engines:
            theirs = engines[name]["decode_tok_s"]
            ratios[f"decode_vs_{name}"] = round(base["decode_tok_s"] / theirs, 2)
    if "llamacpp_f32" in engines:
        theirs_ids = engines["llamacpp_f32"]["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(ours["tokens"], theirs_ids, strict=True))
                     if a != b), len(theirs_ids))
        ratios["greedy_prefix_equal_to_llamacpp_f32"] = same
    for e in engines.values():
        e.pop("tokens", None)
    result = {"benchmark": "single_stream", "model": path.name, "decode_tokens": args.tokens,
              "engines": engines, "bare_forward_512_ms": bare, "perplexity": ppl,
              "roofline": limits, "ratios": ratios}
    write_result(args.json, result)
    parts = [f"{name} {e['decode_tok_s']} tok/s ttft32 {e['ttft_32_ms']} ms ttft512 "
             f"{e['ttft_512_ms']} ms" for name, e in engines.items()]
    print(f"single_stream: {'; '.join(parts)}; bare forward 512 {bare} ms; ratios {ratios}; "
          f"roofline {roofline.describe(limits)} ({path.name})")


if __name__ == "__main__":
    main()
