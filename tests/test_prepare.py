"""data/prepare.py: the Arrow path (read, validate and tokenize in one datasets.map) gives exactly what
load_records + tokenize_pairs give (pairs, stats, skip counts, errors), over several workers too, and
its cache keeps the data's identity (content hashes, memoised by size and modification time)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hdpo_ds.data import prepare
from hdpo_ds.data.prepare import open_pairs, prepare_pairs, resolve_num_proc
from hdpo_ds.data.records import DataError, load_records
from hdpo_ds.data.tokenize import tokenize_pairs
from tests.data_helpers import make_tokenizer

LENGTHS = dict(max_length=48, max_prompt_length=24)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def chat(prompt, chosen, rejected):
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def good_rows(n, offset=0):
    """Text, chat and pre-tokenized pairs in turn, some long enough to be truncated."""
    rows = []
    for i in range(offset, offset + n):
        if i % 3 == 0:
            rows.append(
                {"prompt": f"What is {i}?" * (1 + i % 5), "chosen": f" It is {i}.", "rejected": " No."}
            )
        elif i % 3 == 1:
            rows.append(chat(f"Say {i}.", f"{i} " * (1 + i % 7), "Never."))
        else:
            rows.append(
                {"prompt_ids": [1, 5 + i % 50], "chosen_ids": [7, 8, 2], "rejected_ids": [9 + i % 9, 2]}
            )
    return rows


def write(path, rows, raw_lines=()):
    """JSON Lines: ``rows`` as JSON, then ``raw_lines`` (line index -> text) replacing some of them."""
    lines = [json.dumps(r) for r in rows]
    for index, text in raw_lines:
        lines[index] = text
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def bad_rows():
    rows = good_rows(30)
    rows[3] = {"prompt": "x", "chosen": "same", "rejected": "same"}  # identical_chosen_rejected
    rows[5] = {"prompt": "no responses"}  # missing_field
    rows[8] = {"id": "p1", "prompt": "a", "chosen": " b", "rejected": " c"}
    rows[9] = {"id": "p1", "prompt": "a", "chosen": " b", "rejected": " c"}  # same id, same content: kept
    rows[12] = {"id": "p1", "prompt": "a", "chosen": " B", "rejected": " c"}  # duplicate_id
    rows[14] = {"prompt_ids": [1, 2], "chosen_ids": [7, 999_999], "rejected_ids": [2]}  # bad_token_id
    rows[17] = {"prompt": 5, "chosen": " b", "rejected": " c"}  # wrong_type
    return rows


def old_path(files, tok, cache_dir, **kw):
    load_kw = {k: kw.pop(k) for k in ("split", "rows", "on_bad_record") if k in kw}
    loaded = load_records(files, **load_kw)
    data = tokenize_pairs(
        loaded, tok, cache_dir=cache_dir, on_bad_record=load_kw.get("on_bad_record", "error"), **kw
    )
    return loaded, data


def new_path(files, tok, cache_dir, **kw):
    return open_pairs(prepare_pairs(files, tok, cache_dir=cache_dir, **kw))


def pairs_of(data):
    return [
        (p.id, p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_has_eos, p.rejected_has_eos)
        for p in data.pairs
    ]


def assert_same(old, new):
    (loaded, data), (summary, prepared) = old, new
    assert pairs_of(prepared) == pairs_of(data)
    assert dict(prepared.stats) == dict(data.stats)
    assert [dict(c) for c in prepared.source_stats] == [dict(c) for c in data.source_stats]
    assert dict(summary.skipped) == dict(loaded.skipped)
    assert summary.fingerprint == loaded.fingerprint
    assert summary.num_rows == loaded.num_rows
    assert summary.sources == loaded.sources
    assert [dict(c) for c in summary.source_counts] == [dict(c) for c in loaded.source_counts]
    assert prepared.pairs.lengths.tolist() == data.pairs.lengths.tolist()


def test_prepared_equals_loaded_then_tokenized(tok, tmp_path):
    files = [write(tmp_path / "a.jsonl", good_rows(40)), write(tmp_path / "b.jsonl", good_rows(20, 40))]
    old = old_path(files, tok, str(tmp_path / "old"), **LENGTHS)
    new = new_path(files, tok, str(tmp_path / "new"), **LENGTHS)
    assert len(new[1].pairs) == 60
    assert new[1].stats["truncated_prompt"] + new[1].stats["truncated_response"] > 0
    assert_same(old, new)


def test_skip_counts_every_reason_exactly_as_the_loader(tok, tmp_path):
    files = [write(tmp_path / "a.jsonl", bad_rows(), raw_lines=[(20, '{"prompt": "cut')])]
    kw = dict(on_bad_record="skip", truncation="drop", **LENGTHS)
    old = old_path(files, tok, str(tmp_path / "old"), **kw)
    summary, data = new_path(files, tok, str(tmp_path / "new"), **kw)
    assert dict(summary.skipped) == {
        "identical_chosen_rejected": 1,
        "missing_field": 1,
        "duplicate_id": 1,
        "wrong_type": 1,
        "invalid_json": 1,
    }
    assert data.stats["bad_token_id"] == 1
    assert data.stats["dropped_overlength"] > 0
    assert summary.source_counts[0]["rows"] == 30
    assert summary.source_counts[0]["kept"] == 25
    assert_same(old, (summary, data))


@pytest.mark.parametrize(
    "row, raw, message",
    [
        (5, None, "record 5: field 'chosen': missing field"),
        (17, None, "record 17: field 'prompt': wrong type"),
        (29, '{"prompt": "cut', "record 29: invalid JSON on line 30"),
        (14, None, "record 14: field 'chosen_ids': token id 999999 is outside"),
    ],
)
def test_error_names_source_record_and_field_as_the_loader(tok, tmp_path, row, raw, message):
    rows = good_rows(30)
    bad = bad_rows()
    rows[row] = bad[row]
    path = write(tmp_path / "a.jsonl", rows, raw_lines=[(row, raw)] if raw else [])
    with pytest.raises(DataError) as old:
        old_path([path], tok, str(tmp_path / "old"), **LENGTHS)
    with pytest.raises(DataError) as new:
        new_path([path], tok, str(tmp_path / "new"), **LENGTHS)
    assert str(new.value) == str(old.value)
    assert str(new.value).startswith(f"{path}: {message}")
    assert new.value.kind == old.value.kind
    assert not [d for d in os.listdir(tmp_path / "new") if d.startswith("pairs-")]  # no cache written


def test_a_validation_error_is_raised_before_an_earlier_token_error(tok, tmp_path):
    """The loader validates every record before tokenizing any: a bad token id in row 2 loses to a
    missing field in row 25, as it did."""
    rows = good_rows(30)
    rows[2] = bad_rows()[14]
    rows[25] = {"prompt": "p", "rejected": " r"}
    path = write(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match="record 25: field 'chosen': missing field"):
        new_path([path], tok, str(tmp_path / "new"), **LENGTHS)


def test_duplicate_id_error_names_the_first_occurrence(tok, tmp_path):
    rows = bad_rows()
    for i in (3, 5, 14, 17):
        rows[i] = good_rows(1, i)[0]
    path = write(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError) as old:
        old_path([path], tok, str(tmp_path / "old"), **LENGTHS)
    with pytest.raises(DataError) as new:
        new_path([path], tok, str(tmp_path / "new"), **LENGTHS)
    assert str(new.value) == str(old.value)
    assert "record 12: field 'id': duplicate id 'p1' with different content" in str(new.value)
    assert f"first seen at {path}: record 8" in str(new.value)


def test_mixture_entries_with_their_own_rows_and_a_global_slice(tok, tmp_path):
    a = write(tmp_path / "a.jsonl", good_rows(30))
    b = write(tmp_path / "b.jsonl", bad_rows())
    mixture = [{"path": a, "weight": 2, "rows": "5:25"}, {"path": b, "weight": 1}]
    kw = dict(on_bad_record="skip", rows="0:20", **LENGTHS)
    old = old_path(mixture, tok, str(tmp_path / "old"), **kw)
    new = new_path(mixture, tok, str(tmp_path / "new"), **kw)
    assert new[0].entries.mixture
    assert [c["rows"] for c in new[0].source_counts] == [20, 20]
    assert_same(old, new)
    plain = dict(on_bad_record="skip", rows="10:45", **LENGTHS)  # a plain list slices the concatenation
    assert_same(
        old_path([a, b], tok, str(tmp_path / "o2"), **plain),
        new_path([a, b], tok, str(tmp_path / "n2"), **plain),
    )


def test_two_workers_equal_one_process(tok, tmp_path, monkeypatch):
    clean = [write(tmp_path / "clean.jsonl", good_rows(80))]
    bad = [write(tmp_path / "bad.jsonl", bad_rows() + good_rows(50, 30))]
    kw = dict(on_bad_record="skip", **LENGTHS)
    one = [new_path(files, tok, str(tmp_path / "one"), num_proc=1, **kw) for files in (clean, bad)]
    monkeypatch.setattr(prepare, "ROWS_PER_WORKER", 10)
    handles = [
        prepare_pairs(files, tok, cache_dir=str(tmp_path / "two"), num_proc=2, **kw) for files in (clean, bad)
    ]
    with open(os.path.join(handles[0].cache_path, "meta.json")) as f:
        assert json.load(f)["files"] == ["data_00000_of_00002.arrow", "data_00001_of_00002.arrow"]
    with open(os.path.join(handles[1].cache_path, "meta.json")) as f:
        assert json.load(f)["files"] == ["data.arrow"]  # the duplicate id was marked: one file rewritten
    for single, handle in zip(one, handles, strict=True):
        assert_same(single, open_pairs(handle))


def test_second_start_reads_the_cache_and_the_hash_memo(tok, tmp_path, monkeypatch):
    path = write(tmp_path / "a.jsonl", good_rows(20))
    cache = str(tmp_path / "cache")
    first = prepare_pairs([path], tok, cache_dir=cache, **LENGTHS)
    assert first.built
    again = prepare_pairs([path], tok, cache_dir=cache, **LENGTHS)
    assert not again.built and again.cache_path == first.cache_path
    # the memo is what identifies an unchanged file: a wrong hash under the same size and mtime is believed
    memo_path = os.path.join(cache, "source-hashes.json")
    with open(memo_path) as f:
        memo = json.load(f)
    assert memo[os.path.abspath(path)]["sha256"]
    memo[os.path.abspath(path)]["sha256"] = "0" * 64
    with open(memo_path, "w") as f:
        json.dump(memo, f)
    assert prepare_pairs([path], tok, cache_dir=cache, **LENGTHS).data_fingerprint != first.data_fingerprint
    # a copy (new mtime) is hashed again and keeps its identity: the same data, the same cache
    copy = tmp_path / "copy" / "a.jsonl"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    os.utime(path)
    same = prepare_pairs([path], tok, cache_dir=cache, **LENGTHS)
    assert same.data_fingerprint == first.data_fingerprint and not same.built
    assert (
        prepare_pairs([str(copy)], tok, cache_dir=cache, **LENGTHS).data_fingerprint == first.data_fingerprint
    )
    # changed content under the same name: a new fingerprint, built again
    write(tmp_path / "a.jsonl", good_rows(21))
    assert prepare_pairs([path], tok, cache_dir=cache, **LENGTHS).built


def test_empty_source_gives_an_empty_table(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    summary, data = new_path([str(path)], tok, str(tmp_path / "c"), **LENGTHS)
    assert summary.num_rows == 0 and len(data.pairs) == 0 and data.stats["pairs"] == 0


def test_num_proc_is_validated_and_bounded_by_rows():
    with pytest.raises(ValueError, match="data.num_proc must be an integer >= 0"):
        resolve_num_proc(-1)
    assert resolve_num_proc(1) is None
    assert resolve_num_proc(8, num_rows=25_000) == 2
    assert resolve_num_proc(8, num_rows=5) is None
    assert resolve_num_proc(0) == (len(os.sched_getaffinity(0)) if len(os.sched_getaffinity(0)) > 1 else None)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_a_node_that_cannot_see_rank_0s_cache_prepares_its_own(tok, tmp_path, monkeypatch, local_rank):
    """A node-local data.cache_dir: rank 0's cache is on another node's disk. The node's first rank
    prepares the same split into its own; a later rank there only opens what that one wrote."""
    from hdpo_ds.config import load_config
    from hdpo_ds.recipes import splits

    path = write(tmp_path / "a.jsonl", good_rows(20))
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    options = [
        "model.name_or_path=configs/models/tiny-demo",
        f"data.train_files=[{path}]",
        "data.eval_files=[]",
        f"data.max_length={LENGTHS['max_length']}",
        f"data.max_prompt_length={LENGTHS['max_prompt_length']}",
    ]
    rank0 = splits.prepare_split(load_config(None, [*options, f"data.cache_dir={node0}"]), "train", tok)
    handle = prepare_pairs([path], tok, cache_dir=str(node0), **LENGTHS)
    shutil.rmtree(node0)  # not visible from this node
    monkeypatch.setattr(splits.dist, "is_main_process", lambda: False)
    monkeypatch.setattr(splits.dist, "broadcast_object", lambda obj: (handle, None))
    monkeypatch.setattr(splits.dist, "gather_objects", lambda seen: [True, seen])
    monkeypatch.setattr(splits.dist, "local_rank", lambda: local_rank)
    monkeypatch.setattr(splits.dist, "rank", lambda: 1 + local_rank)
    cfg = load_config(None, [*options, f"data.cache_dir={node1}"])
    if local_rank == 1:
        with pytest.raises(DataError, match="data.cache_dir: rank 2 cannot see the prepared train split"):
            splits.prepare_split(cfg, "train", tok)
        return
    mine = splits.prepare_split(cfg, "train", tok)
    assert mine.data.cache_path.startswith(str(node1))
    assert (
        pairs_of(mine.data) == pairs_of(rank0.data) and mine.records.fingerprint == rank0.records.fingerprint
    )


def test_the_dry_run_sample_parses_only_the_sampled_rows(tmp_path, monkeypatch):
    """load_records(sample=k) counts every row but parses only the k it validates; they are the rows the
    whole load gives at those positions (a plain list sliced, and a mixture with its own slices)."""
    from hdpo_ds.data import records

    a = write(tmp_path / "a.jsonl", good_rows(300), raw_lines=[(150, '{"cut')])
    b = write(tmp_path / "b.jsonl", good_rows(100, 300))
    parsed = []
    real = records.parse_json_row
    monkeypatch.setattr(
        records, "parse_json_row", lambda text, line=0: parsed.append(line) or real(text, line)
    )
    for files, rows in (([a, b], "10:390"), ([{"path": a, "rows": "0:100"}, {"path": b, "weight": 3}], None)):
        parsed.clear()
        sampled = load_records(files, rows=rows, sample=20, on_bad_record="skip")
        assert len(parsed) == sampled.sampled_rows == 20 and not sampled.skipped
        whole = load_records(files, rows=rows, on_bad_record="skip")
        assert sampled.num_rows == whole.num_rows and sampled.fingerprint == whole.fingerprint
        by_place = {(r.source, r.index): r for r in whole.records}
        assert all(by_place[(r.source, r.index)] == r for r in sampled.records)
        assert [c["rows"] for c in sampled.source_counts] == ([15, 5] if rows else [10, 10])
