"""Threshold calibration: the binomial tail, both modes on hand-made cases, the Learn-then-Test
guarantee over many random splits of synthetic per-layer probabilities, and calibration.json.

Run as a script for the larger study quoted in docs/calibration.md:
``PYTHONPATH=src python tests/test_calibrate.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.evaluation import calibrate
from layerexit.evaluation.calibrate import Choice, GridReplay
from layerexit.evaluation.sweep import FAMILIES, default_grid
from layerexit.strategies import Entropy, Static, Voting


def synthetic(
    num_samples: int, num_layers: int = 6, num_classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer probabilities (L, N, C) and labels (N,) of a made-up early-exit model.

    Each sample has an ease in [0, 1) and a persistent distractor (the same wrong evidence at every
    layer); the true class's logit grows with depth and ease, plus fresh noise per layer. Deeper
    layers are more accurate (about 43% at layer 1 to 90% at layer 6 with the defaults), and
    confident early exits are more often right, as in a trained model.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_samples,), generator=g)  # (N,)
    ease = torch.rand(num_samples, generator=g)  # (N,)
    strength = torch.linspace(0.3, 2.5, num_layers)  # (L,)
    distractor = torch.randn(num_samples, num_classes, generator=g)  # (N, C)
    onehot = torch.nn.functional.one_hot(labels, num_classes).float()  # (N, C)
    signal = strength[:, None, None] * (0.5 + 2 * ease)[None, :, None] * onehot  # (L, N, C)
    noise = 0.8 * torch.randn(num_layers, num_samples, num_classes, generator=g)  # (L, N, C)
    return (signal + distractor + noise).softmax(-1), labels


POOL = 1200


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are small: one intra-op thread is several times faster than two on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool() -> tuple[GridReplay, torch.Tensor]:
    probs, labels = synthetic(POOL)
    return GridReplay.of(probs, default_grid(6, 3, FAMILIES)), labels


def _probs(rows: list[list[list[float]]]) -> torch.Tensor:
    """rows[sample][layer] -> (L, N, C)."""
    return torch.tensor(rows).transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# The binomial tail


def _exact_cdf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)), Fraction(0))


@pytest.mark.parametrize("n", [1, 5, 17, 40])
@pytest.mark.parametrize("p", [Fraction(1, 100), Fraction(1, 10), Fraction(1, 2), Fraction(9, 10)])
def test_binomial_cdf_matches_exact_sum(n: int, p: Fraction) -> None:
    got = calibrate.binomial_cdf(torch.arange(-1, n + 1), n, float(p)).tolist()
    want = [0.0] + [float(_exact_cdf(k, n, p)) for k in range(n + 1)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert float(calibrate.p_value(3, n, float(p))) == pytest.approx(float(_exact_cdf(min(3, n), n, p)), rel=1e-9)


def test_binomial_cdf_edges() -> None:
    assert float(calibrate.binomial_cdf(0, 10, 0.0)) == 1.0
    assert float(calibrate.binomial_cdf(9, 10, 1.0)) == 0.0
    assert float(calibrate.binomial_cdf(10, 10, 1.0)) == 1.0
    assert float(calibrate.binomial_cdf(0, 1000, 0.01)) == pytest.approx(0.99**1000, rel=1e-9)


@pytest.mark.parametrize(("max_drop", "delta"), [(0.01, 0.1), (0.05, 0.1), (0.01, 0.1 / 16), (0.2, 0.5)])
def test_required_samples_is_the_smallest_n(max_drop: float, delta: float) -> None:
    n = calibrate.required_samples(max_drop, delta)
    assert float(calibrate.p_value(0, n, max_drop)) <= delta < float(calibrate.p_value(0, n - 1, max_drop))
    assert calibrate.required_samples(0.01, 0.1) == 230


# ----------------------------------------------------------------------------------------------
# Per-sample losses


def test_losses_are_defined_per_sample() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    full = torch.tensor([0, 0, 1, 1])  # right, right, wrong, right
    early = torch.tensor([0, 1, 0, 0])  # right, wrong, right, wrong
    assert calibrate.per_sample_loss(early, full, "disagreement").tolist() == [0, 1, 1, 1]
    drop = calibrate.per_sample_loss(early, full, "accuracy_drop", labels)
    assert drop.tolist() == [0, 1, 0, 1]
    accuracy_change = float((full == labels).float().mean() - (early == labels).float().mean())
    assert float(drop.float().mean()) >= accuracy_change  # 0.5 >= 0.25
    with pytest.raises(LayerExitError, match="needs labels"):
        calibrate.per_sample_loss(early, full, "accuracy_drop")


# ----------------------------------------------------------------------------------------------
# Mode 1: a target speed-up

# 4 samples, 4 layers, 2 classes. Label 0 for all; the argmax is right at layer 1 for samples 0-1,
# at layer 2 for samples 0-2, from layer 3 on for all. Static(n) has speed-up 4 / n.
_RIGHT, _WRONG = [0.8, 0.2], [0.3, 0.7]
HAND = _probs(
    [
        [_RIGHT, _RIGHT, _RIGHT, _RIGHT],
        [_RIGHT, _RIGHT, _RIGHT, _RIGHT],
        [_WRONG, _RIGHT, _RIGHT, _RIGHT],
        [_WRONG, _WRONG, _RIGHT, _RIGHT],
    ]
)
HAND_LABELS = torch.zeros(4, dtype=torch.long)


def test_speedup_picks_best_metric_among_settings_that_reach_the_target() -> None:
    (choice,) = calibrate.for_speedup(HAND, HAND_LABELS, 1.5, families=["static"])
    assert choice.strategy == Static(layer=2)  # 2.0x at 75%; static(3) is 1.33x, below the target
    assert (choice.speedup, choice.metric_value, choice.mode) == (2.0, 0.75, "speedup")
    assert choice.n_calibration == 4 and choice.target_speedup == 1.5
    # an exact hit reaches the target: 4 / 2 = 2.0
    (choice,) = calibrate.for_speedup(HAND, HAND_LABELS, 2.0, families=["static"])
    assert choice.strategy == Static(layer=2)
    (choice,) = calibrate.for_speedup(HAND, HAND_LABELS, 1.0, families=["static"])
    assert choice.strategy == Static(layer=3)  # 100% at 1.33x beats 100% at 1.0x: ties go faster


def test_speedup_leaves_out_families_that_cannot_reach_the_target() -> None:
    choices = calibrate.for_speedup(HAND, HAND_LABELS, 3.0, families=["patience", "static"])
    assert [c.family for c in choices] == ["static"]  # patience 1 exits at layers 2, 2, 3, 2: 1.78x
    assert choices[0].strategy == Static(layer=1)
    with pytest.raises(LayerExitError, match=r"no setting reaches a speed-up of 3x.*patience 1\.78x"):
        calibrate.for_speedup(HAND, HAND_LABELS, 3.0, families=["patience"])


def test_speedup_every_family_and_pick_default(pool: tuple[GridReplay, torch.Tensor]) -> None:
    replay, labels = pool
    probs, _ = synthetic(POOL)
    choices = calibrate.for_speedup(replay, labels, 1.5)
    assert {c.family for c in choices} == set(FAMILIES)
    for c in choices:
        assert c.speedup >= 1.5
        exit_layer, prediction = c.strategy.replay(probs)
        assert c.speedup == pytest.approx(6 / float(exit_layer.double().mean()))
        assert c.metric_value == pytest.approx(float((prediction == labels).float().mean()))
    best = calibrate.pick_default(choices)
    assert best.metric_value == max(c.metric_value or 0.0 for c in choices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target=0.9), "between 1 and the number of layers"),
        (dict(target=4.5), r"between 1 and the number of layers \(4\)"),
        (dict(target=1.5, metric="bleu"), "unknown metric"),
        (dict(target=1.5, families=["oracle"]), "cannot be calibrated"),
        (dict(target=1.5, families="voting"), "list of names"),
        (dict(target=1.5, labels=HAND_LABELS[:3]), r"shape \(4,\)"),
        (dict(target=1.5, labels=None), "needs labels"),
        (dict(target=1.5, probs=HAND[0]), r"shape \(L, N, C\)"),
    ],
)
def test_speedup_input_errors(kwargs: dict[str, object], message: str) -> None:
    call: dict[str, object] = dict(probs=HAND, labels=HAND_LABELS, families=["static"]) | kwargs
    with pytest.raises(LayerExitError, match=message):
        calibrate.for_speedup(**call)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Mode 2: Learn-then-Test


def test_chains_are_fixed_by_the_grid_and_move_exits_earlier(pool: tuple[GridReplay, torch.Tensor]) -> None:
    replay, _ = pool
    grid = default_grid(6, 3, FAMILIES)
    voting = calibrate.chains(grid, "voting")
    assert [grid[c[0]].k for c in voting] == [0.0, 0.25, 0.5, 0.75]  # type: ignore[attr-defined]
    for chain in voting:
        thresholds = [grid[s].threshold for s in chain]  # type: ignore[attr-defined]
        assert thresholds == sorted(thresholds, reverse=True)
    (entropy,) = calibrate.chains(grid, "entropy")
    assert [grid[s].threshold for s in entropy][:2] == [0.0, 0.02]  # type: ignore[attr-defined]
    assert len(calibrate.chains(grid, "hybrid")) == 8
    assert replay.grid == tuple(grid)
    for family in FAMILIES:
        for chain in calibrate.chains(grid, family):
            layers = replay.exit_layer[chain]  # (len(chain), N)
            assert bool((layers[1:] <= layers[:-1]).all()), family


def _hand_replay(losses_per_setting: list[int], n: int) -> GridReplay:
    """A static chain 4, 3, 2, 1 whose setting i disagrees with the full model on its first losses[i] samples."""
    grid = (Static(layer=4), Static(layer=3), Static(layer=2), Static(layer=1))
    full = torch.zeros(n, dtype=torch.long)
    prediction = torch.stack([(torch.arange(n) < k).long() for k in losses_per_setting])  # (S, N)
    exit_layer = torch.tensor([[4], [3], [2], [1]]).expand(4, n)
    return GridReplay(grid, exit_layer, prediction, full, num_layers=4)


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    n = 300
    # setting 2 (static 2) has no loss but comes after a failure: it must not be accepted
    (choice,) = calibrate.for_risk(_hand_replay([0, 30, 0, 0], n), None, 0.05, 0.9, families=["static"])
    assert choice.strategy == Static(layer=4) and not choice.full_model
    assert choice.p_value == pytest.approx(0.95**300)
    (choice,) = calibrate.for_risk(_hand_replay([0, 5, 6, 40], n), None, 0.05, 0.9, families=["static"])
    assert choice.strategy == Static(layer=2)
    assert choice.risk == pytest.approx(6 / n) and choice.speedup == 2.0
    assert choice.p_value == pytest.approx(float(calibrate.binomial_cdf(6, n, 0.05)))
    assert choice.p_value <= 0.1 < float(calibrate.p_value(40, n, 0.05))


def test_full_model_when_nothing_passes() -> None:
    (choice,) = calibrate.for_risk(_hand_replay([100, 100, 100, 100], 300), None, 0.05, 0.9, families=["static"])
    assert choice.full_model and choice.strategy == Static(layer=4)
    assert (choice.speedup, choice.risk, choice.p_value) == (1.0, 0.0, None)
    assert "only the full model" in choice.method


def test_too_few_samples_says_how_many_are_needed() -> None:
    probs, _ = synthetic(100, seed=1)
    needed = calibrate.required_samples(0.01, 0.1 / 2)  # two families, one chain each
    with pytest.raises(LayerExitError, match=f"at least {needed} are needed"):
        calibrate.for_risk(probs, None, 0.01, 0.9, families=["entropy", "maxprob"])


def test_a_family_short_of_samples_falls_back_while_others_are_tested(pool: tuple[GridReplay, torch.Tensor]) -> None:
    probs = pool[0].subset(torch.arange(80))
    # delta 0.1 over two families: entropy tests its one chain at 0.05, hybrid each of 8 at 0.05 / 8
    assert calibrate.required_samples(0.05, 0.05) <= 80 < calibrate.required_samples(0.05, 0.05 / 8)
    choices = calibrate.for_risk(probs, None, 0.05, 0.9, families=["entropy", "hybrid"])
    assert [c.family for c in choices] == ["entropy", "hybrid"]
    assert choices[1].full_model and "needs at least" in choices[1].method
    assert "needs at least" not in choices[0].method


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_drop=0.0), "max_drop must be strictly between 0 and 1"),
        (dict(max_drop=1.0), "max_drop must be strictly between 0 and 1"),
        (dict(confidence=1.0), "confidence must be strictly between 0 and 1"),
        (dict(confidence=0), "confidence must be strictly between 0 and 1"),
        (dict(loss="accuracy_drop"), "needs labels"),
        (dict(loss="brier"), "unknown loss"),
    ],
)
def test_risk_input_errors(kwargs: dict[str, object], message: str) -> None:
    call: dict[str, object] = dict(probs=HAND, labels=None, max_drop=0.05, confidence=0.9) | kwargs
    with pytest.raises(LayerExitError, match=message):
        calibrate.for_risk(**call)  # type: ignore[arg-type]


def test_risk_from_probs_equals_risk_from_a_subset_of_one_replay(pool: tuple[GridReplay, torch.Tensor]) -> None:
    replay, labels = pool
    probs, _ = synthetic(POOL)
    cal, _ = calibrate.random_split(POOL, 0.3, seed=7)
    families = ["entropy", "voting", "static"]
    direct = calibrate.for_risk(probs[:, cal], labels[cal], 0.05, 0.9, families, loss="accuracy_drop")
    reused = calibrate.for_risk(replay.subset(cal), labels[cal], 0.05, 0.9, families, loss="accuracy_drop")
    assert direct == reused
    assert all(c.risk is not None and (c.full_model or c.p_value is not None) for c in direct)


# ----------------------------------------------------------------------------------------------
# The guarantee, measured

TRIALS = 200
MAX_DROP, CONFIDENCE = 0.05, 0.9


def _allowed(trials: int, delta: float) -> float:
    """delta plus three binomial standard deviations of a rate measured over ``trials``."""
    return delta + 3 * math.sqrt(delta * (1 - delta) / trials)


@pytest.mark.parametrize("loss", ["disagreement", "accuracy_drop"])
def test_guarantee_over_random_splits(pool: tuple[GridReplay, torch.Tensor], loss: calibrate.Loss) -> None:
    """Realised risk on the test half exceeds max_drop in at most ~delta of 200 random splits,
    while the chosen setting is faster than the full model in most of them."""
    replay, labels = pool
    result = calibrate.validate(replay, labels, MAX_DROP, CONFIDENCE, loss=loss, trials=TRIALS)
    assert (result.n_calibration, result.n_test) == (POOL // 2, POOL // 2)
    assert result.violation_rate <= _allowed(TRIALS, 1 - CONFIDENCE)
    assert result.faster_fraction >= 0.9
    assert result.mean_speedup > 1.15


def iid_trials(
    replay: GridReplay,
    labels: torch.Tensor,
    loss: calibrate.Loss,
    max_drop: float,
    confidence: float,
    trials: int,
    n: int,
    seed: int = 11,
) -> tuple[float, float, float]:
    """Calibrate on ``trials`` sets of n draws with replacement from the pool, whose empirical
    distribution is then the population and every setting's true risk is known exactly.

    Returns the share of draws whose chosen setting has true risk > max_drop, the share whose
    choice is faster than the full model, and the mean true speed-up of the choices.
    """
    true_risk = replay.losses(loss, labels).double().mean(1)  # (S,)
    true_speedup = replay.speedups()  # (S,)
    index = {s: i for i, s in enumerate(replay.grid)}
    g = torch.Generator().manual_seed(seed)
    violations = faster = 0
    speedup = 0.0
    for _ in range(trials):
        draw = torch.randint(replay.num_samples, (n,), generator=g)
        choices = calibrate.for_risk(replay.subset(draw), labels[draw], max_drop, confidence, loss=loss)
        choice = calibrate.pick_default(choices)
        if choice.full_model:
            speedup += 1.0
            continue
        s = index[choice.strategy]
        violations += float(true_risk[s]) > max_drop
        faster += float(true_speedup[s]) > 1.0
        speedup += float(true_speedup[s])
    return violations / trials, faster / trials, speedup / trials


def test_guarantee_on_iid_draws_with_known_risk(pool: tuple[GridReplay, torch.Tensor]) -> None:
    """The exact statement: the chosen setting's true risk exceeds max_drop in at most ~delta of
    200 i.i.d. calibration sets of 600, and the choice is faster than the full model in most."""
    replay, labels = pool
    violation_rate, faster, _ = iid_trials(replay, labels, "disagreement", MAX_DROP, CONFIDENCE, TRIALS, POOL // 2)
    assert violation_rate <= _allowed(TRIALS, 1 - CONFIDENCE)
    assert faster >= 0.9


# ----------------------------------------------------------------------------------------------
# Checking on test, splits


def _choice(strategy: strategies.Strategy, mode: calibrate.Mode = "speedup", **extra: object) -> Choice:
    """A hand-written choice with placeholder calibration numbers."""
    numbers: dict[str, object] = dict(speedup=2.0, disagreement=0.1, n_calibration=50, method="by hand")
    request: dict[str, object] = (
        dict(target_speedup=1.5, metric="accuracy", metric_value=0.8)
        if mode == "speedup"
        else dict(loss="disagreement", max_drop=0.05, confidence=0.9)
    )
    return Choice(strategy.name, strategy, mode, **(numbers | request | extra))  # type: ignore[arg-type]


def test_check_on_test_reports_realised_numbers() -> None:
    (choice,) = calibrate.for_speedup(HAND, HAND_LABELS, 1.5, families=["static"])
    check = calibrate.check_on_test(choice, HAND, HAND_LABELS)
    assert (check.speedup, check.metric_value, check.full_metric_value) == (2.0, 0.75, 1.0)
    assert (check.disagreement, check.accuracy_drop, check.meets, check.n) == (0.25, 0.25, True, 4)
    check = calibrate.check_on_test(_choice(Static(layer=1), "risk", max_drop=0.4), HAND)
    assert (check.risk, check.meets, check.metric_value) == (0.5, False, None)
    with pytest.raises(LayerExitError, match="needs the test labels"):
        calibrate.check_on_test(_choice(Static(layer=1), "risk", loss="accuracy_drop"), HAND)


def test_random_split() -> None:
    cal, test = calibrate.random_split(10, 0.3, seed=1)
    assert (len(cal), len(test)) == (3, 7)
    assert sorted(cal.tolist() + test.tolist()) == list(range(10))
    assert torch.equal(cal, calibrate.random_split(10, 0.3, seed=1)[0])
    assert not torch.equal(cal, calibrate.random_split(10, 0.3, seed=2)[0])
    assert len(calibrate.random_split(10, 0.01)[0]) == 1 and len(calibrate.random_split(10, 0.99)[1]) == 1
    with pytest.raises(LayerExitError, match="strictly between 0 and 1"):
        calibrate.random_split(10, 1.0)
    with pytest.raises(LayerExitError, match="at least 2 samples"):
        calibrate.random_split(1, 0.5)


# ----------------------------------------------------------------------------------------------
# calibration.json


def _risk_choices() -> list[Choice]:
    probs, labels = synthetic(400, seed=2)
    return calibrate.for_risk(probs, labels, 0.05, 0.9, families=["entropy", "voting", "static"])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    choices = _risk_choices()
    probs, labels = synthetic(300, seed=4)
    checks = [calibrate.check_on_test(c, probs, labels) for c in choices]
    path = calibrate.save_choice(tmp_path, choices, checks=checks, split={"seed": 0, "fraction": 0.5})
    assert path == tmp_path / "calibration.json" and [p.name for p in tmp_path.iterdir()] == ["calibration.json"]
    record = json.loads(path.read_text())
    assert record["mode"] == "risk" and record["request"] == {
        "max_drop": 0.05,
        "confidence": 0.9,
        "loss": "disagreement",
    }
    assert (record["n_calibration"], record["n_test"]) == (400, 300)
    assert calibrate.load_choices(tmp_path) == choices
    assert calibrate.load_choice(tmp_path) == calibrate.pick_default(choices).strategy
    assert calibrate.load_choice(tmp_path, num_layers=6) is not None
    calibrate.save_choice(tmp_path, choices[0], default=choices[0])  # overwrites
    assert calibrate.load_choice(tmp_path) == choices[0].strategy
    assert Choice.from_dict(json.loads(json.dumps(choices[1].to_dict()))) == choices[1]


def test_load_without_calibration_is_none(tmp_path: Path) -> None:
    assert calibrate.load_choice(tmp_path) is None and calibrate.load_choices(tmp_path) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: "{not json", "is damaged"),
        (lambda r: "[]", "not a JSON object"),
        (lambda r: json.dumps(r | {"format": 99}), "has format 99"),
        (lambda r: json.dumps({k: v for k, v in r.items() if k != "default"}), "field 'default'"),
        (lambda r: json.dumps(r | {"default": "voting(k=2, threshold=1)"}), "voting k must be in"),
        (lambda r: json.dumps(r | {"default": "oracle"}), "needs labels at prediction time"),
        (lambda r: json.dumps(r | {"choices": []}), "no choices"),
        (lambda r: json.dumps(r | {"choices": [r["choices"][0] | {"strategy": "nope(x=1)"}]}), "unknown strategy"),
        (lambda r: json.dumps(r | {"choices": [r["choices"][0] | {"speedup": "fast"}]}), "'speedup' has the wrong"),
        (lambda r: json.dumps(r | {"choices": [{k: v for k, v in r["choices"][0].items() if k != "mode"}]}), "lacks"),
        (lambda r: json.dumps(r | {"choices": [r["choices"][0] | {"colour": 1}]}), "unknown field 'colour'"),
    ],
)
def test_damaged_file_is_a_clear_error(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    path = calibrate.save_choice(tmp_path, [_choice(Static(layer=2))])
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(LayerExitError, match=message):
        calibrate.load_choice(tmp_path)


def test_saved_strategy_must_fit_the_model(tmp_path: Path) -> None:
    calibrate.save_choice(tmp_path, _choice(Static(layer=6)))
    assert calibrate.load_choice(tmp_path, num_layers=6) == Static(layer=6)
    with pytest.raises(LayerExitError, match="the model has 4"):
        calibrate.load_choice(tmp_path, num_layers=4)
    with pytest.raises(LayerExitError, match="does not exist"):
        calibrate.save_choice(tmp_path / "missing", _choice(Static(layer=6)))


def test_saving_choices_of_different_requests_is_refused(tmp_path: Path) -> None:
    a = _choice(Entropy(threshold=0.2), "risk")
    b = _choice(Voting(k=0.5, threshold=2.0), "risk", max_drop=0.02)
    with pytest.raises(LayerExitError, match="different calibration requests"):
        calibrate.save_choice(tmp_path, [a, b])
    calibrate.save_choice(tmp_path, [a, _choice(Voting(k=0.5, threshold=2.0), "risk", speedup=2.5)])
    assert calibrate.load_choice(tmp_path) == b.strategy  # the faster


def study(trials: int = 1000) -> None:
    """The table in docs/calibration.md: both checks of the guarantee over a range of requests."""
    torch.set_num_threads(1)
    probs, labels = synthetic(POOL)
    replay = GridReplay.of(probs, default_grid(6, 3, FAMILIES))
    accuracy = " ".join(f"{float(a):.3f}" for a in (probs.argmax(-1) == labels).float().mean(1))
    print(f"synthetic pool: {POOL} samples, 6 layers, 3 classes; accuracy by layer {accuracy}; {trials} trials each")
    print(
        "| loss | max_drop | confidence | split: test risk > bound | split: mean speed-up | split: faster than 1x "
        "| i.i.d.: true risk > bound | i.i.d.: mean speed-up | best possible speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    speedups = replay.speedups()
    for loss in ("disagreement", "accuracy_drop"):
        risks = replay.losses(loss, labels).double().mean(1)  # type: ignore[arg-type]
        for max_drop in (0.02, 0.05, 0.1):
            ideal = float(speedups[risks <= max_drop].max())
            for confidence in (0.8, 0.9, 0.95):
                r = calibrate.validate(replay, labels, max_drop, confidence, loss=loss, trials=trials)  # type: ignore[arg-type]
                iid_rate, _, iid_speedup = iid_trials(
                    replay,
                    labels,
                    loss,
                    max_drop,
                    confidence,
                    trials,
                    POOL // 2,  # type: ignore[arg-type]
                )
                print(
                    f"| {loss} | {max_drop:g} | {confidence:g} | {r.violation_rate:.3f} (allowed {r.allowed:.2f}) "
                    f"| {r.mean_speedup:.3f}x | {r.faster_fraction:.3f} | {iid_rate:.3f} | {iid_speedup:.3f}x "
                    f"| {ideal:.3f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    study()


def test_counts_alone_certify_as_the_replay_does() -> None:
    """`fixed_sequence` on the loss counts of a grid (what a report's points.csv holds) accepts the settings
    whose fastest is each family's choice of `for_risk` on the replay itself."""
    from layerexit.evaluation.risk import fixed_sequence

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 3000, 2, generator=g) * torch.linspace(0.8, 3.0, 6)[:, None, None]
    probs = (logits + logits[-1:] * 1.5).softmax(-1)  # exits that mostly agree with the last one
    replay = calibrate.replay_of(probs, FAMILIES)
    choices = calibrate.for_risk(replay, None, 0.02, 0.9, FAMILIES)
    counts = [int(c) for c in replay.losses("disagreement").sum(1)]
    tests = fixed_sequence(replay.grid, list(FAMILIES), counts, 3000, 0.02, 0.9)
    speedups = replay.speedups().tolist()
    assert any(not c.full_model for c in choices)  # the check is not about full models only
    for choice in choices:
        accepted = tests[choice.family].accepted
        if choice.full_model:
            assert accepted == []
        else:
            best = max(accepted, key=lambda s: (speedups[s], -counts[s]))
            assert replay.grid[best] == choice.strategy
