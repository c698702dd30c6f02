"""Each training method's stages: what is trained, what is frozen, what the loss is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerexit import losses
from layerexit import methods as objectives
from layerexit.config import TrainConfig
from layerexit.data.encoding import Encoded
from layerexit.errors import LayerExitError
from layerexit.methods import EnsembleOptions, StaticOptions
from layerexit.model import EarlyExitModel
from layerexit.training.recipe import parameter_groups, teacher_probs

from .conftest import random_batch, tiny_model


def _one_step(model: EarlyExitModel, stage: objectives.Stage) -> dict[str, bool]:
    """Which parameters a single optimiser step of ``stage`` changes."""
    config = TrainConfig(lr=1e-2, head_lr=1e-2, weight_decay=0.0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model, stage, config))
    ids, mask = random_batch(batch=8)
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0))
    loss = stage.loss(model(ids, mask, depth=stage.depth).logits, labels)
    loss.backward()
    optimizer.step()
    return {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}


def _changed(changed: dict[str, bool], prefix: str) -> bool:
    return any(v for n, v in changed.items() if n.startswith(prefix))


def test_method_stages() -> None:
    assert [s.name for s in objectives.build("ensemble", 4)] == ["ensemble"]
    assert [s.name for s in objectives.build("deebert", 4)] == ["finetune", "internal-exits"]
    assert [s.name for s in objectives.build("fastbert", 4)] == ["finetune", "self-distillation"]
    assert [(s.name, s.depth, s.exits) for s in objectives.build("static", 4, StaticOptions(static_layers=2))] == [
        ("static-2", 2, (2,))
    ]
    with pytest.raises(ValueError, match="unknown objective"):
        objectives.build("magic", 4)
    with pytest.raises(ValueError, match="static_layers"):
        objectives.build("static", 4, StaticOptions(static_layers=5))


@pytest.mark.parametrize("name", ["ensemble", "relevancy", "pabee", "righttool"])
def test_joint_methods_train_encoder_and_every_exit(name: str) -> None:
    model = tiny_model(head="linear")
    changed = _one_step(model, objectives.build(name, 4)[0])
    assert _changed(changed, "backbone.")
    for i in range(4):
        assert _changed(changed, f"exits.{i}."), i


def test_finetune_trains_only_the_final_exit() -> None:
    model = tiny_model(head="linear")
    changed = _one_step(model, objectives.build("finetune", 4)[0])
    assert _changed(changed, "backbone.") and _changed(changed, "exits.3.")
    assert not any(_changed(changed, f"exits.{i}.") for i in range(3))


@pytest.mark.parametrize("name", ["deebert", "fastbert"])
def test_second_stage_freezes_encoder_and_final_exit(name: str) -> None:
    model = tiny_model(head="linear")
    changed = _one_step(model, objectives.build(name, 4)[1])
    assert not _changed(changed, "backbone.")
    assert not _changed(changed, "exits.3.")
    assert all(_changed(changed, f"exits.{i}.") for i in range(3))


def test_static_trains_only_its_layers_and_exit() -> None:
    model = tiny_model(head="linear")
    changed = _one_step(model, objectives.build("static", 4, StaticOptions(static_layers=2))[0])
    assert _changed(changed, "backbone.model.encoder.layer.1.")
    assert not _changed(changed, "backbone.model.encoder.layer.2.")
    assert not _changed(changed, "backbone.model.encoder.layer.3.")
    assert _changed(changed, "exits.1.")
    assert not any(_changed(changed, f"exits.{i}.") for i in (0, 2, 3))


def test_stage_losses_are_the_documented_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, 3, generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    ensemble = objectives.build("ensemble", 4, EnsembleOptions(lam=0.3, weighting="linear", drop_last_diversity=True))[
        0
    ]
    div_w = torch.tensor([0.1, 0.2, 0.3, 0.0])  # beta_i = alpha_i = i / 10, beta_L = 0
    expected = losses.relevancy(logits, labels, losses.layer_weights(4, "linear")) - 0.3 * losses.diversity(
        logits, div_w
    )
    assert ensemble.loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    pabee = objectives.build("pabee", 4)[0]
    assert pabee.loss(logits, labels).item() == pytest.approx(
        losses.relevancy(logits, labels, torch.tensor([0.1, 0.2, 0.3, 0.4])).item(), rel=1e-6
    )
    finetune = objectives.build("finetune", 4)[0]
    assert finetune.loss(logits, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[-1], labels).item(), rel=1e-6
    )
    deebert_exits = objectives.build("deebert", 4)[1]
    assert deebert_exits.loss(logits, labels).item() == pytest.approx(
        losses.relevancy(logits[:3], labels).item(), rel=1e-6
    )
    fastbert_distil = objectives.build("fastbert", 4)[1]
    teacher = logits[-1].softmax(-1)
    kl = sum((teacher * (teacher.log() - logits[i].log_softmax(-1))).sum(-1).mean() for i in range(3))
    assert fastbert_distil.loss(logits, labels).item() == pytest.approx(float(kl), rel=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "linear"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_lambda_weighs_each_exits_diversity_against_its_own_relevancy(weighting: str, drop_last: bool) -> None:
    """One scale: the ensemble loss is sum_i alpha_i (CE(x_i, y) - lambda min_j CE(x_i, x_j)), so lambda is
    the same per-exit trade-off under uniform and linear weights (the paper's Eq. 22 needs lambda < 1)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 16, 3, generator=g)
    labels = torch.randint(0, 3, (16,), generator=g)
    lam = 0.2
    alpha, beta = losses.ensemble_weights(5, weighting, drop_last)  # type: ignore[arg-type]
    assert torch.equal(beta[:-1], alpha[:-1]) and float(beta[-1]) == (0.0 if drop_last else float(alpha[-1]))
    loss = objectives.build(
        "ensemble",
        5,
        EnsembleOptions(lam=lam, weighting=weighting, drop_last_diversity=drop_last),  # type: ignore[arg-type]
    )[0].loss
    q = logits.log_softmax(-1)  # (L, B, C)
    x = q.exp()
    expected = 0.0
    for i in range(5):
        ce_label = -q[i].gather(1, labels[:, None]).mean()
        div = min(float(-(x[j] * q[i]).sum(-1).mean()) for j in range(i)) if i else 0.0
        keep = 0.0 if (drop_last and i == 4) else 1.0
        expected += float(alpha[i]) * (float(ce_label) - lam * keep * div)
    assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_auto_weighting_is_linear_except_for_albert() -> None:
    from layerexit.methods import resolve_weighting

    assert resolve_weighting(EnsembleOptions(), "bert") == "linear"
    assert resolve_weighting(EnsembleOptions(), "mpnet") == "linear"
    assert resolve_weighting(EnsembleOptions(), "albert") == "uniform"
    assert resolve_weighting(EnsembleOptions(weighting="uniform"), "bert") == "uniform"


def test_joint_distill_distils_every_exit_towards_a_fixed_teacher() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 8, 3, generator=g)
    teacher = torch.randn(8, 3, generator=g).softmax(-1)
    finetune, joint = objectives.build("joint-distill", 4)
    assert (finetune.name, joint.name, joint.targets, joint.equilibrium, joint.alternate) == (
        "finetune",
        "distill-every-exit",
        "teacher",
        True,
        None,
    )
    kl = [(teacher * (teacher.log() - logits[i].log_softmax(-1))).sum(-1).mean() for i in range(4)]
    assert joint.loss is not None
    assert joint.loss(logits, teacher).item() == pytest.approx(float(sum(kl)), rel=1e-6)
    (_, alternating) = objectives.build("joint-distill", 4, objectives.JointDistillOptions(alternate=True))
    assert alternating.alternate is not None
    assert alternating.alternate(logits, teacher).item() == pytest.approx(float(kl[-1]), rel=1e-6)
    with pytest.raises(ValueError, match="teacher must have shape"):
        losses.teacher_distillation(logits, teacher[:4])


def test_joint_distill_trains_encoder_and_every_exit() -> None:
    model = tiny_model(head="linear")
    stage = objectives.build("joint-distill", 4)[1]
    assert stage.trainable == "all"
    config = TrainConfig(lr=1e-2, head_lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model, stage, config))
    ids, mask = random_batch(batch=8)
    teacher = torch.full((8, 3), 1 / 3)
    assert stage.loss is not None
    stage.loss(model(ids, mask, equilibrium=True).logits, teacher).backward()
    optimizer.step()
    changed = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
    assert _changed(changed, "backbone.") and all(_changed(changed, f"exits.{i}.") for i in range(4))


def test_gradient_equilibrium_gives_each_layer_the_mean_of_its_exits_gradients() -> None:
    """With r exits from layer i on, layer i's weights get 1/r of the summed loss's gradient (the
    scales telescope: every exit above contributes 1/r), the embeddings 1/L; exits keep their own
    gradient; the forward values are the same."""
    model = tiny_model(head="linear")
    model.eval()  # no dropout: both passes see the same function
    ids, mask = random_batch(batch=6)
    labels = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3))
    grads, outputs = [], []
    for equilibrium in (False, True):
        model.zero_grad()
        logits = model(ids, mask, equilibrium=equilibrium).logits
        losses.relevancy(logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        outputs.append(logits.detach())
    assert torch.equal(outputs[0], outputs[1])
    summed, mean = grads
    for name, grad in summed.items():
        if ".layer." in name:
            i = int(name.split(".layer.")[1].split(".")[0])
            scale = 1 / (4 - i)
        elif "embeddings" in name:
            scale = 1 / 4
        else:
            scale = 1.0  # an exit's own weights, and a pooler no exit uses
        torch.testing.assert_close(mean[name], grad * scale, rtol=1e-5, atol=1e-7, msg=name)


def test_teacher_probabilities_are_computed_once_and_checked_when_read(tmp_path: Path) -> None:
    """What a distilling stage's targets are: the final exit's probabilities, dropout off; kept in the run
    folder; a file for other rows is refused with its name rather than trained on."""
    model = tiny_model(head="linear")
    model.train()  # the teacher is computed with dropout off whatever the mode
    ids = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 2]]
    data = Encoded(input_ids=ids, token_type_ids=None, labels=torch.tensor([0, 1, 2]))
    path = tmp_path / "teacher_distill-every-exit.safetensors"
    first = teacher_probs(model, data, TrainConfig(eval_batch_size=2), 0, path, write=True, progress=False)
    model.eval()
    with torch.no_grad():
        for row, tokens in enumerate(ids):
            alone = model(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long)).logits[-1, 0]
            torch.testing.assert_close(first[row], alone.softmax(-1), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a changed model does not change targets already kept
        next(model.parameters()).add_(1.0)
    again = teacher_probs(model, data, TrainConfig(), 0, path, write=True, progress=False)
    assert torch.equal(again, first)
    fewer = Encoded(input_ids=ids[:2], token_type_ids=None, labels=torch.tensor([0, 1]))
    with pytest.raises(LayerExitError, match=f"{path}: teacher probabilities for other training rows"):
        teacher_probs(model, fewer, TrainConfig(), 0, path, write=False, progress=False)
