"""Reference-free training (SimPO, CPO, ORPO): the objective, the metrics without a reference, the config
refusals, the dry run, and real runs that build no reference at all (the losses themselves:
tests/test_losses_reference_free.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hdpo_ds.config import ConfigError, LossConfig, load_config
from hdpo_ds.objectives.objective import PairTerms, ReferenceFreeObjective, make_objective
from hdpo_ds.objectives.reference_free import REFERENCE_FREE_LOSS_TYPES, simpo_loss
from hdpo_ds.tracking.metrics import PAIR_METRICS, REFERENCE_METRICS, STEP_METRICS, StepAccumulator
from tests.run_helpers import BUDGET, PAIRS_PER_STEP, ROOT, assert_grads_close, launch

BASE = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[a.jsonl]"]


def _loss_section(**overrides):
    """The run config's loss section (every key at its default) with SimPO's beta and `overrides`."""
    return dataclasses.replace(LossConfig(), **{"type": "simpo", "beta": 2.0, **overrides})


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_make_objective_gives_the_reference_free_objective(loss_type):
    objective = make_objective(_loss_section(type=loss_type), chunk_size=8)
    assert isinstance(objective, ReferenceFreeObjective)
    assert objective.needs_reference is False and objective.has_kl is False
    with pytest.raises(RuntimeError, match="reference-free"):
        objective.reference_values(object(), object())


@pytest.mark.parametrize("loss_type", ["hdpo", "ipo", "tdpo2"])
def test_the_other_objectives_need_a_reference(loss_type):
    assert make_objective(_loss_section(type=loss_type), chunk_size=8).needs_reference is True


def test_pair_loss_reads_no_reference_and_both_token_counts():
    """The recipe passes None for the reference values; SimPO's rejected reward divides by n_l."""
    lp_w, lp_l = torch.tensor([-6.0, -3.0]), torch.tensor([-12.0, -9.0])
    n_w, n_l = torch.tensor([4, 2]), torch.tensor([6, 3])
    objective = make_objective(_loss_section(type="simpo", beta=2.0, simpo_gamma=0.5), chunk_size=8)
    terms = PairTerms(lp_w, lp_l, None, None, chosen_tokens=n_w, rejected_tokens=n_l)
    out = objective.pair_loss(terms, alpha=1.0)
    direct = simpo_loss(lp_w, lp_l, n_w, n_l, beta=2.0, gamma=0.5)
    torch.testing.assert_close(out.losses, direct.losses, rtol=0, atol=0)
    # rejected rewards 2 * (-12 / 6) = -4 and 2 * (-9 / 3) = -6
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-4.0, -6.0]), rtol=0, atol=1e-6)
    assert out.kl is None


def _add(acc, with_reference):
    ref = (torch.tensor([-9.0, -4.0]), torch.tensor([-10.0, -8.0])) if with_reference else (None, None)
    acc.add_pairs(
        losses=torch.tensor([0.5, 1.5]),
        chosen_rewards=torch.tensor([-1.0, -2.0]),
        rejected_rewards=torch.tensor([-3.0, -1.0]),
        chosen_logps=torch.tensor([-6.0, -3.0]),
        rejected_logps=torch.tensor([-12.0, -9.0]),
        chosen_ref_logps=ref[0],
        rejected_ref_logps=ref[1],
        chosen_tokens=torch.tensor([4, 2]),
        rejected_tokens=torch.tensor([6, 3]),
        chosen_token_sums={"entropy": torch.tensor([2.0, 1.0])},
        rejected_token_sums={"entropy": torch.tensor([3.0, 6.0])},
    )


def test_the_accumulator_without_a_reference_has_no_logratio():
    """Two pairs: loss (0.5 + 1.5) / 2 = 1; margins ((-1 + 3) + (-2 + 1)) / 2 = 0.5; accuracy 1/2;
    logps/chosen_mean = -9 / 6 tokens = -1.5; entropy/rejected = 9 / 9 tokens = 1. With a reference the
    log-ratio is ((-6 + 9) + (-3 + 4)) / 6 tokens = 2/3; without one the key is not there at all."""
    free = StepAccumulator("cpu", with_reference=False)
    _add(free, with_reference=False)
    metrics = free.metrics({k: float(v) for k, v in free.sums.items()})
    assert set(metrics) == set(PAIR_METRICS) - set(REFERENCE_METRICS)
    assert metrics["loss"] == 1.0 and metrics["rewards/margins"] == 0.5
    assert metrics["rewards/accuracies"] == 0.5 and metrics["logps/chosen_mean"] == -1.5
    assert metrics["entropy/rejected"] == 1.0
    with_ref = StepAccumulator("cpu")
    _add(with_ref, with_reference=True)
    ref_metrics = with_ref.metrics({k: float(v) for k, v in with_ref.sums.items()})
    assert ref_metrics["logratio/chosen"] == pytest.approx(2 / 3, rel=1e-12)
    assert {k: v for k, v in ref_metrics.items() if k not in REFERENCE_METRICS} == metrics
    assert list(free.sums) == list(with_ref.sums)  # every rank reduces the same vector either way


def test_the_accumulator_refuses_a_mismatch_of_reference_values():
    with pytest.raises(ValueError, match="with_reference=False.*must be None"):
        _add(StepAccumulator("cpu", with_reference=False), with_reference=True)
    with pytest.raises(ValueError, match="with_reference=True.*both be given"):
        _add(StepAccumulator("cpu"), with_reference=False)


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_config_accepts_each_reference_free_type(loss_type):
    cfg = load_config(None, [*BASE, f"loss.type={loss_type}", "loss.beta=2.0"])
    assert cfg.loss.type == loss_type and cfg.loss.simpo_gamma == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.type=simpo", "loss.alpha=0.9"], "loss.alpha: 0.9 has no effect .* only rescale loss.beta"),
        (["loss.type=orpo", "loss.alpha=auto"], "loss.alpha: auto has no effect .* only rescale loss.beta"),
        (
            ["loss.type=cpo", "reference.mode=auto"],
            "reference.mode: 'auto' has no effect .* builds no reference",
        ),
        (["loss.type=cpo", "reference.mode=cached", "reference.cache_path=/c"], "reference.mode: 'cached'"),
        (["loss.type=simpo", "reference.name_or_path=/m"], "reference.name_or_path: '/m' has no effect"),
        (["loss.type=simpo", "reference.cache_path=/c"], "reference.cache_path: '/c' has no effect"),
        (["loss.type=orpo", "reference.rebuild_stale=true"], "reference.rebuild_stale: True has no effect"),
        (["loss.type=orpo", "reference.offload=true"], "reference.offload: True has no effect"),
        (["loss.type=orpo", "reference.ds_config=x.json"], "reference.ds_config: 'x.json' has no effect"),
        (["loss.type=cpo", "loss.simpo_gamma=1.0"], "loss.simpo_gamma: 1.0 has no effect with loss.type=cpo"),
        (
            ["loss.type=hdpo", "loss.simpo_gamma=1.0"],
            "loss.simpo_gamma: 1.0 has no effect with loss.type=hdpo",
        ),
        (["loss.type=simpo", "loss.simpo_gamma=-0.5"], "loss.simpo_gamma: must be >= 0"),
        (["loss.type=cpo", "loss.nll_weight=0.5"], "loss.nll_weight: does not apply .* their own NLL"),
        (["loss.type=simpo", "loss.label_smoothing=0.1"], "loss.label_smoothing: does not apply"),
        (["loss.type=orpo", "loss.tdpo_alpha=0.7"], "loss.tdpo_alpha: 0.7 has no effect"),
        (["loss.type=simpo", "loss.f_alpha=0.3"], "loss.f_alpha: 0.3 has no effect"),
    ],
)
def test_config_refuses_what_a_reference_free_run_would_ignore(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])


def test_simpo_gamma_is_accepted_for_simpo():
    assert load_config(None, [*BASE, "loss.type=simpo", "loss.simpo_gamma=1.0"]).loss.simpo_gamma == 1.0


def test_precompute_refuses_a_reference_free_config():
    from hdpo_ds.recipes.precompute import run_precompute

    cfg = load_config(None, [*BASE, "loss.type=orpo"])
    with pytest.raises(ConfigError, match="loss.type: orpo is reference-free: .* no reference cache"):
        run_precompute(cfg, "/nonexistent/ds.json")  # refused before the ds_config is even read


def test_dry_run_plans_no_reference(monkeypatch):
    """The demo config at 2 ranks: H-DPO plans a reference shard; SimPO plans none, says so, and
    needs less memory per GPU."""
    from hdpo_ds.tools.dryrun import dry_run

    monkeypatch.chdir(ROOT)
    reports = {}
    for name, extra in (("hdpo", []), ("simpo", ["loss.type=simpo", "loss.alpha=1.0", "loss.beta=2.0"])):
        cfg = load_config("configs/demo.yaml", extra)
        reports[name] = dry_run(cfg, "ds_configs/zero3.json", world_size=2)
    rows = {name: {r.name: r for r in report.plan.rows} for name, report in reports.items()}
    assert rows["hdpo"]["reference model (shard)"].bytes > 0
    assert rows["simpo"]["reference model (shard)"].bytes == 0
    assert rows["simpo"]["reference model (shard)"].note == "reference-free loss: no reference"
    assert (
        "reference: none (loss.type=simpo is reference-free: no engine, no cache)" in reports["simpo"].checks
    )
    assert reports["simpo"].plan.required_bytes < reports["hdpo"].plan.required_bytes


# ------------------------------------------------------------------------- real runs (2 steps each)

STEPS = 2
BETA, GAMMA = 2.0, 0.5
# The run overrides (tests/run_helpers.py) set H-DPO's alpha and a reference ds_config: back to defaults.
SIMPO = [
    "loss.type=simpo",
    f"loss.beta={BETA}",
    f"loss.simpo_gamma={GAMMA}",
    "loss.alpha=1.0",
    "reference.ds_config=ds_configs/zero3_infer.json",
    "train.export_hf=false",
]


@pytest.fixture(scope="module")
def simpo_ds2(assets):
    return launch(assets, "simpo_ds2", "deepspeed", STEPS, extra=SIMPO)


@pytest.fixture(scope="module")
def simpo_py1(assets):
    return launch(assets, "simpo_py1", "python", STEPS, extra=SIMPO)


def _simpo_step0(assets):
    """SimPO on step 0's pairs with plain transformers, one sequence at a time: the mean over pairs of
    -log sigmoid(beta * lp_w / n_w - beta * lp_l / n_l - gamma) (Meng et al. 2024, Sec. 2), written out
    as log(1 + e^-z); its gradient, and the mean chosen reward beta * lp_w / n_w."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.data import PairSampler

    model = AutoModelForCausalLM.from_pretrained(
        assets["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    pairs = assets["pairs"]
    sampler = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    )

    def mean_logp(prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
        start = len(prompt) - 1
        return logp[start:].gather(-1, ids[0, 1:][start:, None]).sum() / len(response)

    losses, chosen_rewards = [], []
    for i in sampler.assignment(0, 0).pair_indices:
        pair = pairs[int(i)]
        m_w, m_l = mean_logp(pair.prompt_ids, pair.chosen_ids), mean_logp(pair.prompt_ids, pair.rejected_ids)
        z = BETA * m_w - BETA * m_l - GAMMA
        losses.append(torch.log1p(torch.exp(-z)))
        chosen_rewards.append(BETA * m_w.item())
    loss = sum(losses) / len(losses)
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    return loss.item(), sum(chosen_rewards) / len(chosen_rewards), grads


def _assert_no_reference(run):
    from mlflow.tracking import MlflowClient

    assert run["params"]["run.reference_source"] == "none"
    artifacts = {
        a.path for a in MlflowClient(run["info"]["tracking_uri"]).list_artifacts(run["info"]["run_id"])
    }
    assert "ds_config.json" in artifacts and "ds_config_reference.json" not in artifacts, artifacts
    assert "run.reference_mode" not in run["params"]
    assert not (run["dir"] / "reference_cache").exists()
    assert "reference: none (loss.type=simpo is reference-free)" in run["stderr"]
    assert "reference: online" not in run["stderr"] and "reference: cached" not in run["stderr"]


@pytest.mark.distributed
def test_two_rank_simpo_step0_equals_one_process_and_the_plain_math(assets, simpo_ds2, simpo_py1):
    """deepspeed, 2 ranks (unequal pairs, a filler) against one process on the same data: the same
    step-0 loss and gathered gradient (rtol 1e-5); both equal SimPO computed with plain transformers;
    neither run built a reference (no reference log line, params, cache or ds_config artifact)."""
    for run in (simpo_ds2, simpo_py1):
        _assert_no_reference(run)
    assert simpo_ds2["params"]["run.world_size"] == "2" and simpo_py1["params"]["run.world_size"] == "1"
    assert simpo_ds2["params"]["config.loss.type"] == "simpo"
    loss_2, loss_1 = simpo_ds2["metrics"]["loss"][0], simpo_py1["metrics"]["loss"][0]
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)
    grads_2 = torch.load(simpo_ds2["dir"] / "diagnostics" / "grads_step0.pt")
    assert_grads_close(grads_2, torch.load(simpo_py1["dir"] / "diagnostics" / "grads_step0.pt"))
    expected_loss, expected_reward, expected_grads = _simpo_step0(assets)
    assert loss_2 == pytest.approx(expected_loss, rel=1e-5)
    assert simpo_ds2["metrics"]["rewards/chosen"][0] == pytest.approx(expected_reward, rel=1e-5)
    assert math.isfinite(expected_loss) and expected_loss > 0
    assert_grads_close(grads_2, expected_grads)
    # and after the first update the two runs still agree (the step-1 pairs, trained weights)
    assert simpo_ds2["metrics"]["loss"][1] == pytest.approx(simpo_py1["metrics"]["loss"][1], rel=1e-4)


@pytest.mark.distributed
def test_reference_free_run_logs_every_metric_but_the_logratio(simpo_ds2):
    metrics = simpo_ds2["metrics"]
    per_step = {k for k in metrics if k != "_counts" and not k.startswith(("eval/", "memory/"))}
    expected = set(STEP_METRICS) - set(REFERENCE_METRICS)
    assert per_step == expected, per_step ^ expected
    for key in expected:
        assert sorted(metrics[key]) == list(range(STEPS)), key
    eval_keys = {k for k in metrics if k.startswith("eval/")}
    assert eval_keys == {f"eval/{k}" for k in PAIR_METRICS if k not in REFERENCE_METRICS}
