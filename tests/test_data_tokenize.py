"""Tokenization, truncation and the Arrow cache (hdpo_ds/data/tokenize.py), with a tokenizer trained here."""

from __future__ import annotations

import json
import os
import threading

import pytest

from hdpo_ds.data import tokenize as tokenize_module
from hdpo_ds.data.records import DataError, PreferenceRecord, load_records
from hdpo_ds.data.tokenize import tokenize_pairs, tokenizer_fingerprint
from tests.data_helpers import CHAT_TEMPLATE, make_tokenizer

BOS, EOS = 1, 2
USER = {"role": "user", "content": "Say hello."}
HELLO = {"role": "assistant", "content": "Hello there!"}
HI = {"role": "assistant", "content": "Hi!"}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def text_record(prompt, chosen, rejected, index=0, rid=None) -> PreferenceRecord:
    return PreferenceRecord(rid or f"t{index}", prompt, chosen, rejected, source="mem", index=index)


def token_record(prompt_ids, chosen_ids, rejected_ids, index=0) -> PreferenceRecord:
    return PreferenceRecord(
        f"k{index}", None, None, None, tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids), "mem", index
    )


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def run(records, tok, **kw):
    kw.setdefault("max_length", 128)
    kw.setdefault("max_prompt_length", 64)
    return tokenize_pairs(records, tok, **kw)


# ---------------------------------------------------------------------------------------------------- text


def test_text_pair_prompt_gets_bos_response_gets_eos(tok):
    prompt, chosen, rejected = "Question: what is two plus two?", " Four.", " Five."
    res = run([text_record(prompt, chosen, rejected)], tok)
    (pair,) = list(res.pairs)
    assert pair.prompt_ids == [BOS, *encode(tok, prompt)]
    assert pair.chosen_ids == [*encode(tok, prompt + chosen)[len(encode(tok, prompt)) :], EOS]
    assert tok.convert_ids_to_tokens(pair.chosen_ids) == ["ĠF", "our", ".", "</s>"]
    assert tok.decode(pair.rejected_ids) == " Five.</s>"
    assert pair.chosen_has_eos and pair.rejected_has_eos
    assert res.stats["pairs"] == 1 and res.stats["tokens"] == 2 * len(pair.prompt_ids) + 4 + len(
        pair.rejected_ids
    )


def test_boundary_merge_fails_loudly_naming_record_and_field(tok):
    # Byte-level BPE attaches a space to the next word: "Answer: " + "Four." tokenizes " Four" as one piece,
    # so the prompt's trailing " " token is not a prefix of the joint tokenization.
    records = [text_record("Say hello.", " Hello!", " Hi!", 0), text_record("Answer: ", "Four.", "Five.", 1)]
    with pytest.raises(DataError) as info:
        run(records, tok)
    assert str(info.value).startswith(
        "mem: record 1: field 'chosen': tokenizer merges across the prompt/response boundary: the prompt "
        "alone tokenizes to ['Ġ'] at its end but prompt + response to ['ĠF']"
    )
    assert info.value.kind == "boundary_merge"
    skipped = run(records, tok, on_bad_record="skip")
    assert skipped.stats["boundary_merge"] == 1 and skipped.stats["pairs"] == 1
    assert skipped.pairs.ids == ["t0"]


# ---------------------------------------------------------------------------------------------------- chat


def test_chat_template_rendering_and_response_mask_boundary(tok):
    res = run([PreferenceRecord("c", [USER], [HELLO], [HI], source="mem", index=0)], tok)
    (pair,) = list(res.pairs)
    assert tok.decode(pair.prompt_ids) == "<s><|user|>\nSay hello.</s>\n<|assistant|>\n"
    assert tok.convert_ids_to_tokens(pair.prompt_ids)[:2] == ["<s>", "<|user|>"]
    # The response ends at EOS: the template's newline after it is never generated, so it is not trained on.
    assert tok.decode(pair.chosen_ids) == "Hello there!</s>"
    assert tok.decode(pair.rejected_ids) == "Hi!</s>"
    full = tok.apply_chat_template([USER, HELLO], tokenize=False)
    assert encode(tok, full) == pair.prompt_ids + pair.chosen_ids + encode(tok, "\n")


def test_multi_turn_conversation_with_system_message(tok):
    system = {"role": "system", "content": "Be brief."}
    rec = PreferenceRecord("m", [system, USER, HI, USER], [HELLO], [HI], source="mem", index=0)
    (pair,) = list(run([rec], tok).pairs)
    assert tok.decode(pair.prompt_ids) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nSay hello.</s>\n<|assistant|>\nHi!</s>\n"
        "<|user|>\nSay hello.</s>\n<|assistant|>\n"
    )
    assert tok.decode(pair.chosen_ids) == "Hello there!</s>"


def test_no_chat_template_is_a_clear_error_unless_one_is_given(tok, tmp_path):
    bare = make_tokenizer(chat_template=None)
    rec = PreferenceRecord("c", [USER], [HELLO], [HI], source="mem", index=0)
    with pytest.raises(DataError) as info:  # an input error (exit code 2), named by its config key
        run([rec], bare)
    assert str(info.value) == (
        "data.chat_template: the data holds conversations (lists of messages) but the tokenizer has no chat "
        "template; give one in data.chat_template (a Jinja template file)"
    )
    expected = list(run([rec], tok).pairs)
    assert list(run([rec], bare, chat_template=CHAT_TEMPLATE).pairs) == expected
    template_file = tmp_path / "template.jinja"
    template_file.write_text(CHAT_TEMPLATE)
    assert list(run([rec], bare, chat_template=str(template_file)).pairs) == expected
    # Text records need no template.
    assert run([text_record("Say hello.", " Hello!", " Hi!")], bare).stats["pairs"] == 1


def test_template_that_does_not_extend_the_prompt_is_rejected(tok):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    rec = PreferenceRecord("c", [USER], [HELLO], [HI], source="mem", index=3)
    with pytest.raises(DataError) as info:
        run([rec], tok, chat_template=template)
    assert str(info.value) == (
        "mem: record 3: field 'chosen': the chat template renders the prompt "
        "(with add_generation_prompt=True) differently from the start of the whole conversation, so prompt "
        "and response cannot be told apart"
    )


# ------------------------------------------------------------------------------------------------ truncation

PROMPT = [BOS, *range(10, 20)]  # 11 tokens, BOS first
LONG = [*range(20, 30), EOS]  # 11 tokens with EOS
SHORT = [30, 31, EOS]


def test_keep_end_keeps_bos_and_the_prompt_end_then_cuts_responses(tok):
    res = run(
        [token_record(PROMPT, LONG, SHORT)], tok, max_length=10, max_prompt_length=5, truncation="keep_end"
    )
    (pair,) = list(res.pairs)
    assert pair.prompt_ids == [BOS, 16, 17, 18, 19]
    assert pair.chosen_ids == [20, 21, 22, 23, 24] and not pair.chosen_has_eos
    assert pair.rejected_ids == SHORT and pair.rejected_has_eos
    assert {k: res.stats[k] for k in ("truncated_prompt", "truncated_response", "lost_eos", "pairs")} == {
        "truncated_prompt": 1,
        "truncated_response": 1,
        "lost_eos": 1,
        "pairs": 1,
    }


def test_keep_start_and_drop(tok):
    (pair,) = list(
        run(
            [token_record(PROMPT, LONG, SHORT)],
            tok,
            max_length=10,
            max_prompt_length=5,
            truncation="keep_start",
        ).pairs
    )
    assert pair.prompt_ids == [BOS, 10, 11, 12, 13] and pair.chosen_ids == [20, 21, 22, 23, 24]
    records = [token_record(PROMPT, LONG, SHORT, 0), token_record([BOS, 5], [6, EOS], [7, EOS], 1)]
    res = run(records, tok, max_length=10, max_prompt_length=5, truncation="drop")
    assert res.stats["dropped_overlength"] == 1 and res.stats["pairs"] == 1 and res.pairs.ids == ["k1"]
    # The prompt alone over max_prompt_length is over-long too, even if the total fits.
    res = run(
        [token_record(PROMPT, [6, EOS], [7, EOS])], tok, max_length=20, max_prompt_length=5, truncation="drop"
    )
    assert res.stats["dropped_overlength"] == 1 and len(res.pairs) == 0


def test_text_response_losing_eos_and_pairs_made_identical_by_truncation(tok):
    prompt = "Say hello."
    records = [
        text_record(prompt, " Hello there! Good morning, how are you today?", " Hi!", 0),
        text_record(prompt, " Hello there! Hi!", " Hello there! Good morning.", 1),
    ]
    plen = 1 + len(encode(tok, prompt))
    room = len(encode(tok, prompt + " Hello there!")) - len(encode(tok, prompt))
    res = run(records, tok, max_length=plen + room, max_prompt_length=plen)
    assert res.stats["identical_after_truncation"] == 1  # both responses of record 1 cut to " Hello there!"
    (pair,) = list(res.pairs)
    assert tok.decode(pair.chosen_ids) == " Hello there!" and not pair.chosen_has_eos
    assert tok.decode(pair.rejected_ids) == " Hi!</s>"
    assert (res.stats["truncated_response"], res.stats["lost_eos"], res.stats["truncated_prompt"]) == (
        1,
        1,
        0,
    )


def test_pretokenized_without_eos_is_counted(tok):
    res = run([token_record([BOS, 5], [6, 7], [8, EOS])], tok)
    (pair,) = list(res.pairs)
    assert (pair.chosen_has_eos, pair.rejected_has_eos) == (False, True)
    assert res.stats["missing_eos"] == 1


def test_length_settings_are_validated(tok):
    rec = [text_record("Say hello.", " Hello!", " Hi!")]
    with pytest.raises(
        ValueError, match=r"data.max_prompt_length must be an integer in \[1, data.max_length - 1\]"
    ):
        run(rec, tok, max_length=10, max_prompt_length=10)
    with pytest.raises(
        ValueError, match=r"data.truncation must be one of keep_end, keep_start, drop, got 'left'"
    ):
        run(rec, tok, truncation="left")


def test_all_records_are_validated_before_any_tokenization(tok, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tokenize_module._Tokenize, "__call__", lambda self, batch: calls.append(batch))
    records = [text_record("Say hello.", " Hello!", " Hi!", 0), token_record([BOS, 5], [6, 400], [7, EOS], 1)]
    with pytest.raises(DataError) as info:
        run(records, tok, cache_dir=str(tmp_path / "cache"))
    assert str(info.value) == (
        "mem: record 1: field 'chosen_ids': token id 400 is outside the tokenizer's vocabulary (size 400)"
    )
    assert calls == [] and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------------- cache


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_second_run_reads_the_cache_and_keys_cover_every_input(tok, tmp_path, monkeypatch):
    rows = [
        {"prompt": "Say hello.", "chosen": " Hello there!", "rejected": " Go away."},
        {"prompt": [USER], "chosen": [HELLO], "rejected": [HI]},
        {"prompt_ids": [BOS, 5, 6], "chosen_ids": [7, EOS], "rejected_ids": [8, 9, EOS]},
    ]
    loaded = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    cache = str(tmp_path / "cache")
    first = run(loaded, tok, cache_dir=cache)
    assert not first.from_cache and os.path.isfile(os.path.join(first.cache_path, "data.arrow"))

    def no_tokenizing(self, batch):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenize_module._Tokenize, "__call__", no_tokenizing)
    second = run(loaded, tok, cache_dir=cache)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert list(second.pairs) == list(first.pairs) and second.stats == first.stats
    assert second.pairs.lengths.tolist() == first.pairs.lengths.tolist()
    monkeypatch.undo()

    variants = [
        run(loaded, tok, cache_dir=cache, max_length=100),
        run(loaded, tok, cache_dir=cache, max_prompt_length=50),
        run(loaded, tok, cache_dir=cache, truncation="keep_start"),
        run(
            loaded,
            tok,
            cache_dir=cache,
            chat_template=CHAT_TEMPLATE.replace("\n{% endfor %}", "{% endfor %}"),
        ),
        run(loaded, make_tokenizer(vocab_size=380), cache_dir=cache),
        run(load_records(write_jsonl(tmp_path / "e.jsonl", rows[:2])), tok, cache_dir=cache),
    ]
    fingerprints = {first.fingerprint} | {v.fingerprint for v in variants}
    assert len(fingerprints) == 7 and not any(v.from_cache for v in variants)
    assert len([d for d in os.listdir(cache) if d.startswith("tokenized-")]) == 7
    assert not [d for d in os.listdir(cache) if ".tmp-" in d]  # no half-written directories left


def test_tokenizer_fingerprint(tok):
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(make_tokenizer())
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(
        make_tokenizer(chat_template=None), CHAT_TEMPLATE
    )
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(tok, CHAT_TEMPLATE + " ")
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(make_tokenizer(vocab_size=380))


def test_main_process_tokenizes_first_and_the_others_read_its_cache(tok, tmp_path, monkeypatch):
    records = [text_record("Say hello.", " Hello!", " Hi!", i, rid=f"r{i}") for i in range(3)]
    barrier = threading.Barrier(2, timeout=60)
    tokenized_by: list[str] = []
    original = tokenize_module._Tokenize.__call__

    def spy(self, batch):
        tokenized_by.append(threading.current_thread().name)
        return original(self, batch)

    monkeypatch.setattr(tokenize_module._Tokenize, "__call__", spy)
    results: dict[str, object] = {}

    def rank(name: str, main: bool) -> None:
        results[name] = run(
            records, tok, cache_dir=str(tmp_path / "c"), is_main_process=main, barrier=barrier.wait
        )

    threads = [threading.Thread(target=rank, args=(n, n == "rank0"), name=n) for n in ("rank1", "rank0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert tokenized_by == ["rank0"]
    assert results["rank0"].from_cache is False and results["rank1"].from_cache is True
    assert list(results["rank1"].pairs) == list(results["rank0"].pairs)


def test_a_waiting_rank_without_a_cache_fails_clearly(tok, tmp_path):
    with pytest.raises(RuntimeError, match="the main process did not leave a tokenization cache at"):
        run(
            [text_record("Say hello.", " Hello!", " Hi!")],
            tok,
            cache_dir=str(tmp_path),
            is_main_process=False,
            barrier=lambda: None,
        )


def test_tokenized_pairs_sequence(tok):
    records = [text_record("Say hello.", " Hello!" * (i + 1), " Hi!", i, rid=f"r{i}") for i in range(5)]
    pairs = run(records, tok).pairs
    assert len(pairs) == 5 and pairs.ids == [f"r{i}" for i in range(5)]
    assert [p.id for p in pairs[1:4]] == ["r1", "r2", "r3"] and pairs[-1].id == "r4"
    assert [p.id for p in pairs.get_many([4, 0])] == ["r4", "r0"]
    assert pairs.lengths.tolist() == [[p.chosen_length, p.rejected_length] for p in pairs]
    with pytest.raises(IndexError):
        pairs[5]


def test_no_records_gives_an_empty_table(tok, tmp_path):
    for attempt in range(2):
        res = run([], tok, cache_dir=str(tmp_path))
        assert len(res.pairs) == 0 and res.pairs.lengths.shape == (0, 2) and res.stats["pairs_in"] == 0
        assert res.from_cache is (attempt == 1)
