"""llama.cpp baselines through llama-cpp-python (the optional `bench` extra).

`write_gguf` re-encodes a GGUF file with every tensor dequantized, then stored as F32, BF16
(rounded to nearest even) or Q8_0: the same weights kvflow loads from that file, at the same
precision.
`LlamaCpp` drives llama.cpp's own batch API: one stream, or many sequences batched per
`llama_decode` call the way its server's continuous batching does (new prompts join the
running decodes), greedy on every row.
`llama_server_binary` finds llama.cpp's own server (benchmarks/build_llama_server.sh builds
it from the same pinned sources); `server_single_stream` times one stream on it, for the
machines where llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

Work = list[tuple[list[int], int]]  # (prompt token ids, output tokens)

LLAMA_CPP_VERSION = "0.3.36"  # the `bench` extra's llama-cpp-python pin
_FILE_TYPES = {"F32": 0, "Q8_0": 7, "BF16": 32}  # llama_ftype: ALL_F32, MOSTLY_Q8_0, MOSTLY_BF16


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_server_binary(explicit: str | None = None) -> Path | None:
    """explicit, else $LLAMA_SERVER, else the build script's cached binary."""
    from kvflow.model.cache import cache_dir

    found = explicit or os.environ.get("LLAMA_SERVER")
    cached = cache_dir() / "llama.cpp" / f"llama-server-{LLAMA_CPP_VERSION}"
    path = Path(found) if found else cached
    return path if path.is_file() and os.access(path, os.X_OK) else None


def server_single_stream(binary: Path, gguf: Path, prompts: list[list[int]], max_tokens: int,
                         threads: int, log: Path) -> tuple[float, list[list[int]]]:
    """Greedy output tokens/s of llama-server with one slot, the prompts one after the
    other (prompt cache off, each request timed from send to last token), and the outputs."""
    import httpx
    from common import free_port, start_server, stop_server

    port = free_port()
    proc = start_server([str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port",
                         str(port), "--parallel", "1", "--ctx-size", "4096", "--threads",
                         str(threads), "--threads-batch", str(threads), "--no-webui"],
                        port, log)
    url = f"http://127.0.0.1:{port}/completion"
    try:
        body: dict[str, Any] = {"prompt": prompts[0], "n_predict": 4, "temperature": 0.0,
                                "cache_prompt": False}
        httpx.post(url, json=body, timeout=600).raise_for_status()  # warm-up
        outputs, elapsed = [], 0.0
        for prompt in prompts:
            body = {**body, "prompt": prompt, "n_predict": max_tokens,
                    "return_tokens": True}
            start = time.perf_counter()
            reply = httpx.post(url, json=body, timeout=600)
            elapsed += time.perf_counter() - start
            reply.raise_for_status()
            outputs.append(list(reply.json()["tokens"]))
        return sum(map(len, outputs)) / elapsed, outputs
    finally:
        stop_server(proc)


def default_gguf() -> Path:
    """The packaged default model's GGUF file (the one kvflow converts)."""
    from kvflow.model.registry import DEFAULT_MODEL, PACKAGED_MODELS, locate_packaged_file

    return locate_packaged_file(PACKAGED_MODELS[DEFAULT_MODEL])


def default_model_as(qtype: str) -> Path:
    """The default model's GGUF re-encoded as qtype, written once into kvflow's cache."""
    from kvflow.model.registry import cache_dir

    src = default_gguf()
    dst = cache_dir() / "bench" / f"{src.stem}.{qtype}.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(src, dst, qtype)


def write_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """Copy src's metadata and tensors into dst, each 2-D tensor as qtype (F32, BF16, Q8_0).

    1-D tensors (norms, biases) stay F32, as llama.cpp's own converter keeps them.
    Skipped when dst exists and is newer than src.
    """
    import gguf

    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst) + ".part", arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",
                                                             "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(_FILE_TYPES[qtype])
    target = gguf.GGMLQuantizationType[qtype]
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(tensor.shape.tolist())])
        if values.ndim == 2 and target != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, target), raw_dtype=target)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(dst) + ".part").rename(dst)
    return dst


class LlamaCpp:
    """One llama.cpp context with room for `max_seqs` sequences of up to `seq_len` tokens."""

    def __init__(self, gguf_file: Path, max_seqs: int = 1, seq_len: int = 1024,
                 n_batch: int = 512, threads: int = 2) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        lc.llama_log_set(_SILENT, None)
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf_file).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_file}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = max_seqs * seq_len
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = max_seqs
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True  # one cache shared by all sequences, as the server runs
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.max_seqs, self.n_batch = max_seqs, n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, logits
        b.n_tokens = len(rows)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, row: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _prefill(self, prompt: list[int], seq: int = 0) -> int:
        """Feed a prompt in chunks of n_batch; the greedy token after it."""
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start:start + self.n_batch]
            self._decode([(t, start + j, seq, start + j == len(prompt) - 1)
                          for j, t in enumerate(chunk)])
        return self._argmax(len(chunk) - 1)

    def ttft(self, prompt: list[int]) -> float:
        """Seconds from an empty cache to the first greedy token of `prompt`."""
        self._clear()
        t0 = time.perf_counter()
        self._prefill(prompt)
        return time.perf_counter() - t0

    def generate(self, prompt: list[int], tokens: int) -> tuple[list[int], float]:
        """Greedy tokens of one stream and the decode tokens/s after the first token."""
        self._clear()
        out = [self._prefill(prompt)]
        t0 = time.perf_counter()
        while len(out) < tokens:
            self._decode([(out[-1], len(prompt) + len(out) - 1, 0, True)])
            out.append(self._argmax(0))
        return out, (tokens - 1) / (time.perf_counter() - t0)

    def batched(self, work: Work) -> float:
        """Output tokens/s over `work` with up to max_seqs sequences decoding together.

        Each llama_decode call carries one token per running sequence, then fills the rest of
        the batch with prompt tokens of admitted requests (in arrival order, chunked).
        """
        self._clear()
        memory = self.lc.llama_get_memory(self.ctx)
        waiting = list(range(len(work)))
        free = list(range(self.max_seqs))
        running: dict[int, tuple[int, int, int]] = {}  # seq -> (request, next token, its position)
        prefilling: dict[int, tuple[int, int]] = {}  # seq -> (request, prompt tokens fed)
        produced = [0] * len(work)
        t0 = time.perf_counter()
        while waiting or running or prefilling:
            while waiting and free:
                prefilling[free.pop()] = (waiting.pop(0), 0)
            rows = [(tok, pos, seq, True) for seq, (_, tok, pos) in running.items()]
            sampled = list(running)  # (batch row -> sequence) for the rows with logits
            rows_of = list(range(len(rows)))
            for seq, (req, fed) in list(prefilling.items()):
                prompt = work[req][0]
                take = min(self.n_batch - len(rows), len(prompt) - fed)
                if take <= 0:
                    break
                rows += [(prompt[j], j, seq, j == len(prompt) - 1) for j in range(fed, fed + take)]
                prefilling[seq] = (req, fed + take)
                if fed + take == len(prompt):
                    del prefilling[seq]
                    running[seq] = (req, -1, len(prompt) - 1)
                    sampled.append(seq)
                    rows_of.append(len(rows) - 1)
            self._decode(rows)
            for seq, row in zip(sampled, rows_of, strict=True):
                req, _, pos = running[seq]
                produced[req] += 1
                if produced[req] == work[req][1]:
                    del running[seq]
                    self.lc.llama_memory_seq_rm(memory, seq, -1, -1)
                    free.append(seq)
                else:
                    running[seq] = (req, self._argmax(row), pos + 1)
        return sum(produced) / (time.perf_counter() - t0)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _SILENT(level: int, text: bytes, user: object) -> None:  # noqa: N802
    return None
