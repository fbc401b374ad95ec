import pytest
import torch

from feddiffuse.shared.errors import UserError
from feddiffuse.shared.model import (
    PRESETS,
    SEGMENTS,
    build_unet,
    count_parameters,
    get_preset,
    segment_map,
    segment_names,
    segment_of,
)


@pytest.mark.parametrize(
    ("preset", "total", "encoder", "bottleneck", "decoder"),
    [
        ("paper-fmnist", 2_996_315, 1_280_642, 999_376, 716_297),
        ("paper-celeba", 14_892_477, 6_339_770, 5_012_224, 3_540_483),
    ],
)
def test_paper_presets_match_the_paper_exactly(preset, total, encoder, bottleneck, decoder):
    counts = count_parameters(build_unet(preset))
    assert counts["total_params"] == total
    assert counts["segments"] == {"encoder": encoder, "bottleneck": bottleneck,
                                  "decoder": decoder}


def test_tiny_preset_is_cpu_sized():
    counts = count_parameters(build_unet("tiny"))
    assert 500_000 < counts["total_params"] < 1_500_000


@pytest.mark.parametrize("preset", list(PRESETS))
def test_segment_map_covers_every_parameter_exactly_once(preset):
    model = build_unet(preset)
    seg = segment_map(model)
    names = [n for n, _ in model.named_parameters()]
    assert list(seg) == names
    assert set(seg.values()) == set(SEGMENTS)
    union = []
    for s in SEGMENTS:
        union += segment_names(model, [s])
    assert sorted(union) == sorted(names)
    assert len(union) == len(set(union))


def test_segments_follow_the_paper_definition():
    assert segment_of("init_conv.weight") == "encoder"
    assert segment_of("time_mlp.1.weight") == "encoder"
    assert segment_of("downs.2.0.ds_conv.weight") == "encoder"
    assert segment_of("mid_attn.fn.fn.to_qkv.weight") == "bottleneck"
    assert segment_of("mid_block2.net.1.bias") == "bottleneck"
    assert segment_of("ups.0.3.weight") == "decoder"
    assert segment_of("final_conv.1.weight") == "decoder"
    with pytest.raises(KeyError):
        segment_of("schedule.betas")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_model_has_no_buffers_so_nothing_but_parameters_travels(preset):
    model = build_unet(preset)
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("preset", ["paper-fmnist", "tiny"])
def test_forward_keeps_the_image_shape(preset):
    model = build_unet(preset, seed=0)
    cfg = model.config
    x = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_seeded_builds_are_identical_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_unet("tiny", seed=5).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = build_unet("tiny", seed=5).state_dict()
    c = build_unet("tiny", seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_time_conditioning_changes_the_output():
    model = build_unet("tiny", seed=0)
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([900])))


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="Unknown preset 'huge'"):
        get_preset("huge")
