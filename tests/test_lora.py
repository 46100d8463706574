"""LoRA on ZeRO-3 with the reference as the same model with its adapters off (issue 20).

Config checks run in process. One 2-rank ZeRO-3 run (persistence threshold 0, `lora2`) of
tests/probes/lora_step.py serves the fast distributed tests: step 0 with B = 0 for the loss family,
the frozen base after two steps, the step-0 loss and LoRA gradient against plain peft math in one
process, the adapters-off reference against a separate reference engine on the base model, and the
exported adapter. The slow tests add a one-process run of the same probe (the trajectory and the
step-1 gradient, 2 ranks == 1 process) and kill + resume of a LoRA run.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from hdpo_ds.config import ConfigError, LoraConfig, load_config, reference_source
from tests.run_helpers import BUDGET, PAIRS_PER_STEP, assert_grads_close, launch, mlflow_run

LORA = [
    "model.lora.r=4",
    "model.lora.alpha=8",
    "model.lora.modules_to_save=[lm_head]",  # a trained copy of the output layer beside the adapters
    "train.eval_every=0",
    "data.eval_files=[]",
    "train.dump_gradients_at=[0,1]",
    "monitors.plots=false",
]
RUN_LORA = LoraConfig(r=4, alpha=8.0, modules_to_save=["lm_head"])  # LORA's keys, for plain peft
PROBE_STEPS = 3  # the probe trains two; finish() then checkpoints and exports at step 2
BETA, ALPHA = 0.5, 0.9  # the run's loss (run_helpers.overrides)
LOSS_BETA = 0.2  # the probe's loss family at step 0 (tests/probes/lora_step.py LOSS_BETA)


def _cfg(*extra: str):
    base = ["model.name_or_path=m", "data.train_files=[t.jsonl]"]
    return load_config(None, [*base, *extra])


# ------------------------------------------------------------------------------------------ config
def test_lora_is_off_by_default_and_its_keys_are_refused_then():
    cfg = _cfg()
    assert cfg.model.lora == LoraConfig() and cfg.model.lora.r == 0
    assert reference_source(cfg) == "engine"
    with pytest.raises(ConfigError, match=r"^model\.lora\.alpha: .*model\.lora\.r=0"):
        _cfg("model.lora.alpha=32")
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: "):
        _cfg("model.lora.target_modules=[q_proj]")
    with pytest.raises(ConfigError, match=r"^reference\.source: adapters_off needs LoRA"):
        _cfg("reference.source=adapters_off")


def test_lora_keys_and_the_reference_source():
    cfg = _cfg("model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]", "model.lora.dropout=0.1")
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.lora.alpha == 16.0
    assert reference_source(cfg) == "adapters_off"
    assert _cfg("model.lora.r=8").model.lora.target_modules == "all-linear"
    assert reference_source(_cfg("model.lora.r=8", "reference.source=engine")) == "engine"
    for bad, key in (
        ("model.lora.r=-1", "model.lora.r"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.lora.modules_to_save=['']", r"model.lora.modules_to_save\[0\]"),
    ):
        extra = [bad] if bad.startswith("model.lora.r=") else ["model.lora.r=8", bad]
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            _cfg(*extra)


def test_what_lora_cannot_serve_is_refused_by_key():
    with pytest.raises(ConfigError, match=r"^reference\.sync: soft \(TR-DPO\) is not available with LoRA"):
        _cfg("model.lora.r=8", "reference.sync=soft")
    with pytest.raises(ConfigError, match=r"^reference\.name_or_path: .*adapters_off"):
        _cfg("model.lora.r=8", "reference.name_or_path=other")
    _cfg("model.lora.r=8", "reference.name_or_path=other", "reference.source=engine")  # its own engine
    with pytest.raises(ConfigError, match=r"^reference\.offload: "):
        _cfg("model.lora.r=8", "reference.offload=true")
    with pytest.raises(ConfigError, match=r"^reference\.source: adapters_off says what computes"):
        _cfg("model.lora.r=8", "reference.source=adapters_off", "reference.mode=auto")
    assert _cfg("model.lora.r=8", "reference.mode=auto").reference.source == "auto"  # cache of the base
    for extra in ("model.lora.target_modules=[q_proj, lm_head]", "model.lora.modules_to_save=[lm_head]"):
        with pytest.raises(ConfigError, match=r"^train\.fused_head: true reads only lm_head"):
            _cfg("model.lora.r=8", extra, "train.fused_head=true")
        _cfg("model.lora.r=8", extra)  # auto: turns itself off at start-up (recipes/preference.py)


def test_init_adapter_must_match_the_lora_keys(tmp_path):
    from hdpo_ds.runtime.lora import check_init_adapter

    with pytest.raises(ConfigError, match=r"^model\.lora\.init_adapter: .* holds no adapter_config\.json"):
        check_init_adapter(LoraConfig(r=4, init_adapter=str(tmp_path)))
    saved = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    check_init_adapter(LoraConfig(r=4, alpha=8.0, init_adapter=str(tmp_path)))
    check_init_adapter(LoraConfig(r=4, alpha=8.0, target_modules=["q_proj"], init_adapter=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model\.lora\.r: 8 here, 4 in the adapter") as err:
        check_init_adapter(LoraConfig(r=8, alpha=16.0, target_modules=["v_proj"], init_adapter=str(tmp_path)))
    assert "model.lora.alpha: 16.0 here, 8 in the adapter" in str(err.value)
    assert "model.lora.target_modules: ['v_proj'] here, ['q_proj'] in the adapter" in str(err.value)


def test_tied_embeddings_in_modules_to_save_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hdpo_ds.runtime.lora import wrap_model

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    for key in ("modules_to_save", "target_modules"):
        lora = LoraConfig(r=2, **{key: ["embed_tokens"]})
        with pytest.raises(ConfigError, match=rf"^model\.lora\.{key}: 'model\.embed_tokens' is one of the"):
            wrap_model(LlamaForCausalLM(config), lora, seed=0)
    wrapped = wrap_model(LlamaForCausalLM(config), LoraConfig(r=2), seed=0)  # all-linear: no embedding
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_disable_dropout_leaves_the_adapters_dropout_as_set():
    """The session disables the base model's dropout when it loads it (runtime/models.py), then wraps it:
    the adapters' own dropout (model.lora.dropout) keeps its value."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hdpo_ds.runtime.lora import wrap_model
    from hdpo_ds.runtime.models import disable_dropout

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        attention_dropout=0.3,
    )
    model = LlamaForCausalLM(config)
    assert disable_dropout(model) == ["LlamaAttention.attention_dropout"]
    wrapped = wrap_model(model, LoraConfig(r=2, dropout=0.1), seed=0)
    adapter_dropouts = [m.p for n, m in wrapped.named_modules() if n.endswith("lora_dropout.default")]
    assert len(adapter_dropouts) == 7 and set(adapter_dropouts) == {0.1}  # q, k, v, o, gate, up, down
    base = wrapped.get_base_model().model.layers[0].self_attn
    assert base.attention_dropout == 0.0


def test_what_lora_cannot_serve_yet_is_refused(tmp_path):
    """Evaluating an adapter without a usable base and LoRA for SFT are refused, naming what to change,
    not silently wrong."""
    from hdpo_ds.config import to_dict
    from hdpo_ds.recipes.evaluate import resolve_model_dir
    from hdpo_ds.recipes.sft import check_sft_config

    cfg = _cfg("model.lora.r=4")
    folder = tmp_path / "checkpoints" / "step00000002"
    folder.mkdir(parents=True)
    (folder / "client_state.json").write_text(json.dumps({"config": to_dict(cfg), "dtype": "float32"}))
    (folder / "COMPLETE.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^--base: .* names no base model"):
        resolve_model_dir(str(adapter), str(tmp_path / "work"))
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "configs/models/tiny-demo"})
    )
    with pytest.raises(ValueError, match=r"^--base: configs/models/tiny-demo holds a config but no weights"):
        resolve_model_dir(str(adapter), str(tmp_path / "work"))
    with pytest.raises(ValueError, match=r"^--base: only with an adapter directory"):
        resolve_model_dir(str(folder), str(tmp_path / "work"), base="configs/models/tiny-demo")
    with pytest.raises(ConfigError, match=r"^model\.lora\.r: 4: LoRA is not available for SFT"):
        check_sft_config(cfg)


# ------------------------------------------------------------------------------ the 2-rank LoRA run
@pytest.fixture(scope="module")
def lora2(assets):
    extra = [*LORA, "train.export_merged=true"]
    run = launch(assets, "lora2", "deepspeed", PROBE_STEPS, extra=extra, script="tests/probes/lora_step.py")
    run["probe"] = json.loads((run["dir"] / "lora_probe.json").read_text())
    run.update(mlflow_run(run["dir"]))
    return run


def _expected_at_h0(loss_type: str, row: dict, i: int) -> float:
    """The per-pair loss that policy == reference (every log-ratio r = lp - ref = 0) implies, by type,
    at beta = LOSS_BETA (objectives/losses.py):
    dpo, f-DPO (JS), robust, TDPO: the logistic at 0, log 2; IPO: (0 - 1/(2 beta))^2; hinge: max(0, 1 - 0);
    SPPO: (0 - 1/(2 beta))^2 + (0 + 1/(2 beta))^2; NCA: softplus(0) + softplus(0)/2 + softplus(0)/2 = 2 log 2;
    APO zero and down: 1 - 1/2 + 1/2 = 1/2 + 1 - 1/2 = 1; EXO at z = 0: sigma(0)(log sigma(0) - log(1 - eps))
    + sigma(0)(log sigma(0) - log eps) = -log 2 - log(eps (1 - eps)) / 2; DiscoPOP at z = 0:
    sigma(0) softplus(0) + exp(log sigma(0)) = log 2 / 2 + 1/2; H-DPO with alpha 0.9 is no log-ratio:
    its reward is alpha*beta*lp - beta*ref = beta*(alpha - 1)*lp, so
    loss = softplus(-(beta*(alpha - 1)*(lp_w - lp_l)))."""
    b, eps = LOSS_BETA, 1e-3
    fixed = {
        "dpo": math.log(2),
        "fdpo_js": math.log(2),
        "robust": math.log(2),
        "tdpo1": math.log(2),
        "ipo": 1 / (4 * b * b),
        "hinge": 1.0,
        "sppo_hard": 1 / (2 * b * b),
        "nca_pair": 2 * math.log(2),
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "exo_pair": -math.log(2) - 0.5 * math.log(eps * (1 - eps)),
        "discopop": 0.5 * math.log(2) + 0.5,
    }
    if loss_type in fixed:
        return fixed[loss_type]
    assert loss_type == "hdpo"
    z = LOSS_BETA * (ALPHA - 1) * (row["lp_w"][i] - row["lp_l"][i])
    return math.log1p(math.exp(-z))


@pytest.mark.distributed
def test_step0_adapters_off_reference_equals_the_policy(lora2):
    """B = 0: the reference (adapters off) and the policy (adapters on) give the same log-probs, bit for
    bit, so DPO's rewards are exactly 0 and its loss log 2; every other type gives its value at h = 0."""
    probe = lora2["probe"]
    assert probe["reference_source"] == "adapters_off"
    assert lora2["params"]["run.reference_source"] == "adapters_off"
    assert len(probe["step0"]) == 13
    for loss_type, row in probe["step0"].items():
        assert len(row["losses"]) == PAIRS_PER_STEP, loss_type
        assert row["lp_w"] == row["ref_w"] and row["lp_l"] == row["ref_l"], loss_type
        assert all(v < -1.0 for v in row["lp_w"]), "real log-probs, not zeros"
        # float32 losses; H-DPO's z is a difference of rewards of size ~beta * 100, rounded in float32
        tol = 1e-5 if loss_type == "hdpo" else 1e-6
        for i, loss in enumerate(row["losses"]):
            assert loss == pytest.approx(_expected_at_h0(loss_type, row, i), rel=tol, abs=tol), loss_type
    dpo = probe["step0"]["dpo"]
    assert set(dpo["chosen_rewards"]) == {0.0} and set(dpo["rejected_rewards"]) == {0.0}
    assert all(abs(k) < 1e-6 for k in probe["step0"]["tdpo1"]["kl_w"] + probe["step0"]["tdpo1"]["kl_l"])
    hdpo = probe["step0"]["hdpo"]
    assert min(abs(loss - math.log(2)) for loss in hdpo["losses"]) > 1e-3  # alpha != 1 is no log 2


@pytest.mark.distributed
def test_only_the_adapters_change_and_the_frozen_base_is_bit_identical(lora2):
    probe = lora2["probe"]
    trainable = set(probe["trainable"])
    saved = {n for n in trainable if ".modules_to_save." in n}
    assert saved == {"base_model.model.lm_head.modules_to_save.default.weight"}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable - saved)
    assert probe["frozen_changed"] == [] and probe["frozen_changed_step1"] == []
    # B starts at 0, so A's step-0 gradient is 0: the B matrices and the saved lm_head move in step 0
    assert set(probe["changed"]) == {n for n in trainable if ".lora_B." in n} | saved
    assert not probe["skipped"]


def _plain_peft_step0(assets, lora: LoraConfig | None = None):
    """The step-0 global batch in one process with plain transformers + peft (no DeepSpeed, no packing):
    the same seeded adapters (runtime/lora.py wrap_model), the reference = the same model with its
    adapters disabled. H-DPO at alpha 0.9, beta 0.5 as in tests/test_trainer.py."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.data import PairSampler
    from hdpo_ds.runtime.lora import wrap_model

    base = AutoModelForCausalLM.from_pretrained(
        assets["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model = wrap_model(base, lora or RUN_LORA, seed=assets["seed"])
    pairs = assets["pairs"]
    sampler = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    )

    def sequence_logp(prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
        start = len(prompt) - 1
        return logp[start:].gather(-1, ids[0, 1:][start:, None]).sum()

    losses = []
    for i in sampler.assignment(0, 0).pair_indices:
        pair = pairs[int(i)]
        lp_w, lp_l = (
            sequence_logp(pair.prompt_ids, pair.chosen_ids),
            sequence_logp(pair.prompt_ids, pair.rejected_ids),
        )
        with torch.no_grad(), model.disable_adapter():
            ref_w, ref_l = (
                sequence_logp(pair.prompt_ids, pair.chosen_ids),
                sequence_logp(pair.prompt_ids, pair.rejected_ids),
            )
        z = ALPHA * BETA * (lp_w - lp_l) - BETA * (ref_w - ref_l)
        losses.append(torch.log1p(torch.exp(-z)))
    loss = sum(losses) / len(losses)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.distributed
def test_two_rank_step0_loss_and_lora_gradient_equal_plain_peft(assets, lora2):
    expected_loss, expected = _plain_peft_step0(assets)
    assert lora2["probe"]["loss0"] == pytest.approx(expected_loss, rel=1e-5)
    assert lora2["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    grads = torch.load(lora2["dir"] / "diagnostics" / "grads_step0.pt")
    assert set(grads) == set(expected)  # the trainable parameters only: the base has no gradient
    a_side = {n for n in expected if ".lora_A." in n}
    for name in a_side:  # B = 0 makes A's gradient exactly 0, in both
        assert not expected[name].any() and not grads[name].any(), name
    assert_grads_close(
        {n: grads[n] for n in grads if n not in a_side}, {n: expected[n] for n in expected if n not in a_side}
    )


@pytest.mark.distributed
def test_adapters_off_reference_equals_a_reference_engine_on_the_base(lora2):
    after = lora2["probe"]["after"]
    off, eng, pol = (list(itertools.chain(*after[k])) for k in ("adapters_off", "engine", "policy"))
    assert len(off) == len(eng) == len(pol) > 0
    torch.testing.assert_close(torch.tensor(off), torch.tensor(eng), rtol=1e-5, atol=1e-5)
    # after two steps the adapters matter: the policy is no longer the base
    assert max(abs(a - b) for a, b in zip(off, pol, strict=True)) > 1e-3


@pytest.mark.distributed
def test_the_exported_adapter_loads_with_peft_and_gives_the_in_run_logits(assets, lora2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora2["dir"] / "hf" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    saved = torch.load(lora2["dir"] / "lora_logits.pt")
    base = AutoModelForCausalLM.from_pretrained(
        assets["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], use_cache=False).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=saved["input_ids"], use_cache=False).logits.float()
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter holds the training


@pytest.mark.distributed
def test_merged_exports_in_run_and_offline_give_base_plus_adapter(assets, lora2, tmp_path):
    """train.export_merged writes the merged model in hf/ beside the adapter; the offline export of the
    run's checkpoint writes the same adapter (bit for bit) and the same merged model; both merged models
    give the in-run logits (1e-5), and evaluate's --model accepts the adapter folder (with --base) and
    the LoRA checkpoint, giving those logits too."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hdpo_ds.recipes.evaluate import resolve_model_dir
    from hdpo_ds.runtime.export import export_hf_from_checkpoint

    saved = torch.load(lora2["dir"] / "lora_logits.pt")
    hf = lora2["dir"] / "hf"
    offline = tmp_path / "offline"
    export_hf_from_checkpoint(str(lora2["dir"] / "checkpoints" / "step00000002"), str(offline))
    adapter_files = ("adapter_model.safetensors",)
    for name in adapter_files:
        ours, theirs = load_file(offline / "adapter" / name), load_file(hf / "adapter" / name)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    evaluated = [
        resolve_model_dir(str(hf / "adapter"), str(tmp_path / "eval"), base=str(assets["model"])),
        resolve_model_dir(str(lora2["dir"] / "checkpoints"), str(tmp_path / "eval")),
    ]
    for folder in (hf, offline, *evaluated):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        with torch.no_grad():
            logits = model.eval()(input_ids=saved["input_ids"], use_cache=False).logits.float()
        torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5, msg=str(folder))


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_follow_one_process_under_lora(assets, lora2):
    one = launch(assets, "lora1", "python", PROBE_STEPS, extra=LORA, script="tests/probes/lora_step.py")
    probe1 = json.loads((one["dir"] / "lora_probe.json").read_text())
    probe2 = lora2["probe"]
    for key in ("loss0", "loss1"):
        assert probe2[key] == pytest.approx(probe1[key], rel=1e-5)
    assert abs(probe1["loss1"] - probe1["loss0"]) > 1e-4  # training moved
    for step in (0, 1):
        g1 = torch.load(one["dir"] / "diagnostics" / f"grads_step{step}.pt")
        g2 = torch.load(lora2["dir"] / "diagnostics" / f"grads_step{step}.pt")
        if step == 0:
            g1 = {n: g for n, g in g1.items() if ".lora_B." in n}
            g2 = {n: g for n, g in g2.items() if ".lora_B." in n}
        assert_grads_close(g2, g1)


def _adapter_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "hf" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_sigkill_then_resume_equals_uninterrupted(assets):
    """2 ranks, 4 steps with an evaluation every 2: SIGKILLed as step 3 starts (the step-2 checkpoint
    written), started again: the same losses and the same exported adapter as the uninterrupted run."""
    steps, extra = 4, ["model.lora.r=4", "model.lora.alpha=8", "train.save_every=2", "monitors.plots=false"]
    extra.append("train.dump_gradients_at=[]")
    full = launch(assets, "lora_full", "deepspeed", steps, extra=extra)
    assert full["params"]["run.reference_source"] == "adapters_off"
    killed = launch(
        assets,
        "lora_kill",
        "deepspeed",
        steps,
        extra=extra,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "3"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    assert (assets["root"] / "lora_kill" / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = launch(assets, "lora_kill", "deepspeed", steps, extra=extra)
    assert "at step 2" in resumed["stderr"]
    for step in range(steps):
        assert resumed["metrics"]["loss"][step] == pytest.approx(full["metrics"]["loss"][step], rel=1e-5)
    assert resumed["metrics"]["eval/loss"] == pytest.approx(full["metrics"]["eval/loss"], rel=1e-5)
    assert abs(full["metrics"]["loss"][steps - 1] - full["metrics"]["loss"][0]) > 1e-4  # it trained
    got, expected = _adapter_weights(resumed["dir"]), _adapter_weights(full["dir"])
    assert set(got) == set(expected) and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_lora_with_the_fused_head_and_with_a_saved_output_layer(assets):
    """One process each: (a) train.fused_head=true with all-linear (the output layer is not adapted): the
    policy's and the adapters-off reference's log-probs come from the fused head; (b) lm_head in
    modules_to_save with fused_head auto: the fused head turns itself off (logged), the saved copy trains,
    the base's lm_head does not. Both: step-0 loss and gradient equal plain peft math."""
    common = [*LORA[:2], "train.eval_every=0", "data.eval_files=[]", "monitors.plots=false"]
    fused = launch(assets, "lora_fused", "python", 1, extra=[*common, "train.fused_head=true"])
    assert fused["params"]["run.fused_head"] == "True"
    assert fused["params"]["run.fused_head_reference"] == "True"
    expected_loss, expected = _plain_peft_step0(assets, LoraConfig(r=4, alpha=8.0))
    assert fused["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    grads = torch.load(fused["dir"] / "diagnostics" / "grads_step0.pt")
    b_side = [n for n in expected if ".lora_B." in n]
    assert_grads_close({n: grads[n] for n in b_side}, {n: expected[n] for n in b_side})

    saved = launch(assets, "lora_saved", "python", 1, extra=[*common, "model.lora.modules_to_save=[lm_head]"])
    assert saved["params"]["run.fused_head"] == "False"
    assert "train.fused_head: auto: off, the output layer is adapted by model.lora" in saved["stderr"]
    lora = LoraConfig(r=4, alpha=8.0, modules_to_save=["lm_head"])
    expected_loss, expected = _plain_peft_step0(assets, lora)
    assert saved["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    grads = torch.load(saved["dir"] / "diagnostics" / "grads_step0.pt")
    assert set(grads) == set(expected)
    head = [n for n in expected if "modules_to_save" in n]
    assert head, "the saved lm_head copy trains"
    keep = [*b_side, *head]
    assert_grads_close({n: grads[n] for n in keep}, {n: expected[n] for n in keep})
    from safetensors.torch import load_file

    adapter = load_file(str(saved["dir"] / "hf" / "adapter" / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in adapter), sorted(adapter)[:5]


def test_export_merged_is_refused_without_lora_or_without_the_export():
    with pytest.raises(ConfigError, match=r"^train\.export_merged: merges LoRA adapters"):
        _cfg("train.export_merged=true")
    with pytest.raises(ConfigError, match=r"^train\.export_merged: true needs train\.export_hf: true"):
        _cfg("model.lora.r=4", "train.export_merged=true", "train.export_hf=false")
    assert _cfg("model.lora.r=4", "train.export_merged=true").train.export_merged
