"""Reading, validating and normalising preference records (hdpo_ds/data/records.py)."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import pytest

from hdpo_ds.data.records import DataError, PreferenceRecord, content_hash, load_records, parse_rows

STANDARD = [
    {"prompt": "Question: what is two plus two?", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Say hello.", "chosen": " Hello there!", "rejected": " Go away."},
    {"prompt": "Tell me a joke.", "chosen": " Why did the cat sit on the computer?", "rejected": " No."},
]
USER = {"role": "user", "content": "Say hello."}
HELLO = {"role": "assistant", "content": "Hello there!"}
HI = {"role": "assistant", "content": "Hi!"}


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def write_parquet(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def error_of(tmp_path, row, name="bad.jsonl", before=1) -> DataError:
    """Load one bad row placed after `before` good ones; return the DataError it raises."""
    path = write_jsonl(tmp_path / name, [*STANDARD[:before], row])
    with pytest.raises(DataError) as info:
        load_records(path)
    return info.value


# ------------------------------------------------------------------------------------------------- sources


def test_jsonl_json_array_and_json_lines_named_json_read_the_same(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", STANDARD)
    array = tmp_path / "b.json"
    array.write_text(json.dumps(STANDARD, indent=2))
    lines_as_json = write_jsonl(tmp_path / "c.json", STANDARD)
    results = [load_records(p) for p in (jsonl, str(array), lines_as_json)]
    assert [len(r.records) for r in results] == [3, 3, 3]
    assert results[0].records == results[1].records == results[2].records
    assert results[0].records[0] == PreferenceRecord(
        content_hash({"prompt": STANDARD[0]["prompt"], "chosen": " Four.", "rejected": " Five."}),
        "Question: what is two plus two?",
        " Four.",
        " Five.",
    )
    # Same content, same fingerprint, whatever the container.
    assert results[0].fingerprint != results[1].fingerprint  # the bytes differ (indentation) ...
    assert results[0].fingerprint == load_records(write_jsonl(tmp_path / "d.jsonl", STANDARD)).fingerprint


def test_parquet_with_messages_and_token_ids(tmp_path):
    rows = [
        {"id": "a", "prompt": [USER], "chosen": [HELLO], "rejected": [HI]},
        {"id": "b", "prompt": [USER], "chosen": [HI], "rejected": [HELLO]},
    ]
    res = load_records(write_parquet(tmp_path / "chat.parquet", rows))
    assert [r.id for r in res.records] == ["a", "b"]
    assert (
        res.records[0].prompt == [USER]
        and res.records[0].chosen == [HELLO]
        and res.records[0].format == "chat"
    )

    tokens = [{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}]
    rec = load_records(write_parquet(tmp_path / "tok.parquet", tokens)).records[0]
    assert rec.format == "tokens" and rec.tokenized
    assert (rec.prompt_ids, rec.chosen_ids, rec.rejected_ids) == ((1, 5), (7, 2), (8, 9, 2))
    assert rec.id == content_hash({"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]})


def test_save_to_disk_dataset_and_dataset_dict_with_split(tmp_path):
    import datasets

    datasets.Dataset.from_list(STANDARD).save_to_disk(str(tmp_path / "single"))
    assert [r.chosen for r in load_records(str(tmp_path / "single")).records] == [
        " Four.",
        " Hello there!",
        " Why did the cat sit on the computer?",
    ]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(STANDARD[:2]), "test": datasets.Dataset.from_list(STANDARD[2:])}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(str(tmp_path / "dict")).records) == 2  # "train" by default
    test = load_records(str(tmp_path / "dict"), split="test")
    assert [r.prompt for r in test.records] == ["Tell me a joke."]
    with pytest.raises(DataError) as info:
        load_records(str(tmp_path / "dict"), split="validation")
    assert str(info.value) == f"{tmp_path / 'dict'}: no split 'validation' (available: test, train)"


def test_several_files_are_concatenated_globbed_and_sliced(tmp_path):
    a = write_jsonl(tmp_path / "part-0.jsonl", STANDARD[:2])
    b = write_parquet(tmp_path / "part-1.parquet", STANDARD[2:])
    both = load_records([a, b])
    assert [r.prompt for r in both.records] == [r["prompt"] for r in STANDARD]
    assert [(r.source, r.index) for r in both.records] == [(a, 0), (a, 1), (b, 0)]
    assert load_records(str(tmp_path / "part-*")).records == both.records
    assert load_records(str(tmp_path)).records == both.records  # a plain directory: its data files, sorted
    sliced = load_records([a, b], rows="1:3")
    assert [r.prompt for r in sliced.records] == ["Say hello.", "Tell me a joke."]
    assert sliced.num_rows == 2
    assert load_records([a, b], rows=slice(None, 1)).records == both.records[:1]
    assert len({both.fingerprint, sliced.fingerprint, load_records([b, a]).fingerprint}) == 3


def test_row_slice_parsing():
    assert parse_rows("100:200") == slice(100, 200)
    assert parse_rows("[:1000]") == slice(None, 1000)
    assert parse_rows("-5:") == slice(-5, None)
    with pytest.raises(ValueError, match=r"invalid row slice '10'"):
        parse_rows("10")


def test_error_indices_are_per_source_after_slicing(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", STANDARD)
    b = write_jsonl(tmp_path / "b.jsonl", [STANDARD[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError) as info:
        load_records([a, b], rows="2:")
    assert str(info.value) == f"{b}: record 1: field 'rejected': missing field"


def test_hub_name_absent_from_local_cache_is_a_clear_error(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DataError) as info:
        load_records("someorg/not-downloaded")
    message = str(info.value)
    assert message.startswith(
        "someorg/not-downloaded: not a local file or directory, and not a dataset in the local Hugging Face "
        f"cache ({tmp_path / 'hf'}); datasets are never downloaded here"
    )
    assert datasets.config.HF_HUB_OFFLINE is False or os.environ.get("HF_HUB_OFFLINE")  # flag restored


def test_hub_name_resolved_from_local_cache(tmp_path, monkeypatch):
    """A dataset in the `datasets` cache layout (<org>___<name>/<config>/<version>/<hash>/) loads offline."""
    import datasets

    source = write_jsonl(tmp_path / "src.jsonl", STANDARD)
    datasets.load_dataset("json", data_files={"train": source}, cache_dir=str(tmp_path / "build"))
    built = next(p for p in glob.glob(str(tmp_path / "build" / "json" / "*" / "*" / "*")) if os.path.isdir(p))
    cached = tmp_path / "hf" / "someorg___tiny_prefs" / "default" / "0.0.0" / os.path.basename(built)
    shutil.copytree(built, cached)
    os.rename(cached / "json-train.arrow", cached / "tiny_prefs-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    res = load_records("someorg/tiny_prefs", split="train")
    assert [r.prompt for r in res.records] == [r["prompt"] for r in STANDARD]
    assert res.sources == ["someorg/tiny_prefs"]


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match=r"^/no/such/file\.jsonl: no such file or directory$"):
        load_records("/no/such/file.jsonl")
    csv = tmp_path / "x.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        load_records(str(csv))


# ------------------------------------------------------------------------------------------------- formats


def test_implicit_prompt_from_text_cuts_at_a_word_boundary(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: Say hello.\n\nAssistant: Yes, hello there!",
            "rejected": "\n\nHuman: Say hello.\n\nAssistant: Yes I will not.",
        },
        {"chosen": "Human: hi Assistant: foo", "rejected": "Human: hi Assistant: bar"},
    ]
    recs = load_records(write_jsonl(tmp_path / "hh.jsonl", rows)).records
    # "Yes," vs "Yes " differ inside a word: the whole word and the space before it go to the responses.
    assert recs[0].prompt == "\n\nHuman: Say hello.\n\nAssistant:"
    assert (recs[0].chosen, recs[0].rejected) == (" Yes, hello there!", " Yes I will not.")
    assert (recs[1].prompt, recs[1].chosen, recs[1].rejected) == ("Human: hi Assistant:", " foo", " bar")


def test_conversational_shapes(tmp_path):
    rows = [
        # TRL conversational: prompt messages, one assistant message per response.
        {"prompt": [USER], "chosen": [HELLO], "rejected": [HI]},
        # Message prompt, string responses.
        {"prompt": [USER], "chosen": "Hello there!", "rejected": "Hi!"},
        # String prompt, assistant-only message responses.
        {"prompt": "Say hello.", "chosen": [HELLO], "rejected": [HI]},
        # Implicit: whole conversations (Anthropic HH as messages).
        {"chosen": [USER, HELLO], "rejected": [USER, HI]},
        # UltraFeedback: a string prompt beside whole conversations; the message prefix is the prompt.
        {"prompt": "Say hello.", "chosen": [USER, HELLO], "rejected": [USER, HI]},
    ]
    recs = load_records(write_jsonl(tmp_path / "chat.jsonl", rows)).records
    assert len(recs) == 5
    for rec in recs:
        assert (rec.prompt, rec.chosen, rec.rejected) == ([USER], [HELLO], [HI])
    assert len({r.id for r in recs}) == 1  # same normalised content, same content hash

    system = {"role": "system", "content": "Be brief."}
    multi = {"chosen": [system, USER, HI, USER, HELLO], "rejected": [system, USER, HI, USER, HI]}
    rec = load_records(write_jsonl(tmp_path / "multi.jsonl", [multi])).records[0]
    assert rec.prompt == [system, USER, HI, USER] and rec.chosen == [HELLO] and rec.rejected == [HI]


def test_message_extra_keys_are_dropped_so_ids_do_not_depend_on_them(tmp_path):
    row = {"prompt": [{**USER, "name": None}], "chosen": [HELLO], "rejected": [HI]}
    a = load_records(write_jsonl(tmp_path / "a.jsonl", [row])).records[0]
    b = load_records(
        write_jsonl(tmp_path / "b.jsonl", [{"prompt": [USER], "chosen": [HELLO], "rejected": [HI]}])
    )
    assert a.prompt == [USER] and a.id == b.records[0].id


def test_ids_explicit_integer_and_content_hash(tmp_path):
    rows = [{**STANDARD[0], "id": "pair-0"}, {**STANDARD[1], "id": 7}, STANDARD[2]]
    recs = load_records(write_jsonl(tmp_path / "ids.jsonl", rows)).records
    assert [r.id for r in recs[:2]] == ["pair-0", "7"]
    assert recs[2].id == content_hash({k: STANDARD[2][k] for k in ("prompt", "chosen", "rejected")})
    assert len(recs[2].id) == 32
    changed = load_records(write_jsonl(tmp_path / "c.jsonl", [{**STANDARD[2], "chosen": " Other."}])).records[
        0
    ]
    assert changed.id != recs[2].id


def test_identical_chosen_and_rejected_are_counted_and_dropped(tmp_path, caplog):
    rows = [
        STANDARD[0],
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        STANDARD[1],
        {"chosen": [USER, HI], "rejected": [USER, HI]},
    ]
    with caplog.at_level(logging.WARNING, logger="hdpo_ds.data.records"):
        res = load_records(write_jsonl(tmp_path / "same.jsonl", rows))  # default on_bad_record=error
    assert len(res.records) == 2
    assert res.skipped == {"identical_chosen_rejected": 2}
    assert "dropped 2 record(s): identical chosen rejected" in caplog.text
    assert "same.jsonl: record 1" in caplog.text and "same.jsonl: record 3" in caplog.text


# ---------------------------------------------------------------------------------------------- validation
# Each reason: the message names the source, the record index and the field.


def test_missing_field(tmp_path):
    err = error_of(tmp_path, {"prompt": "p", "chosen": "a"}, before=2)
    assert str(err) == f"{tmp_path / 'bad.jsonl'}: record 2: field 'rejected': missing field"
    assert (err.index, err.field, err.kind) == (2, "rejected", "missing_field")
    err = error_of(tmp_path, {"prompt_ids": [1], "chosen_ids": [2]})
    assert str(err).endswith("record 1: field 'rejected_ids': missing field")
    err = error_of(tmp_path, {"prompt": [USER, {"content": "x"}], "chosen": [HELLO], "rejected": [HI]})
    assert str(err).endswith("record 1: field 'prompt[1].role': missing field")


def test_wrong_type(tmp_path):
    err = error_of(tmp_path, {"prompt": "p", "chosen": 3, "rejected": "b"})
    assert str(err).endswith(
        "record 1: field 'chosen': wrong type: expected a string or a list of {role, content} messages, "
        "got int"
    )
    err = error_of(tmp_path, {"prompt": "p", "chosen": "a", "rejected": [HI]})
    assert str(err).endswith(
        "record 1: field 'rejected': wrong type: chosen is a string but rejected is a list; both must be "
        "strings or both message lists"
    )
    err = error_of(
        tmp_path, {"prompt": [USER], "chosen": [{"role": "assistant", "content": 5}], "rejected": [HI]}
    )
    assert str(err).endswith("record 1: field 'chosen[0].content': wrong type: expected a string, got int")
    err = error_of(tmp_path, {"prompt_ids": [1, -2], "chosen_ids": [3], "rejected_ids": [4]})
    assert str(err).endswith(
        "record 1: field 'prompt_ids': wrong type: expected a list of non-negative integer token ids, "
        "got a list"
    )
    err = error_of(tmp_path, ["not", "an", "object"])
    assert str(err).endswith("record 1: wrong type: a record must be an object, got a list")
    err = error_of(tmp_path, {**STANDARD[0], "id": 1.5})
    assert str(err).endswith("record 1: field 'id': wrong type: expected a string or an integer, got float")


def test_empty_response(tmp_path):
    err = error_of(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "  "})
    assert str(err).endswith("record 1: field 'rejected': empty response")
    assert err.kind == "empty_response"
    err = error_of(
        tmp_path, {"prompt": [USER], "chosen": [{"role": "assistant", "content": ""}], "rejected": [HI]}
    )
    assert str(err).endswith("record 1: field 'chosen[0].content': empty response")
    err = error_of(tmp_path, {"chosen": "Human: hi Assistant:", "rejected": "Human: hi Assistant: there"})
    assert str(err).endswith(
        "record 1: field 'chosen': empty response after removing the prompt shared with the other response"
    )
    err = error_of(tmp_path, {"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [4]})
    assert str(err).endswith("record 1: field 'chosen_ids': empty response")


def test_empty_prompt(tmp_path):
    err = error_of(tmp_path, {"prompt": " ", "chosen": "a", "rejected": "b"})
    assert str(err).endswith("record 1: field 'prompt': empty prompt")
    assert err.kind == "empty_prompt"
    err = error_of(tmp_path, {"chosen": "Yes.", "rejected": "No."})
    assert str(err).endswith(
        "record 1: field 'prompt': empty prompt: no 'prompt' field and chosen and rejected share no common "
        "prefix to use as one"
    )
    err = error_of(tmp_path, {"chosen": [HELLO], "rejected": [HI]})
    assert str(err).endswith(
        "record 1: field 'prompt': empty prompt: no 'prompt' field and chosen and rejected share no leading "
        "messages to use as one"
    )
    err = error_of(tmp_path, {"prompt": [], "chosen": [HELLO], "rejected": [HI]})
    assert str(err).endswith("record 1: field 'prompt': empty prompt")
    err = error_of(tmp_path, {"prompt_ids": [], "chosen_ids": [3], "rejected_ids": [4]})
    assert str(err).endswith("record 1: field 'prompt_ids': empty prompt")


def test_unknown_role(tmp_path):
    err = error_of(
        tmp_path, {"prompt": [{"role": "human", "content": "hi"}], "chosen": [HELLO], "rejected": [HI]}
    )
    assert str(err).endswith(
        "record 1: field 'prompt[0].role': unknown role 'human' (expected one of system, user, assistant)"
    )
    assert err.kind == "bad_role"


def test_non_alternating_roles(tmp_path):
    err = error_of(tmp_path, {"prompt": [USER, USER], "chosen": [HELLO], "rejected": [HI]})
    assert str(err).endswith(
        "record 1: field 'prompt[1].role': roles must alternate user/assistant after an optional leading "
        "system message: 'user' follows 'user'"
    )
    err = error_of(
        tmp_path, {"prompt": [USER, {"role": "system", "content": "x"}], "chosen": [HELLO], "rejected": [HI]}
    )
    assert str(err).endswith(
        "record 1: field 'prompt[1].role': roles must alternate user/assistant after an optional leading "
        "system message: a system message is only allowed first"
    )
    err = error_of(tmp_path, {"prompt": [HI], "chosen": [HELLO], "rejected": [HI]})
    assert str(err).endswith(
        "record 1: field 'prompt[0].role': roles must alternate user/assistant after an optional leading "
        "system message: the conversation starts with 'assistant'"
    )
    err = error_of(tmp_path, {"prompt": [USER], "chosen": [USER], "rejected": [HI]})
    assert str(err).endswith(
        "record 1: field 'chosen[0].role': roles must alternate: the response must be an assistant message "
        "after the prompt's final user message, got 'user'"
    )
    err = error_of(tmp_path, {"prompt": [USER, HI], "chosen": [HELLO], "rejected": [HI]})
    assert str(err).endswith(
        "record 1: field 'prompt[1].role': roles must alternate: the prompt must end with a user message, "
        "got 'assistant'"
    )
    err = error_of(tmp_path, {"chosen": [USER, HELLO, USER, HI], "rejected": [USER, HI, USER, HI]})
    assert str(err).endswith(
        "record 1: field 'chosen[2].role': a response must be a single assistant message; found 3 messages "
        "with roles assistant, user, assistant"
    )


def test_invalid_json_line_and_duplicate_id(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [STANDARD[0], "{not json", STANDARD[1]])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert (
        str(info.value)
        == f"{path}: record 1: invalid JSON on line 2: Expecting property name enclosed in double quotes "
        "(column 2)"
    )
    path = write_jsonl(tmp_path / "dup.jsonl", [{**STANDARD[0], "id": "x"}, {**STANDARD[1], "id": "x"}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == (
        f"{path}: record 1: field 'id': duplicate id 'x' with different content "
        f"(first seen at {path}: record 0)"
    )
    # The same id with the same content is a repeated row, not a conflict.
    same = write_jsonl(tmp_path / "same.jsonl", [{**STANDARD[0], "id": "x"}, {**STANDARD[0], "id": "x"}])
    assert [r.id for r in load_records(same).records] == ["x", "x"]


def test_skip_counts_and_logs_every_reason(tmp_path, caplog):
    rows = [
        STANDARD[0],
        {"prompt": "p", "chosen": "a"},  # missing_field
        {"prompt": "p", "chosen": 1, "rejected": "b"},  # wrong_type
        {"prompt": "p", "chosen": "", "rejected": "b"},  # empty_response
        {"prompt": "", "chosen": "a", "rejected": "b"},  # empty_prompt
        {"prompt": [{"role": "bot", "content": "x"}], "chosen": [HELLO], "rejected": [HI]},  # bad_role
        {"prompt": [USER, USER], "chosen": [HELLO], "rejected": [HI]},  # bad_role
        "{broken",  # invalid_json
        {"prompt": "p", "chosen": "a", "rejected": "a"},  # identical
        STANDARD[1],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hdpo_ds.data.records"):
        res = load_records(path, on_bad_record="skip")
    assert [r.prompt for r in res.records] == [STANDARD[0]["prompt"], STANDARD[1]["prompt"]]
    assert res.skipped == {
        "missing_field": 1,
        "wrong_type": 1,
        "empty_response": 1,
        "empty_prompt": 1,
        "bad_role": 2,
        "invalid_json": 1,
        "identical_chosen_rejected": 1,
    }
    assert sum(res.skipped.values()) + len(res.records) == res.num_rows == len(rows)
    assert (
        f"dropped 1 record(s): missing field (e.g. {path}: record 1: field 'rejected': missing field)"
        in caplog.text
    )
    assert (
        "dropped 2 record(s): bad role" in caplog.text
        and f"{path}: record 6: field 'prompt[1].role'" in caplog.text
    )
    with pytest.raises(ValueError, match=r"data\.on_bad_record must be one of error, skip; got 'ignore'"):
        load_records(path, on_bad_record="ignore")
