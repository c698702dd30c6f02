"""Strategies on hand-computed cases, and vectorised replay against a plain per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch

from layerexit import strategies
from layerexit.errors import LayerExitError


def _probs(rows: list[list[float]]) -> torch.Tensor:
    """One sample's per-layer probabilities -> (L, 1, C)."""
    return torch.tensor(rows).unsqueeze(1)


def test_contract_shapes_and_types() -> None:
    probs = torch.softmax(torch.randn(6, 10, 3), -1)
    for strategy in (
        strategies.Voting(k=0.5, threshold=2.0),
        strategies.Entropy(threshold=0.3),
        strategies.MaxProb(threshold=0.9),
        strategies.Patience(patience=2),
        strategies.Static(layer=3),
    ):
        exit_layer, prediction = strategy.replay(probs)
        assert exit_layer.dtype == prediction.dtype == torch.long
        assert exit_layer.shape == prediction.shape == (10,)
        assert int(exit_layer.min()) >= 1 and int(exit_layer.max()) <= 6
    exit_layer, prediction = strategies.Oracle().replay(probs, torch.zeros(10, dtype=torch.long))
    assert exit_layer.shape == (10,)


def test_entropy_exits_at_first_confident_layer() -> None:
    probs = _probs([[0.5, 0.5], [0.9, 0.1], [0.99, 0.01]])
    h = [strategies.entropy(p[0]).item() for p in probs]
    assert h[0] == pytest.approx(1.0)
    layer, pred = strategies.Entropy(threshold=0.5).replay(probs)  # H(0.9) = 0.469 normalized
    assert (layer.item(), pred.item()) == (2, 0)
    layer, _ = strategies.Entropy(threshold=0.1).replay(probs)
    assert layer.item() == 3
    layer, _ = strategies.Entropy(threshold=0.0).replay(probs)
    assert layer.item() == 3  # nothing fires: the last layer


def test_maxprob_threshold_is_inclusive() -> None:
    probs = _probs([[0.6, 0.4], [0.2, 0.8], [0.1, 0.9]])
    layer, pred = strategies.MaxProb(threshold=0.8).replay(probs)
    assert (layer.item(), pred.item()) == (2, 1)


def test_patience_counts_unchanged_predictions() -> None:
    # argmax per layer: 0, 1, 1, 1, 0, 0
    probs = _probs([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3], [0.8, 0.2]])
    layer, pred = strategies.Patience(patience=1).replay(probs)
    assert (layer.item(), pred.item()) == (3, 1)
    layer, pred = strategies.Patience(patience=2).replay(probs)
    assert (layer.item(), pred.item()) == (4, 1)
    layer, pred = strategies.Patience(patience=3).replay(probs)
    assert (layer.item(), pred.item()) == (6, 0)  # never fires: last layer's argmax


def test_pcee_waits_for_confident_exits_in_a_row() -> None:
    # normalized entropy per layer: H(0.95) = 0.29, H(0.6) = 0.97, H(0.99) = 0.08, H(0.97) = 0.19
    probs = _probs([[0.95, 0.05], [0.6, 0.4], [0.01, 0.99], [0.03, 0.97], [0.9, 0.1]])
    assert strategies.Pcee(threshold=0.3, patience=1).replay(probs) == strategies.Entropy(threshold=0.3).replay(probs)
    layer, pred = strategies.Pcee(threshold=0.3).replay(probs)  # layer 2 breaks the first run; 3 and 4 make one
    assert (layer.item(), pred.item()) == (4, 1)
    layer, pred = strategies.Pcee(threshold=0.3, patience=3).replay(probs)  # never three in a row: the last layer
    assert (layer.item(), pred.item()) == (5, 0)
    layer, _ = strategies.Pcee(threshold=0.1).replay(probs)  # only layer 3 is confident
    assert layer.item() == 5
    assert str(strategies.Pcee(threshold=0.3)) == "pcee(threshold=0.3)"
    assert strategies.parse("pcee(threshold=0.3, patience=3)") == strategies.Pcee(threshold=0.3, patience=3)


def test_voting_appendix_a1_example() -> None:
    """Paper, Appendix A.1: with k=0.75 and delta=1.5, 6 votes out of 6 exit at layer 6, and at
    layer 9 a sample exits with 8 or 9 votes."""
    voting = strategies.Voting(k=0.75, threshold=1.5)
    agree = _probs([[0.2, 0.8]] * 12)
    layer, pred = voting.replay(agree)
    assert 5 / 5**0.75 < 1.5 <= 6 / 6**0.75
    assert (layer.item(), pred.item()) == (6, 1)
    # layers 1-9: two dissenting votes early on -> 7 of 9 for class 1 at layer 9 (not enough:
    # 7 / 9**0.75 = 1.347), 8 of 10 at layer 10 = 1.42, 9 of 11 = 1.49, 10 of 12 = 1.55 -> exit at 12
    rows = [[0.9, 0.1], [0.8, 0.2]] + [[0.3, 0.7]] * 10
    layer, pred = voting.replay(_probs(rows))
    assert (layer.item(), pred.item()) == (12, 1)
    # one dissent: 8 of 9 at layer 9 = 1.54 -> exit at 9 (layer 8: 7/8**0.75 = 1.47)
    rows = [[0.9, 0.1]] + [[0.3, 0.7]] * 11
    layer, _ = voting.replay(_probs(rows))
    assert layer.item() == 9


def test_voting_with_k0_is_a_vote_count_and_ties_go_to_probability_mass() -> None:
    # votes after layer 2: one each; class 1 has more mass (0.45+0.9 vs 0.55+0.1)
    probs = _probs([[0.55, 0.45], [0.1, 0.9], [0.6, 0.4], [0.2, 0.8]])
    layer, pred = strategies.Voting(k=0.0, threshold=3).replay(probs)
    assert (layer.item(), pred.item()) == (4, 1)  # votes 2-2 at layer 4: mass 1.45 vs 2.55
    layer, pred = strategies.Voting(k=0.0, threshold=2).replay(probs)
    assert (layer.item(), pred.item()) == (3, 0)  # 2 votes for class 0 at layer 3


def test_hybrid_fires_on_either_rule() -> None:
    confident = _probs([[0.99, 0.01], [0.1, 0.9], [0.1, 0.9]])
    layer, pred = strategies.Hybrid(k=0.0, threshold=3, entropy_threshold=0.2).replay(confident)
    assert (layer.item(), pred.item()) == (1, 0)
    unsure = _probs([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    layer, pred = strategies.Hybrid(k=0.0, threshold=2, entropy_threshold=0.2).replay(unsure)
    assert (layer.item(), pred.item()) == (2, 0)


def test_static_and_oracle() -> None:
    probs = _probs([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    assert strategies.Static(layer=2).replay(probs)[0].item() == 2
    layer, pred = strategies.Oracle().replay(probs, torch.tensor([1]))
    assert (layer.item(), pred.item()) == (2, 1)
    layer, pred = strategies.Oracle().replay(probs, torch.tensor([2]))  # never right
    assert (layer.item(), pred.item()) == (3, 1)
    with pytest.raises(LayerExitError, match="labels"):
        strategies.Oracle().replay(probs)


def _reference(strategy: strategies.Strategy, probs: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """A plain per-sample loop written straight from docs/design.md (Definitions), independent of ``step``."""
    num_layers, num_classes = probs.shape[0], probs.shape[1]
    rows = probs.tolist()
    argmaxes = [max(range(num_classes), key=lambda c, r=r: r[c]) for r in rows]

    def h(r: list[float]) -> float:
        return -sum(p * math.log(max(p, 1e-12)) for p in r) / math.log(num_classes)

    def vote(layer: int) -> tuple[float, int]:
        votes = [sum(1 for a in argmaxes[:layer] if a == c) for c in range(num_classes)]
        mass = [sum(r[c] for r in rows[:layer]) for c in range(num_classes)]
        top = max(votes)
        winner = max((c for c in range(num_classes) if votes[c] == top), key=lambda c: mass[c])
        return top, winner

    counter = confident_run = 0
    for layer in range(1, num_layers + 1):
        r, a = rows[layer - 1], argmaxes[layer - 1]
        if isinstance(strategy, strategies.Entropy) and h(r) < strategy.threshold:
            return layer, a
        if isinstance(strategy, strategies.MaxProb) and max(r) >= strategy.threshold:
            return layer, a
        if isinstance(strategy, strategies.Patience):
            counter = counter + 1 if layer > 1 and a == argmaxes[layer - 2] else 0
            if counter == strategy.patience:
                return layer, a
        if isinstance(strategy, strategies.Pcee):
            confident_run = confident_run + 1 if h(r) < strategy.threshold else 0
            if confident_run == strategy.patience:
                return layer, a
        if isinstance(strategy, strategies.Voting | strategies.Hybrid):
            top, winner = vote(layer)
            if top / layer**strategy.k >= strategy.threshold:
                return layer, winner
            if isinstance(strategy, strategies.Hybrid) and h(r) < strategy.entropy_threshold:
                return layer, a
        if isinstance(strategy, strategies.Static) and layer == strategy.layer:
            return layer, a
        if isinstance(strategy, strategies.Oracle) and a == int(labels):
            return layer, a
    if isinstance(strategy, strategies.Voting | strategies.Hybrid):
        return num_layers, vote(num_layers)[1]
    return num_layers, argmaxes[-1]


@pytest.mark.parametrize(
    "strategy",
    [
        strategies.Entropy(threshold=0.4),
        strategies.MaxProb(threshold=0.7),
        strategies.Patience(patience=2),
        strategies.Voting(k=0.0, threshold=3),
        strategies.Voting(k=0.5, threshold=1.6),
        strategies.Hybrid(k=0.25, threshold=2.5, entropy_threshold=0.2),
        strategies.Static(layer=4),
        strategies.Pcee(threshold=0.5),
        strategies.Pcee(threshold=0.7, patience=3),
        strategies.Oracle(),
    ],
    ids=str,
)
def test_replay_agrees_with_a_per_sample_loop(strategy: strategies.Strategy) -> None:
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(8, 300, 3, generator=g) * 2, -1)  # (L, N, C)
    labels = torch.randint(0, 3, (300,), generator=g)
    exit_layer, prediction = strategy.replay(probs, labels)
    for n in range(300):
        assert (exit_layer[n].item(), prediction[n].item()) == _reference(strategy, probs[:, n], labels[n]), n


def test_parse_and_validation() -> None:
    assert strategies.parse("voting(k=0.5, threshold=2)") == strategies.Voting(k=0.5, threshold=2.0)
    assert strategies.parse("patience:patience=3") == strategies.Patience(patience=3)
    assert strategies.parse("oracle") == strategies.Oracle()
    assert str(strategies.Voting(k=0.5, threshold=2.0)) == "voting(k=0.5, threshold=2)"
    for bad, message in [
        ("votin(k=1)", "unknown strategy"),
        ("voting(k=1.0, threshold=2)", "k must be in"),
        ("entropy(threshold=-0.1)", "non-negative"),
        ("patience(patience=0)", "positive integer"),
        ("patience(patience=1.5)", "integer"),
        ("pcee(threshold=0.2, patience=0)", "positive integer"),
        ("pcee(patience=2)", "threshold"),
        ("entropy(thresh=0.1)", "no parameter"),
        ("maxprob(threshold=abc)", "not a number"),
    ]:
        with pytest.raises(LayerExitError, match=message):
            strategies.parse(bad)


@pytest.mark.parametrize("num_layers", [6, 12])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_every_default_setting_round_trips_exactly(num_layers: int, num_classes: int) -> None:
    """Run folders store strategies as text: ``parse(str(s))`` must be ``s`` itself, float for float,
    so the setting calibration certified is the one predict, bench and Predictor.from_run run."""
    from layerexit.evaluation.sweep import default_grid

    grid = default_grid(num_layers, num_classes)
    assert len(grid) > 100
    for setting in grid:
        back = strategies.parse(str(setting))
        assert back == setting and str(back) == str(setting), setting
        assert all(type(a) is type(b) for a, b in zip(back.params().values(), setting.params().values(), strict=True))


def test_awkward_floats_round_trip() -> None:
    for value in (2 / 5**0.5, 1e-17, 0.1 + 0.2, 1 / 3, 123456789.123456789, 5e-324):
        s = strategies.Hybrid(k=0.5, threshold=value, entropy_threshold=value / 7)
        assert strategies.parse(str(s)) == s
    assert str(strategies.Entropy(threshold=0.3, normalized=False)) == "entropy(threshold=0.3, normalized=False)"
    assert str(strategies.Voting(k=0.0, threshold=4.0)) == "voting(k=0, threshold=4)"


def _grid_as_of_issue_13(num_layers: int, num_classes: int) -> list[strategies.Strategy]:
    """The default sweep as ``sweep.default_grid`` built it before the families were declared on the
    strategy classes, spelled out: the declarations must give exactly these settings, in this order."""
    from layerexit.strategies import Entropy, Hybrid, MaxProb, Patience, Static, Voting, voting_denominator

    def voting_thresholds(k: float) -> list[float]:
        layers = range(1, num_layers + 1)
        return sorted({v / voting_denominator(layer, k) for layer in layers for v in range(1, layer + 1)})

    low = 1.0 / num_classes
    unit = torch.linspace(0.0, 1.0, 51).tolist()
    return [
        *(Entropy(threshold=round(t, 4)) for t in unit),
        *(MaxProb(threshold=round(low + (1 - low) * t, 4)) for t in torch.linspace(0, 1, 51).tolist()),
        *(Patience(patience=p) for p in range(1, num_layers)),
        *(Voting(k=k, threshold=t) for k in (0.0, 0.25, 0.5, 0.75) for t in voting_thresholds(k)),
        *(
            Hybrid(k=0.5, threshold=t, entropy_threshold=e)
            for t in voting_thresholds(0.5)
            for e in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
        ),
        *(Static(layer=n) for n in range(1, num_layers + 1)),
    ]


@pytest.mark.parametrize("num_layers", [6, 12])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_default_grid_is_pinned(num_layers: int, num_classes: int) -> None:
    from layerexit.evaluation import sweep

    assert sweep.FAMILIES == ("entropy", "maxprob", "patience", "voting", "hybrid", "static")
    expected = _grid_as_of_issue_13(num_layers, num_classes)
    grid = sweep.default_grid(num_layers, num_classes, sweep.FAMILIES)
    assert [repr(s) for s in grid] == [repr(s) for s in expected]  # same classes, same exact floats
    assert grid == expected
    assert sweep.default_grid(num_layers, num_classes) == expected  # the default families, opt-in ones left out
    pcee = sweep.default_grid(num_layers, num_classes, ["pcee"])  # an opt-in family, when named
    assert pcee == [
        strategies.Pcee(threshold=e.threshold, patience=p)
        for p in (2, 3)
        for e in expected
        if isinstance(e, strategies.Entropy)
    ]
    for family in sweep.FAMILIES:  # each family alone is its slice of the whole
        assert sweep.default_grid(num_layers, num_classes, [family]) == [s for s in expected if s.name == family]
    assert sweep.default_grid(num_layers, num_classes, ["static", "entropy"]) == [
        *(s for s in expected if s.name == "static"),
        *(s for s in expected if s.name == "entropy"),
    ]
    with pytest.raises(ValueError, match="unknown strategy family 'oracle'"):
        sweep.default_grid(num_layers, num_classes, ["oracle"])


def test_family_declarations_give_the_tables_they_replaced() -> None:
    """Each fact about a family is declared once, on its class; these are the tables it replaced."""
    from layerexit import compare
    from layerexit.evaluation import calibrate

    assert tuple(n for n in strategies.STRATEGIES if n != "oracle") == strategies.KNOWN_FAMILIES
    assert (*strategies.FAMILIES, "pcee", "agreement") == strategies.KNOWN_FAMILIES  # opt-in: named only
    assert not strategies.family_of("pcee").default and not strategies.family_of("agreement").default
    assert strategies.Oracle.family is None
    knobs = {
        f: (strategies.family_of(f).knob, strategies.family_of(f).slowest_first) for f in strategies.KNOWN_FAMILIES
    }
    assert knobs == {  # calibration's chains: the knob and the sort that puts the slowest setting first
        "entropy": ("threshold", +1),
        "maxprob": ("threshold", -1),
        "patience": ("patience", -1),
        "voting": ("threshold", -1),
        "hybrid": ("threshold", -1),
        "static": ("layer", -1),
        "pcee": ("threshold", +1),
        "agreement": ("threshold", -1),
    }
    assert calibrate.CALIBRATABLE == strategies.KNOWN_FAMILIES
    assert strategies.preferred_families() == ["voting", "hybrid", "patience", "entropy"]
    styles = {f: strategies.family_of(f).style for f in strategies.FAMILIES}
    assert {f: s.color for f, s in styles.items() if s.front} == {
        "entropy": "C0",
        "maxprob": "C1",
        "patience": "C2",
        "voting": "C3",
        "hybrid": "C4",
    }
    assert styles["static"] == strategies.PlotStyle("0.4", marker="s", front=False, label="static (cut at layer n)")
    assert compare.NATIVE == {
        "deebert": "entropy",
        "fastbert": "entropy",
        "joint-distill": "entropy",
        "retrofit": "entropy",
        "righttool": "maxprob",
        "pabee": "patience",
        "relevancy": "patience",
        "ensemble": "voting",
    }
    with pytest.raises(LayerExitError, match="unknown strategy family 'oracle'"):
        strategies.family_of("oracle")
    with pytest.raises(LayerExitError, match="not a family"):
        strategies.Oracle.default_grid(6, 2)


def test_a_larger_knob_moves_every_exit_the_declared_way() -> None:
    """The direction each family declares holds sample by sample along its default grid."""
    from dataclasses import fields
    from itertools import pairwise

    probs = torch.softmax(3 * torch.randn(4, 100, 3, generator=torch.Generator().manual_seed(0)), -1)
    from layerexit.strategies.learned import fit

    rule = fit(probs, probs[-1].argmax(-1), torch.arange(50), "dev")
    for name in strategies.KNOWN_FAMILIES:
        declared = strategies.family_of(name)
        chains: dict[tuple, list[strategies.Strategy]] = {}
        grid = rule.grid() if name == "agreement" else strategies.STRATEGIES[name].default_grid(4, 3)
        for s in grid:
            rest = tuple((f.name, getattr(s, f.name)) for f in fields(s) if f.name != declared.knob)
            chains.setdefault(rest, []).append(s)
        for chain in chains.values():
            chain.sort(key=lambda s: getattr(s, declared.knob))
            exits = [s.replay(probs)[0] for s in chain]
            for smaller, larger in pairwise(exits):
                assert bool((larger <= smaller).all() if declared.larger_exits_earlier else (larger >= smaller).all())


def test_band_selection_rule() -> None:
    """The paper's rule, shared by evaluation and scripts/study.py: best score in the band (ends
    included), ties to the faster setting, then to the first."""
    from layerexit.evaluation.sweep import best_in_band, select_in_band, sweep

    rows = [("a", 1.2, 0.95), ("b", 1.3, 0.90), ("c", 1.6, 0.92), ("d", 1.8, 0.92), ("e", 2.0, 0.91), ("f", 2.1, 0.99)]

    def pick(band: tuple[float, float]) -> str | None:
        best = best_in_band(rows, band, lambda r: r[1], lambda r: r[2])
        return None if best is None else best[0]

    assert pick((1.3, 2.0)) == "d"  # 0.92 twice: the faster
    assert pick((1.3, 1.3)) == "b"  # both ends belong to the band
    assert pick((1.0, 3.0)) == "f"
    assert pick((2.2, 3.0)) is None
    rows = [("x", 1.5, 0.9), ("y", 1.5, 0.9)]
    assert pick((1.3, 2.0)) == "x"  # a full tie: the first
    probs = torch.softmax(torch.randn(4, 50, 2, generator=torch.Generator().manual_seed(0)), -1)
    labels = torch.randint(2, (50,), generator=torch.Generator().manual_seed(1))
    points = sweep(probs, labels, [strategies.Static(layer=n) for n in (1, 2, 3, 4)])
    chosen = select_in_band(points, "static", "accuracy", (1.3, 2.0))
    assert chosen is not None and chosen.strategy in (strategies.Static(layer=2), strategies.Static(layer=3))
    in_band = [p for p in points if p.strategy.name == "static" and 1.3 <= p.speedup <= 2.0]
    assert chosen.scores["accuracy"] == max(p.scores["accuracy"] for p in in_band)
    assert select_in_band(points, "voting", "accuracy", (1.3, 2.0)) is None
