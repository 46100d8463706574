"""The reference cache in one process: values against plain per-pair math, and every way it refuses.

A plain transformers model stands in for the reference engine (the cache code only calls it), so these
tests need no launcher; the 2-rank and killed-precompute checks live in test_trainer.py.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hdpo_ds.config import load_config
from hdpo_ds.recipes.precompute import precompute_split
from hdpo_ds.recipes.splits import prepare_split
from hdpo_ds.reference.cache import (
    RefCache,
    RefCacheError,
    cache_status,
    read_manifest,
    write_manifest,
    write_shard,
)
from hdpo_ds.reference.sources import OnlineReference, reference_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("refcache")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/models/tiny-demo"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "train.jsonl"
    with open(os.path.join(ROOT, "configs/data/demo/train.jsonl")) as f:
        data.write_text("".join(next(f) for _ in range(30)))
    return {"root": root, "model": model, "tokenizer": tokenizer, "data": str(data)}


def _cfg(setup, *extra):
    return load_config(
        None,
        [
            f"model.name_or_path={setup['root'] / 'model'}",
            f"data.train_files=[{setup['data']}]",
            "data.max_length=256",
            "data.max_prompt_length=192",
            "data.max_tokens_per_micro_batch=512",
            f"output_dir={setup['root'] / 'out'}",
            "reference.shard_pairs=7",
            *extra,
        ],
    )


def _build(setup, cache_dir, *extra, tokenizer=None):
    cfg = _cfg(setup, *extra)
    tokenizer = tokenizer or setup["tokenizer"]
    split = prepare_split(cfg, "train", tokenizer)
    fingerprint = reference_fingerprint(
        cfg,
        data_fingerprint=split.records.fingerprint,
        tokenizer_fingerprint=split.tokenizer_fingerprint,
        dtype=torch.float32,
    )
    precompute_split(
        cfg,
        split,
        OnlineReference(setup["model"], 64),
        str(cache_dir),
        fingerprint,
        {"torch": "x"},
        pad_token_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
    )
    return cfg, split, fingerprint


def _ensure_caches(setup, root, mode: str, compute_missing: bool, *extra, reference=None):
    """precompute.ensure_reference_caches for the train split of `_cfg` with its cache under `root`."""
    from hdpo_ds.recipes.precompute import ensure_reference_caches

    cfg = _cfg(setup, f"reference.cache_path={root}", f"reference.mode={mode}", *extra)
    splits = {"train": prepare_split(cfg, "train", setup["tokenizer"])}
    return ensure_reference_caches(
        cfg,
        splits,
        ref_ds={},
        dtype=torch.float32,
        device_type="cpu",
        device=torch.device("cpu"),
        pad_token_id=setup["tokenizer"].pad_token_id,
        compute_missing=compute_missing,
        reference=reference,
    )


@pytest.fixture(scope="module")
def built(setup):
    cache_dir = setup["root"] / "cache"
    cfg, split, fingerprint = _build(setup, cache_dir)
    return {"dir": cache_dir, "cfg": cfg, "split": split, "fingerprint": fingerprint}


def test_values_equal_plain_per_pair_math(setup, built):
    """Each pair's reference sums, one unpacked forward per sequence in float64, against the cache."""
    cache = RefCache.load(str(built["dir"]), built["fingerprint"])
    pairs = built["split"].data.pairs
    rows = cache.check_covers(pairs.ids)
    model = setup["model"]
    with torch.no_grad():
        for k in range(len(pairs)):
            pair = pairs[k]
            for response, column, counts in (
                (pair.chosen_ids, cache.chosen, cache.chosen_tokens),
                (pair.rejected_ids, cache.rejected, cache.rejected_tokens),
            ):
                ids = torch.tensor([list(pair.prompt_ids) + list(response)])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                start = len(pair.prompt_ids) - 1
                expected = logp[start:].gather(-1, ids[0, 1:][start:, None]).sum().item()
                assert column[rows[k]] == pytest.approx(expected, rel=1e-5)
                assert counts[rows[k]] == len(response)
    assert len(read_manifest(str(built["dir"]))["shards"]) == -(-len(pairs) // 7)


@pytest.mark.parametrize(
    ("change", "entry"),
    [
        (["data.max_length=200"], "data.max_length: 256 in the cache, 200 now"),
        (["data.truncation=keep_start"], "data.truncation: 'keep_end' in the cache, 'keep_start' now"),
        ("tokenizer", "tokenizer_and_template:"),
        ("data", "data: '"),
        ("weights", "reference.weights_sha256:"),
    ],
)
def test_stale_cache_names_what_differs(setup, built, tmp_path, change, entry):
    extra, tokenizer = [], None
    cfg = built["cfg"]
    if change == "tokenizer":
        tokenizer = setup["tokenizer"].__class__.from_pretrained(
            os.path.join(ROOT, "configs/models/tiny-demo")
        )
        tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    elif change == "data":
        data = tmp_path / "train.jsonl"
        with open(setup["data"]) as f:
            data.write_text("".join(list(f)[:29]))
        extra = [f"data.train_files=[{data}]"]
    elif change == "weights":
        shutil.copytree(setup["root"] / "model", tmp_path / "model")
        sd = {k: v + 1e-3 for k, v in setup["model"].state_dict().items()}
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model" / "model.safetensors")
        extra = [f"model.name_or_path={tmp_path / 'model'}"]
    else:
        extra = change
    cfg = _cfg(setup, *extra)
    split = prepare_split(cfg, "train", tokenizer or setup["tokenizer"])
    expected = reference_fingerprint(
        cfg,
        data_fingerprint=split.records.fingerprint,
        tokenizer_fingerprint=split.tokenizer_fingerprint,
        dtype=torch.float32,
    )
    status, differences = cache_status(str(built["dir"]), expected)
    assert status == "stale"
    assert any(line.startswith(entry) for line in differences), differences
    with pytest.raises(RefCacheError, match="is stale") as info:
        RefCache.load(str(built["dir"]), expected)
    assert entry in str(info.value)


def test_a_relative_path_to_the_same_model_reads_the_cache(setup, built, monkeypatch):
    """The cache names a local reference by its resolved path: the model given relative to the working
    directory (or through a symlink) is the same model, not a stale cache."""
    monkeypatch.chdir(setup["root"])
    os.symlink(setup["root"] / "model", setup["root"] / "model-link")
    for given in ("model", "./model", "model-link"):
        cfg = _cfg(setup, f"model.name_or_path={given}")
        split = prepare_split(cfg, "train", setup["tokenizer"])
        expected = reference_fingerprint(
            cfg,
            data_fingerprint=split.records.fingerprint,
            tokenizer_fingerprint=split.tokenizer_fingerprint,
            dtype=torch.float32,
        )
        assert cache_status(str(built["dir"]), expected) == ("ok", []), given


def _copy(built, tmp_path):
    target = tmp_path / "cache"
    shutil.copytree(built["dir"], target)
    return target


def test_truncated_shard_is_refused(built, tmp_path):
    cache = _copy(built, tmp_path)
    shard = cache / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(
        RefCacheError, match=r"shard .*shard-00001\.arrow is unreadable \(truncated or corrupt\?\)"
    ):
        RefCache.load(str(cache), built["fingerprint"])


def test_modified_shard_is_refused(built, tmp_path):
    cache = _copy(built, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RefCacheError, match="does not match its sha256"):
        RefCache.load(str(cache), built["fingerprint"])


def test_missing_id_is_refused(built):
    cache = RefCache.load(str(built["dir"]), built["fingerprint"])
    ids = [*built["split"].data.pairs.ids[:-1], "not-in-the-cache"]
    with pytest.raises(
        RefCacheError, match=r"has no values for 1 of 30 pair\(s\), e\.g\. ids \['not-in-the-cache'\]"
    ):
        cache.check_covers(ids)
    with pytest.raises(RefCacheError, match="holds 30 pairs, the data has 29"):
        cache.check_covers(built["split"].data.pairs.ids[:-1])


def test_nan_value_is_refused(built, tmp_path):
    cache = tmp_path / "nan"
    cache.mkdir()
    sha = write_shard(
        str(cache),
        0,
        {
            "id": ["a", "b"],
            "ref_chosen_logps": [-1.0, float("nan")],
            "ref_rejected_logps": [-2.0, -3.0],
            "chosen_tokens": [1, 2],
            "rejected_tokens": [1, 2],
        },
        built["fingerprint"],
    )
    write_manifest(
        str(cache), built["fingerprint"], {}, [{"file": "shard-00000.arrow", "rows": 2, "sha256": sha}], 2
    )
    with pytest.raises(RefCacheError, match=r"has 1 non-finite value\(s\), e\.g\. pair ids \['b'\]"):
        RefCache.load(str(cache), built["fingerprint"])


def test_missing_cache_says_how_to_make_one(built, tmp_path):
    assert cache_status(str(tmp_path / "none"), built["fingerprint"]) == ("missing", [])
    with pytest.raises(RefCacheError, match="no reference cache at .*precompute_ref.py"):
        RefCache.load(str(tmp_path / "none"), built["fingerprint"])


def test_wrong_row_count_is_refused(built, tmp_path):
    cache = _copy(built, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["num_pairs"] += 1
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RefCacheError, match="holds 30 rows, the manifest says 31"):
        RefCache.load(str(cache), built["fingerprint"])
    assert np.isfinite(RefCache.load(str(built["dir"]), built["fingerprint"]).chosen).all()


def test_auto_mode_stops_on_a_stale_cache_and_rebuilds_it_when_asked(setup, tmp_path):
    """reference.mode=auto: missing -> computed; stale -> an error naming the change, or with
    reference.rebuild_stale a rebuild that says so; matching -> reused."""
    root = tmp_path / "auto"
    reference = OnlineReference(setup["model"], 64)

    def ensure(*extra):
        return _ensure_caches(setup, root, "auto", True, *extra, reference=reference)

    assert ensure()[1] == {"train": "computed"}
    assert ensure()[1] == {"train": "reused"}
    with pytest.raises(
        RefCacheError, match=r"is stale \(set reference.rebuild_stale=true.*\n  data.max_length: 256"
    ):
        ensure("data.max_length=200")
    caches, actions = ensure("data.max_length=200", "reference.rebuild_stale=true")
    assert actions == {"train": "rebuilt"}
    assert read_manifest(str(root / "train"))["fingerprint"]["data.max_length"] == 200
    assert len(caches["train"].ids) == 30


def test_lookups_check_the_stored_token_counts(built):
    """Each lookup compares the cache's response token counts with the batch's; a mismatch names the pair
    and both counts (here a cache row edited in memory, as a cache of other data would look)."""
    from hdpo_ds.data import MicroBatchPacking, collate
    from hdpo_ds.reference.sources import CachedReference

    pairs = built["split"].data.pairs
    cache = RefCache.load(str(built["dir"]), built["fingerprint"])
    batch = collate(pairs, MicroBatchPacking((3, 4, 5), False, 0, 0), pad_token_id=0, packing=True)
    values = CachedReference(cache, torch.device("cpu")).sequence_logps(batch)
    row = int(cache.rows_of([pairs.ids[4]])[0])
    assert values[3].item() == pytest.approx(cache.rejected[row])  # pair 4's rejected: the 4th sequence
    stored = int(cache.rejected_tokens[row])
    cache.rejected_tokens[row] += 2
    with pytest.raises(
        RefCacheError,
        match=rf"pair {pairs.ids[4]}: the batch has {stored} rejected response tokens, the reference cache "
        rf"{built['dir']} stored {stored + 2}",
    ):
        CachedReference(cache, torch.device("cpu")).sequence_logps(batch)


def test_auto_mode_destroys_the_reference_engine_it_built(setup, tmp_path, monkeypatch):
    """The temporary reference engine of an auto precompute is destroyed (DeepSpeed's engine.destroy)
    and no reference to it is kept once training starts."""
    import gc
    import weakref

    import hdpo_ds.recipes.precompute as precompute

    destroyed, built_engines = [], []

    class SpyEngine(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            return self.model(**inputs)

        def destroy(self):
            destroyed.append(self)

    def build(cfg, ref_ds, dtype, device_type):
        built_engines.append(SpyEngine(setup["model"]))
        return OnlineReference(built_engines[-1], 64)

    monkeypatch.setattr(precompute, "load_reference_engine", build)
    _, actions = _ensure_caches(setup, tmp_path / "auto", "auto", True)
    assert actions == {"train": "computed"} and len(built_engines) == 1
    assert destroyed == built_engines, "the reference engine built for the precompute was not destroyed"
    engine = weakref.ref(built_engines.pop())
    destroyed.clear()
    gc.collect()
    assert engine() is None, "ensure_reference_caches kept a reference to the engine it built"


def test_a_stale_cache_in_cached_mode_gives_advice_that_works_there(setup, tmp_path):
    """reference.mode=cached never computes: the stale-cache error points at the precompute pass or at
    reference.mode=auto, not at a key that has no effect in this mode."""
    root = tmp_path / "cached"
    reference = OnlineReference(setup["model"], 64)
    _ensure_caches(setup, root, "cached", True, reference=reference)  # as launch/precompute_ref.py would
    with pytest.raises(RefCacheError) as info:
        _ensure_caches(setup, root, "cached", False, "data.max_length=200", reference=reference)
    message = str(info.value)
    assert "launch/precompute_ref.py reference.rebuild_stale=true" in message
    assert "reference.mode=auto reference.rebuild_stale=true" in message
    assert "data.max_length: 256" in message


def test_lookups_by_id_equal_a_dict_with_hash_clashes_and_missing_ids(monkeypatch):
    """RefCache.rows_of without a Python dict per pair: the Arrow join (many ids) and the hash index (a
    micro-batch's few) both give the row a dict would, -1 for an id the cache lacks, also when ids share
    a 64-bit hash (forced here: every id hashes to its length)."""
    import pyarrow as pa

    from hdpo_ds.reference import cache as cache_module

    ids = [f"pair-{i}" for i in range(200)] + ["x", "yy", "zz"]
    zeros = np.zeros(len(ids))
    as_dict = {pair_id: row for row, pair_id in enumerate(ids)}
    queries = ["zz", "pair-7", "absent", "x", "pair-199", "yy", "ab"]
    expected = [as_dict.get(q, -1) for q in queries]
    for hashing in (cache_module._id_hash, len):
        monkeypatch.setattr(cache_module, "_id_hash", hashing)
        cache = RefCache(pa.array(ids), zeros, zeros, zeros, zeros, "mem")
        assert cache.rows_of(queries).tolist() == expected
        assert cache.rows_of(pa.array(queries)).tolist() == expected
        monkeypatch.setattr(cache_module, "_JOIN_AT", 2)  # the Arrow join
        assert cache.rows_of(queries).tolist() == expected
        monkeypatch.setattr(cache_module, "_JOIN_AT", 4096)
    assert cache.check_covers(list(reversed(ids))).tolist() == list(reversed(range(len(ids))))
    with pytest.raises(RefCacheError, match=r"no values for 1 of 203 pair\(s\), e.g. ids \['absent'\]"):
        cache.check_covers([*ids[:-1], "absent"])
