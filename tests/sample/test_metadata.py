"""SamplingMetadata.build: which tensors exist for which batch, and what they hold."""

from __future__ import annotations

import pytest
import torch

from kvflow.sample.metadata import SamplingMetadata, validate_token_ids
from kvflow.sampling_params import SamplingParams

V = 16
CPU = torch.device("cpu")


def build(
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(
        params,
        [[1, 2, 3]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        V,
        CPU,
    )


def cells(index: tuple[torch.Tensor, torch.Tensor] | None) -> set[tuple[int, int]]:
    if index is None:
        return set()
    return set(zip(index[0].tolist(), index[1].tolist(), strict=True))


def test_plain_random_batch_pays_nothing() -> None:
    md = build([SamplingParams(), SamplingParams(temperature=0.5)])
    assert md.all_random and not md.all_greedy
    assert md.is_greedy is None and md.default_rng_rows is None and md.generators == {}
    assert md.top_k is None and md.top_p is None and md.min_p is None
    assert md.no_top_k and md.no_top_p and md.no_min_p
    assert md.no_penalties and md.no_logit_controls
    assert md.seen_cells is None and md.output_cells is None and md.output_seen_cells is None
    assert md.max_num_logprobs is None
    assert md.temperature is not None and md.temperature.tolist() == [1.0, 0.5]


def test_all_greedy_batch_has_no_sampling_tensors() -> None:
    md = build([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=5)])
    assert md.all_greedy and not md.all_random
    assert md.temperature is None and md.top_k is None and md.is_greedy is None


def test_mixed_batch_fields() -> None:
    gen = torch.Generator().manual_seed(3)
    greedy_gen = torch.Generator().manual_seed(4)
    params = [
        SamplingParams(temperature=0.0),  # greedy, its generator must be ignored
        SamplingParams(temperature=0.7, top_k=4, seed=1),
        SamplingParams(top_p=0.9, min_p=0.1, logprobs=2),
        SamplingParams(top_k=V + 5, logprobs=5),  # top_k beyond V is no filter
    ]
    md = build(params, generators=[greedy_gen, gen, None, None])
    assert not md.all_greedy and not md.all_random
    assert md.is_greedy is not None and md.is_greedy.tolist() == [True, False, False, False]
    assert md.temperature is not None
    torch.testing.assert_close(md.temperature, torch.tensor([1.0, 0.7, 1.0, 1.0]))
    assert md.top_k is not None and md.top_k.tolist() == [V, 4, V, V]
    assert md.max_top_k == 4
    assert md.top_p is not None and md.top_p.tolist() == pytest.approx([1.0, 1.0, 0.9, 1.0])
    assert md.min_p is not None and md.min_p.tolist() == pytest.approx([0.0, 0.0, 0.1, 0.0])
    assert md.generators == {1: gen}
    assert md.default_rng_rows is not None and md.default_rng_rows.tolist() == [2, 3]
    assert md.max_num_logprobs == 5


def test_penalty_tensors_and_history_cells() -> None:
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams()]
    md = build(params, outputs=[[4, 4, 5], [6]])
    assert md.frequency_penalties is not None and md.frequency_penalties.tolist() == [0.5, 0.0]
    assert md.presence_penalties is None and md.repetition_penalties is None
    assert md.seen_cells is None  # only repetition looks at the prompt
    assert md.output_cells is not None
    assert sorted(zip(*(t.tolist() for t in md.output_cells), strict=True)) == [
        (0, 4), (0, 4), (0, 5), (1, 6)]  # repeats kept: frequency counts them
    md = build([SamplingParams(presence_penalty=1.0)] * 2, outputs=[[4, 4, 5], []])
    assert cells(md.output_seen_cells) == {(0, 4), (0, 5)}
    assert md.output_seen_cells is not None and len(md.output_seen_cells[0]) == 2  # distinct
    md = build([SamplingParams(repetition_penalty=1.2)], outputs=[[3, 9]])
    assert md.seen_cells is not None and len(md.seen_cells[0]) == 4  # prompt 1 2 3 + output 9
    assert cells(md.seen_cells) == {(0, 1), (0, 2), (0, 3), (0, 9)}


def test_logit_bias_and_allowed_token_ids() -> None:
    params = [
        SamplingParams(logit_bias={3: 1.5, 7: -2.0}),
        SamplingParams(allowed_token_ids=[0, 9]),
        SamplingParams(),
    ]
    md = build(params)
    assert md.logit_bias is not None
    rows, ids, biases = md.logit_bias
    assert list(zip(rows.tolist(), ids.tolist(), biases.tolist(), strict=True)) == [
        (0, 3, 1.5),
        (0, 7, -2.0),
    ]
    mask = md.allowed_token_ids_mask
    assert mask is not None and mask.shape == (3, V)
    assert not mask[0].any() and not mask[2].any()
    assert [t for t in range(V) if not mask[1, t]] == [0, 9]


def test_bad_words_cells_follow_the_output() -> None:
    params = SamplingParams()
    params.bad_words_token_ids = [[5], [1, 2, 7], [9, 8], [V + 3]]
    md = build([params, params, params], outputs=[[], [4, 1, 2], [2, 9]])
    assert cells(md.bad_words) == {
        (0, 5),  # single-token words are always banned
        (1, 5), (1, 7),  # output ends with [1, 2]
        (2, 5), (2, 8),  # output ends with [9]
    }  # fmt: skip


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=[11], ignore_eos=True)
    params.all_stop_token_ids |= {2, V + 1}  # the engine adds EOS; V + 1 is out of range
    md = build([params, params, SamplingParams()], outputs=[[4], [4, 5], []])
    assert cells(md.min_tokens) == {(0, 2), (0, 11)}


def test_validate_token_ids() -> None:
    validate_token_ids(SamplingParams(logit_bias={V - 1: 1.0}, allowed_token_ids=[0]), V)
    with pytest.raises(ValueError, match="logit_bias"):
        validate_token_ids(SamplingParams(logit_bias={V: 1.0}), V)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        build([SamplingParams(allowed_token_ids=[1, V])])


def test_rows_must_line_up() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingMetadata.build([SamplingParams()], [[1]], [], [None], V, CPU)


def test_empty_batch() -> None:
    md = build([])
    assert md.all_greedy and md.no_penalties and md.no_logit_controls
