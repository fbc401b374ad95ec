import pytest
import torch

from feddiffuse.shared.diffusion import DiffusionSchedule
from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import build_unet
from feddiffuse.shared.training import TrainConfig, select_device, train_local


def images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_is_reproducible_and_changes_weights():
    sched = DiffusionSchedule.linear()
    cfg = TrainConfig(epochs=2, batch_size=16)
    a, b = build_unet("tiny", seed=0), build_unet("tiny", seed=0)
    start = params(a)
    ra = train_local(a, images(), sched, cfg, seed=3)
    rb = train_local(b, images(), sched, cfg, seed=3)
    assert [e.steps for e in ra.epochs] == [3, 3] and ra.images == 96
    assert ra.mean_loss == rb.mean_loss
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], start[n]) for n in pa)


def test_resuming_from_an_epoch_gives_the_same_weights_as_not_stopping():
    sched = DiffusionSchedule.linear()
    full = build_unet("tiny", seed=0)
    train_local(full, images(), sched, TrainConfig(epochs=2, batch_size=16), seed=5)
    # Stop after epoch 1, then resume at epoch 2 (fresh optimiser, as the client does).
    part = build_unet("tiny", seed=0)
    train_local(part, images(), sched, TrainConfig(epochs=1, batch_size=16), seed=5)
    ref = build_unet("tiny", seed=0)
    train_local(ref, images(), sched, TrainConfig(epochs=1, batch_size=16), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(part.parameters(), ref.parameters(),
                                                 strict=True))
    res = train_local(part, images(), sched, TrainConfig(epochs=2, batch_size=16), seed=5,
                      start_epoch=1)
    assert [e.epoch for e in res.epochs] == [2]


def test_resuming_with_the_optimizer_state_is_bit_identical():
    from feddiffuse.shared.wire import decode_tensors, encode_tensors

    sched = DiffusionSchedule.linear()
    cfg = TrainConfig(epochs=2, batch_size=16)
    full = build_unet("tiny", seed=0)
    train_local(full, images(), sched, cfg, seed=5)
    saved = {}

    def keep(report, model):
        if report.epoch == 1:  # what a checkpoint holds, through the safetensors codec
            saved["model"] = decode_tensors(encode_tensors(params(model), {}))[0]
            saved["optim"] = decode_tensors(encode_tensors(report.optimizer_state(), {}))[0]

    first = build_unet("tiny", seed=0)
    train_local(first, images(), sched, cfg, seed=5, on_epoch=keep,
                should_stop=lambda: "model" in saved)
    resumed = build_unet("tiny", seed=1)
    resumed.load_state_dict(saved["model"])
    train_local(resumed, images(), sched, cfg, seed=5, start_epoch=1,
                optimizer_state=saved["optim"])
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_should_stop_interrupts_between_steps():
    calls = []
    res = train_local(build_unet("tiny", seed=0), images(), DiffusionSchedule.linear(),
                      TrainConfig(epochs=3, batch_size=8), seed=0,
                      on_step=lambda s, n, loss: calls.append(s),
                      should_stop=lambda: len(calls) >= 2)
    assert res.stopped and calls == [1, 2]


def test_loss_decreases_on_a_learnable_problem():
    torch.manual_seed(0)
    data = torch.full((64, 1, 28, 28), 200, dtype=torch.uint8)
    model = build_unet("tiny", seed=0)
    res = train_local(model, data, DiffusionSchedule.linear(),
                      TrainConfig(epochs=6, batch_size=32, lr=1e-3), seed=0)
    assert res.epochs[-1].mean_loss < 0.8 * res.epochs[0].mean_loss


@pytest.mark.parametrize("flags", [{"channels_last": True}, {"bf16": True}])
def test_speed_options_run(flags):
    res = train_local(build_unet("tiny", seed=0), images(16), DiffusionSchedule.linear(),
                      TrainConfig(epochs=1, batch_size=8, **flags), seed=0)
    assert res.images == 16 and res.mean_loss == res.mean_loss


def test_device_selection():
    device, reason = select_device("cpu")
    assert device.type == "cpu" and "asked" in reason
    auto, why = select_device("auto")
    assert auto.type in {"cpu", "cuda", "mps"} and why
    with pytest.raises(UserError, match="Unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            select_device("cuda")


def test_bad_config_and_empty_data_are_user_errors():
    m, s = build_unet("tiny"), DiffusionSchedule.linear()
    with pytest.raises(UserError):
        train_local(m, images(), s, TrainConfig(epochs=0), seed=0)
    with pytest.raises(UserError, match="no images"):
        train_local(m, images()[:0], s, TrainConfig(), seed=0)


def test_a_stopped_run_hands_the_model_back_in_the_default_layout():
    model = build_unet("tiny", seed=0)
    train_local(model, images(16), DiffusionSchedule.linear(),
                TrainConfig(epochs=1, batch_size=8, channels_last=True), seed=0,
                should_stop=lambda: True)
    assert all(p.is_contiguous() for p in model.parameters())
