import math

import pytest
import torch
from torch import nn

from trainable.config import ConfigError, ScheduleConfig, TrainConfig
from trainable.config_io import validate_config
from trainable.optim import LARS, build_optimizer, build_scheduler, lr_factor


def _cfg(**sections) -> TrainConfig:
    base = {"batch": {"global_batch": 64, "micro_batch": 16}, "distributed": {"num_workers": 2}}
    base.update(sections)
    return TrainConfig.model_validate(base)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_lr_factor_cosine_points():
    s = ScheduleConfig(name="cosine", warmup_start_factor=0.1, min_lr_factor=0.05)
    total, warm = 110, 10
    assert lr_factor(0, total, warm, s, 10) == pytest.approx(0.1)
    assert lr_factor(5, total, warm, s, 10) == pytest.approx(0.55)
    assert lr_factor(warm, total, warm, s, 10) == pytest.approx(1.0)
    assert lr_factor(60, total, warm, s, 10) == pytest.approx((1 + 0.05) / 2)
    assert lr_factor(total, total, warm, s, 10) == pytest.approx(0.05)
    values = [lr_factor(u, total, warm, s, 10) for u in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_factor_no_warmup_and_step():
    s = ScheduleConfig(name="cosine", warmup_epochs=0, min_lr_factor=0.0)
    assert lr_factor(0, 100, 0, s, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0, s, 10) == pytest.approx(0.0)
    st = ScheduleConfig(name="step", step_milestones=[3, 6], step_gamma=0.1, warmup_start_factor=0.5)
    upe = 4
    assert lr_factor(0, 40, 2, st, upe) == pytest.approx(0.5)
    assert lr_factor(1, 40, 2, st, upe) == pytest.approx(0.75)
    assert lr_factor(2, 40, 2, st, upe) == pytest.approx(1.0)
    assert lr_factor(11, 40, 2, st, upe) == pytest.approx(1.0)
    assert lr_factor(12, 40, 2, st, upe) == pytest.approx(0.1)
    assert lr_factor(23, 40, 2, st, upe) == pytest.approx(0.1)
    assert lr_factor(24, 40, 2, st, upe) == pytest.approx(0.01)


def test_scheduler_matches_lr_factor_and_round_trips():
    cfg = _cfg(run={"epochs": 4}, schedule={"warmup_epochs": 1.5, "min_lr_factor": 0.01})
    upe = 6
    model = Tiny()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, upe)
    total, warm = 24, 9
    lrs = []
    for u in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(cfg.lr * lr_factor(u, total, warm, cfg.schedule, upe))
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(cfg.lr * 0.1)
    assert lrs[warm] == pytest.approx(cfg.lr)

    # Resume after 10 updates: build, then load optimizer state, then scheduler state.
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg, upe)
    for _ in range(10):
        opt2.step()
        sched2.step()
    opt_state, sched_state = opt2.state_dict(), sched2.state_dict()
    opt3 = build_optimizer(model, cfg)
    sched3 = build_scheduler(opt3, cfg, upe)
    opt3.load_state_dict(opt_state)
    sched3.load_state_dict(sched_state)
    resumed = []
    for _ in range(10, total):
        resumed.append(opt3.param_groups[0]["lr"])
        opt3.step()
        sched3.step()
    assert resumed == pytest.approx(lrs[10:])
    # Only plain data in the state dict (loads with weights_only=True).
    import io

    buf = io.BytesIO()
    torch.save(sched_state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_build_optimizer_groups_and_lr():
    cfg = _cfg(optimizer={"base_lr": 0.2, "weight_decay": 1e-4, "no_bias_decay": True})
    model = Tiny()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert cfg.lr == pytest.approx(0.2 * 64 / 256)
    assert all(g["lr"] == pytest.approx(0.05) for g in opt.param_groups)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.bn.weight), id(model.bn.bias), id(model.fc.bias)}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0

    opt = build_optimizer(model, _cfg(optimizer={"weight_decay": 1e-4, "no_bias_decay": False}))
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == 5

    lars = build_optimizer(model, _cfg(optimizer={"name": "lars", "lars_trust": 0.02, "nesterov": True}))
    assert isinstance(lars, LARS)
    assert [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    assert lars.param_groups[0]["trust"] == 0.02 and lars.param_groups[0]["nesterov"]

    with pytest.raises(ConfigError, match="optimizer.nesterov: requires optimizer.momentum > 0"):
        validate_config({"optimizer": {"momentum": 0.0, "nesterov": True}})


def test_lars_trust_ratio_hand_computed():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, 1.0]))
    lr, trust, wd, mom = 0.5, 0.1, 0.2, 0.9
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=lr, momentum=mom, weight_decay=wd, trust=trust,
    )
    w.grad = torch.tensor([0.0, 2.0])  # ||g|| = 2
    b.grad = torch.tensor([1.0, -1.0])
    opt.step()
    local = trust * 5 / (2 + wd * 5)  # = 0.5 / 3
    d1 = (torch.tensor([0.0, 2.0]) + wd * torch.tensor([3.0, 4.0])) * local
    w1 = torch.tensor([3.0, 4.0]) - lr * d1
    assert torch.allclose(w.data, w1, atol=1e-7)
    assert torch.allclose(b.data, torch.tensor([0.5, 1.5]), atol=1e-7)  # plain SGD

    # Second step: momentum buffer = mom * d1 + d2.
    w.grad = torch.tensor([1.0, 0.0])
    opt.step()
    nw = torch.linalg.vector_norm(w1)
    local2 = trust * nw / (1.0 + wd * nw)
    d2 = (torch.tensor([1.0, 0.0]) + wd * w1) * local2
    assert torch.allclose(w.data, w1 - lr * (mom * d1 + d2), atol=1e-6)

    # Zero weight norm: ratio 1.
    z = nn.Parameter(torch.zeros(2))
    opt = LARS([z], lr=1.0, momentum=0.0, trust=0.1)
    z.grad = torch.tensor([1.0, 2.0])
    opt.step()
    assert torch.allclose(z.data, torch.tensor([-1.0, -2.0]))
    assert math.isfinite(z.sum().item())


# optimizer.clip_grad_norm as a searched trick -----------------------------------------------------------
def test_clip_grad_norm_is_optional_positive_and_searchable_with_null():
    import optuna

    from search.experiment.sampling import define_by_run, sampled_values
    from spaces import QUICKSTART, load_space

    assert TrainConfig().optimizer.clip_grad_norm is None
    assert validate_config({"optimizer": {"clip_grad_norm": 1.0}}).optimizer.clip_grad_norm == 1.0
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match="optimizer.clip_grad_norm"):
            validate_config({"optimizer": {"clip_grad_norm": bad}})

    space = load_space(QUICKSTART, ["search.optimizer.clip_grad_norm={choice: [null, 1.0]}"])
    assert space.search["optimizer.clip_grad_norm"].values == [None, 1.0]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(define_by_run(space), n_trials=12)
    drawn = {t.params["optimizer.clip_grad_norm"] for t in study.trials}
    assert drawn == {None, 1.0}  # both reach Optuna and come back as drawn
    for t in study.trials:
        cfg = space.config_for(sampled_values(t.params))
        assert cfg.optimizer.clip_grad_norm == t.params["optimizer.clip_grad_norm"]
    with pytest.raises(ConfigError, match="optimizer.clip_grad_norm"):
        load_space(QUICKSTART, ["search.optimizer.clip_grad_norm={choice: [null, 0.0]}"])


def test_cosine_with_restarts_is_at_its_floor_at_every_rung_and_rewarms_after():
    s = ScheduleConfig(name="cosine", warmup_epochs=0.5, warmup_start_factor=0.1, min_lr_factor=0.02, restarts=[2, 4])
    upe, total, warm = 10, 60, 5
    f = [lr_factor(u, total, warm, s, upe) for u in range(total + 1)]
    for boundary in (20, 40, 60):  # the LR reported at the end of epochs 2, 4 and 6
        assert f[boundary] == pytest.approx(0.02)
        assert f[boundary - 1] > f[boundary]  # annealing into the floor
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(1.0)  # the first warmup as usual
    for boundary in (20, 40):  # promoted: re-warm linearly from the floor to the peak
        rewarm = f[boundary: boundary + warm + 1]
        assert all(a < b for a, b in zip(rewarm, rewarm[1:])) and rewarm[-1] == pytest.approx(1.0)
    # without restarts the same run anneals once
    plain = ScheduleConfig(name="cosine", warmup_epochs=0.5, warmup_start_factor=0.1, min_lr_factor=0.02)
    assert lr_factor(20, total, warm, plain, upe) > 0.5


def test_restarts_are_checked_against_the_run():
    with pytest.raises(ValueError, match="restarts: 6 must be below run.epochs"):
        TrainConfig.model_validate({"schedule": {"restarts": [2, 6]}, "run": {"epochs": 6}})
    with pytest.raises(ValueError, match="increasing"):
        ScheduleConfig(restarts=[3, 2])
    with pytest.raises(ValueError, match="only with schedule.name cosine"):
        TrainConfig.model_validate({"schedule": {"name": "step", "restarts": [2]}, "run": {"epochs": 6}})
