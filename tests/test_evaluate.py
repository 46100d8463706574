"""Sampling evaluation (hdpo_ds/recipes/evaluate.py): pass@k, temperature sampling, diversity, prompts,
pairs."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from hdpo_ds.data import DataError
from hdpo_ds.recipes.evaluate import (
    PromptSamples,
    check_arith,
    distinct_n,
    load_checker,
    load_prompts,
    pass_at_k,
    sample_completions,
    summarise,
)
from hdpo_ds.tools.sampled_pairs import build_pairs

# ---------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 0, 1, Fraction(0)),
        (1, 1, 1, Fraction(1)),
        (10, 3, 1, Fraction(3, 10)),  # pass@1 = c / n
        (4, 1, 2, Fraction(1, 2)),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, Fraction(7, 10)),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (6, 2, 3, Fraction(4, 5)),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
        (8, 5, 4, Fraction(1)),  # n - c < k: every draw holds a correct sample
        (32, 0, 16, Fraction(0)),
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-15)


def test_pass_at_k_matches_exact_binomials():
    for n in (1, 2, 7, 20, 64, 200):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for k in sorted({1, min(2, n), n // 4 or 1, n // 2 or 1, n}):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_matches_brute_force_enumeration():
    """Every k-subset of n labelled samples, counted: the fraction holding a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            labels = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(any(labels[i] for i in s) for s in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite_and_monotone():
    values = [pass_at_k(1000, 3, k) for k in (1, 10, 100, 500, 998)]
    assert values == sorted(values) and values[-1] == 1.0
    assert values[0] == pytest.approx(0.003)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_floats():
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)


# ---------------------------------------------------------------------------------------------- sampling


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the previous token (a table), with the call
    signature and KV-cache handling sample_completions uses."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (V, V): row = previous token

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True
    ):
        from types import SimpleNamespace

        class _Cache:
            def batch_repeat_interleave(self, n):
                pass

        logits = self.table[input_ids]  # (B, L, V)
        return SimpleNamespace(logits=logits, past_key_values=past_key_values or _Cache())


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum()), len(probs) - 1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sampling_reproduces_softmax_over_temperature(temperature):
    """Pearson chi-square of the first two sampled tokens against softmax(logits / T), fixed seed.

    Critical values: chi2(0.999) for 5 degrees of freedom is 20.52; the statistic of a biased sampler
    (e.g. one that ignores T, or samples at T = 1) is in the hundreds here (checked below)."""
    vocab = 6
    torch.manual_seed(0)
    table = torch.randn(vocab, vocab) * 1.5
    table[:, 0] = -1e9  # token 0 is the pad/EOS stand-in: never sampled, so no row stops early
    model = _FixedLogits(table)
    n = 20000
    (samples,) = sample_completions(
        model,
        [[3]],
        [0],
        n=n,
        temperature=temperature,
        max_new_tokens=2,
        eos_token_id=0,
        pad_token_id=0,
        seed=123,
    )
    first = np.array([t[0] for t in samples.tokens])
    probs = torch.softmax(table[3, 1:] / temperature, dim=-1).double().numpy()
    counts = np.bincount(first, minlength=vocab)[1:]
    stat, dof = _chi_square(counts, probs)
    assert dof == 4
    assert stat < 18.47, (stat, counts, probs * n)  # chi2(0.999, 4 dof) = 18.47
    wrong = torch.softmax(table[3, 1:] / (temperature * 1.5), dim=-1).double().numpy()
    assert _chi_square(counts, wrong)[0] > 60  # the test has the power to see a wrong temperature
    # The second token, given the first: each conditional distribution separately.
    second = np.array([t[1] for t in samples.tokens])
    total = 0.0
    for prev in range(1, vocab):
        rows = second[first == prev]
        cond = torch.softmax(table[prev, 1:] / temperature, dim=-1).double().numpy()
        total += _chi_square(np.bincount(rows, minlength=vocab)[1:], cond)[0]
    assert total < 45.3  # chi2(0.999, 20 dof)
    # The recorded entropies are those of the two distributions along the sampled path.
    logp1 = torch.log_softmax(table[3], -1)
    assert samples.entropy_sums[0] == pytest.approx(
        float(
            -(logp1.exp() * logp1).sum()
            - (lambda lp: (lp.exp() * lp).sum())(torch.log_softmax(table[first[0]], -1))
        ),
        rel=1e-4,
    )


def _tiny_llama(vocab=24):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def test_samples_do_not_depend_on_batching_or_padding():
    """A prompt's samples are the same alone (no padding) as in a left-padded batch with other prompts,
    and the KV-cached decode equals a full recompute of every step's logits."""
    model = _tiny_llama()
    prompts = [[1, 5, 6, 7], [1, 5, 6, 7, 8, 9, 10, 11], [1, 3]]
    kwargs = dict(n=5, temperature=1.0, max_new_tokens=10, eos_token_id=2, pad_token_id=0, seed=7)
    together = {
        s.index: s for s in sample_completions(model, prompts, [10, 11, 12], prompts_per_batch=3, **kwargs)
    }
    for i, p in enumerate(prompts):
        (alone,) = sample_completions(model, [p], [10 + i], **kwargs)
        assert alone.tokens == together[10 + i].tokens
        assert alone.entropy_sums == pytest.approx(together[10 + i].entropy_sums, rel=1e-5)
    # Recompute: feed prompt + sampled prefix without a cache; the entropy of each step's distribution
    # must add up to what the cached decode recorded.
    s = together[11]
    for j in range(5):
        seq, total = list(prompts[1]), 0.0
        steps = s.tokens[j] + ([2] if s.finished[j] else [])
        for tok in steps:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
            total += float(-(logp.exp() * logp).sum())
            seq.append(tok)
        assert total == pytest.approx(s.entropy_sums[j], rel=1e-4)
        assert s.counts[j] == len(steps)


def test_samples_stop_at_eos_and_respect_max_new_tokens():
    table = torch.full((4, 4), -1e9)
    table[1, 3] = 0.0  # after the prompt's last token (1): always 3
    table[3, 2] = 0.0  # after 3: always EOS (2)
    (s,) = sample_completions(
        _FixedLogits(table),
        [[1]],
        [0],
        n=3,
        temperature=0.7,
        max_new_tokens=5,
        eos_token_id=2,
        pad_token_id=0,
        seed=0,
    )
    assert s.tokens == [[3], [3], [3]] and s.finished == [True] * 3 and s.counts == [2, 2, 2]
    table[3, 2], table[3, 3] = -1e9, 0.0  # 3 forever: cut at max_new_tokens, not finished
    (s,) = sample_completions(
        _FixedLogits(table),
        [[1]],
        [0],
        n=2,
        temperature=1.0,
        max_new_tokens=4,
        eos_token_id=2,
        pad_token_id=0,
        seed=0,
    )
    assert s.tokens == [[3, 3, 3, 3]] * 2 and s.finished == [False, False] and s.counts == [4, 4]


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        list(
            sample_completions(
                _tiny_llama(),
                [[1]],
                [0],
                n=1,
                temperature=0.0,
                max_new_tokens=1,
                eos_token_id=2,
                pad_token_id=0,
                seed=0,
            )
        )


# --------------------------------------------------------------------------------------- diversity and report


def test_distinct_n_hand_worked():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert distinct_n(seqs, 3) == 1.0
    assert distinct_n(seqs, 4) == 0.0  # no 4-gram at all
    assert distinct_n([[5, 5, 5, 5]], 2) == pytest.approx(1 / 3)


def test_summarise_against_a_naive_computation():
    rng = random.Random(0)
    samples, correct, texts = [], [], []
    for i in range(6):
        toks = [[rng.randint(3, 6) for _ in range(rng.randint(1, 6))] for _ in range(8)]
        ok = [rng.random() < 0.4 for _ in range(8)]
        samples.append(
            PromptSamples(
                i,
                1.0,
                toks,
                [True] * 8,
                [len(t) * 0.5 for t in toks],
                [len(t) * 0.7 for t in toks],
                [len(t) + 1 for t in toks],
            )
        )
        correct.append(ok)
        texts.append([" ".join(map(str, t)) for t in toks])
    out = summarise(samples, correct, texts, [1, 2, 8])
    for k in (1, 2, 8):
        naive = np.mean([1 - math.comb(8 - sum(c), k) / math.comb(8, k) for c in correct])
        assert out[f"pass_at_{k}"] == pytest.approx(naive)
    tokens = sum(len(t) + 1 for s in samples for t in s.tokens)
    assert out["token_entropy"] == pytest.approx(
        sum(len(t) * 0.5 for s in samples for t in s.tokens) / tokens
    )
    assert out["distinct_2"] == pytest.approx(np.mean([distinct_n(s.tokens, 2) for s in samples]))
    naive_distinct = np.mean(
        [len({t for t, ok in zip(tx, c, strict=True) if ok}) for tx, c in zip(texts, correct, strict=True)]
    )
    assert out["distinct_correct"] == pytest.approx(naive_distinct)
    assert out["correct_rate"] == pytest.approx(np.mean([np.mean(c) for c in correct]))


def test_arith_checker_reads_the_final_answer():
    record = {"answer": "33"}
    assert check_arith("15+3=18 7+8=15 18+15=33 A:33", record)
    assert not check_arith("15+3=18 7+8=15 18+15=33 A:34", record)
    assert not check_arith("15+3=18 7+8=15 18+15=33", record)  # no "A:", though 33 is there
    assert check_arith("A:3 A:33", record)  # only the last "A:" counts
    assert not check_arith("A:33 7", record) and not check_arith("A:", record)  # it must end with the answer


def test_unknown_checker_is_named():
    with pytest.raises(ValueError, match="--checker"):
        load_checker("nope")
    fn, fields = load_checker("hdpo_ds.recipes.evaluate:check_exact")
    assert fn("  x ", {"answer": "x"}) and fields == ()


def test_bad_prompt_rows_name_file_record_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl: record 1: field 'answer'"):
        load_prompts(str(path), ["answer"])
    path.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"record 0: field 'prompt'"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(DataError, match="duplicate id"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a"\n')
    with pytest.raises(DataError, match="record 0"):
        load_prompts(str(path))


# ----------------------------------------------------------------------------------------- pairs from samples


def test_pairs_by_correctness(tmp_path):
    rows = []
    for completion, ok in [("a", True), ("b", True), ("b", True), ("x", False), ("y", False), ("z", False)]:
        rows.append({"id": "p1", "prompt": "P1", "completion": completion, "correct": ok})
    rows += [{"id": "p2", "prompt": "P2", "completion": "c", "correct": True}]  # all correct: no pair
    rows += [{"id": "p3", "prompt": "P3", "completion": "w", "correct": False}]  # all incorrect: no pair
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evaluation, counts = build_pairs(str(path), pairs_per_prompt=5, eval_fraction=0.0, seed=0)
    assert evaluation == [] and len(train) == 2  # 2 distinct correct completions of p1, so 2 pairs
    assert {p["chosen"] for p in train} == {"a", "b"} and {p["rejected"] for p in train} <= {"x", "y", "z"}
    assert all(p["prompt"] == "P1" for p in train) and len({p["rejected"] for p in train}) == 2
    assert counts == {
        "duplicate_completions": 1,
        "prompts_all_correct": 1,
        "prompts_all_incorrect": 1,
        "prompts_with_pairs": 1,
        "prompts": 3,
        "train_pairs": 2,
        "eval_pairs": 0,
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "p", "prompt": "P", "completion": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: record 0: field 'correct'"):
        build_pairs(str(tmp_path / "bad.jsonl"), pairs_per_prompt=1, eval_fraction=0.0, seed=0)
