"""Prompt-lookup proposals: continue the text the way it continued before.

The request's last n tokens (n from prompt_lookup_max down to prompt_lookup_min, longest
first) are looked up earlier in its prompt + output; the k tokens that followed the latest
earlier occurrence are proposed. Input-grounded outputs (summaries, edits, code that copies
names) repeat long runs of their prompt, so most of those tokens are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ITEM = 4  # bytes per token id in the search buffer (int32)


def propose_ngram(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching
    suffix; [] when no suffix of min_n..max_n tokens occurred before."""
    num_tokens = len(token_ids)
    if k < 1 or num_tokens <= min_n:
        return []
    # bytes.rfind searches in C; a hit must start on a token boundary to count
    data = np.asarray(token_ids, dtype=np.int32).tobytes()  # [num_tokens * 4]
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        pattern = data[(num_tokens - n) * _ITEM:]
        end = len(data) - _ITEM  # a match must end before the suffix's own last token
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % _ITEM == 0:
                start = at // _ITEM + n
                return list(token_ids[start:start + k])
            end = at + len(pattern) - 1
    return []
