"""Prompt lookup: the longest suffix in the window, its latest earlier occurrence."""

from __future__ import annotations

from kvflow.spec_decode.ngram import propose_ngram


def test_no_match_and_short_inputs() -> None:
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert propose_ngram([5], 3, 1, 3) == []
    assert propose_ngram([1, 2, 1], 0, 1, 3) == []


def test_longest_suffix_wins_over_a_later_shorter_one() -> None:
    # suffix [2, 3] occurred at 1 (followed by 4); [3] alone occurred later (followed by 9)
    tokens = [1, 2, 3, 4, 5, 3, 9, 2, 3]
    assert propose_ngram(tokens, 2, 1, 2) == [4, 5]
    assert propose_ngram(tokens, 2, 1, 1) == [9, 2]


def test_latest_occurrence_and_window_bounds() -> None:
    tokens = [7, 8, 1, 7, 8, 2, 7, 8]
    assert propose_ngram(tokens, 3, 2, 2) == [2, 7, 8]
    assert propose_ngram([1, 2, 3, 9, 2, 3], 2, 3, 3) == []  # needs 3 tokens to match
    assert propose_ngram([1, 2, 3, 1, 2], 5, 2, 4) == [3, 1, 2]  # fewer than k follow


def test_matches_only_on_token_boundaries() -> None:
    # 256 = bytes 00 01 00 00: a byte-level hit straddling tokens must not count
    tokens = [256, 1, 0, 5, 1]
    assert propose_ngram(tokens, 2, 1, 1) == [0, 5]
    assert propose_ngram([1 << 16, 0, 1, 0], 1, 2, 2) == []
