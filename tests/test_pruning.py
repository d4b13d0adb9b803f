from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import build_tiny_unet
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from biasprune import pruning
from biasprune.pruning import (
    PRUNERS,
    count_params_macs,
    load_pruned,
    model_size_mb,
    prune_unet,
    save_pruned,
)

# Dense tiny model as counted by torch-pruning 1.6 (batch 1, 16x16).
_TINY_PARAMS = 280_755
_TINY_MACS = 16_414_896


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scheduler(timesteps: int = 8) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=timesteps)


def _images(count: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _prune(unet: UNet2DModel, pruner: str, ratio: float, seed: int = 0) -> UNet2DModel:
    size = unet.config.sample_size
    return prune_unet(unet, pruner, ratio, scheduler=_scheduler(),
                      calibration_images=_images(size=size), calibration_batch_size=2, seed=seed)


def _celebahq_like_unet() -> UNet2DModel:
    """The study's layout (attention in the 5th down and 2nd up block), 4x narrower."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        block_out_channels=(32, 32, 64, 64, 128, 128),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=16,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ).eval()


def _param_count(unet: nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())


def _assert_runs_forward_and_backward(unet: UNet2DModel) -> None:
    size = unet.config.sample_size
    sample = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    output = unet(sample, torch.tensor([3, 7])).sample
    assert output.shape == sample.shape
    output.square().mean().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    unet.zero_grad(set_to_none=True)


def _assert_norms_divisible(unet: UNet2DModel) -> None:
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0
            assert module.weight.shape == (module.num_channels,)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("pruner", PRUNERS)
def test_prune_unet_tiny_runs_and_shrinks(tiny_unet, pruner, ratio):
    pruned = _prune(tiny_unet, pruner, ratio)

    _assert_runs_forward_and_backward(pruned)
    _assert_norms_divisible(pruned)
    assert not pruned.training
    assert pruned.conv_in.in_channels == 3
    assert pruned.conv_out.out_channels == 3
    assert torch.equal(pruned.conv_out.bias, tiny_unet.conv_out.bias)
    # 16-channel layers with 8 norm groups can only drop 0 or 1 of each pair, hence the band.
    shrink = _param_count(pruned) / _param_count(tiny_unet)
    assert 0.85 * (1 - ratio) ** 2 <= shrink <= 1.1 * (1 - ratio) ** 2


@pytest.mark.parametrize(
    "pruner, ratio", [("diff-pruning", 0.25), ("taylor", 0.5), ("l1", 0.75), ("random", 0.5)]
)
def test_prune_unet_celebahq_layout_channels(pruner, ratio):
    dense = _celebahq_like_unet()
    pruned = _prune(dense, pruner, ratio)

    _assert_runs_forward_and_backward(pruned)
    dense_norms = dict(dense.named_modules())
    for name, module in pruned.named_modules():
        if isinstance(module, nn.GroupNorm):
            per_group = dense_norms[name].num_channels // module.num_groups
            assert module.num_channels == module.num_groups * int(per_group * (1 - ratio))
    assert _param_count(pruned) / _param_count(dense) == pytest.approx((1 - ratio) ** 2, rel=0.03)


@pytest.mark.parametrize(
    "options",
    [
        {"resnet_time_scale_shift": "scale_shift"},
        {"downsample_type": "resnet", "upsample_type": "resnet"},
        {"attn_norm_num_groups": 4, "add_attention": False},
        {"out_channels": 6},  # learned variance: noise and variance channels
        {"time_embedding_type": "fourier"},
    ],
)
def test_prune_unet_layout_variants(options, tmp_path):
    torch.manual_seed(0)
    dense = UNet2DModel(**{**build_tiny_unet().config, **options}).eval()
    pruned = _prune(dense, "taylor", 0.5)

    _assert_norms_divisible(pruned)
    assert pruned.conv_out.out_channels == dense.conv_out.out_channels
    assert _param_count(pruned) / _param_count(dense) == pytest.approx(0.25, rel=0.05)
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loaded = load_pruned(save_pruned(pruned, tmp_path))
    with torch.no_grad():
        expected = pruned(sample, torch.tensor([1, 5])).sample
        assert torch.equal(loaded(sample, torch.tensor([1, 5])).sample, expected)
    assert expected.shape[1] == dense.config.out_channels


def test_prune_unet_class_conditional_l1():
    torch.manual_seed(0)
    dense = UNet2DModel(**{**build_tiny_unet().config, "num_class_embeds": 4}).eval()
    pruned = prune_unet(dense, "l1", 0.5)
    labels = torch.tensor([0, 3])
    output = pruned(torch.randn(2, 3, 16, 16), torch.tensor([1, 5]), class_labels=labels)
    assert output.sample.shape == (2, 3, 16, 16)
    assert pruned.class_embedding.embedding_dim == pruned.time_embedding.linear_2.out_features
    with pytest.raises(ValueError, match="class-conditional"):
        _prune(dense, "taylor", 0.5)


def test_prune_unet_skip_blocks_invalid():
    dense = UNet2DModel(
        sample_size=16, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
    )
    with pytest.raises(ValueError, match="SkipDownBlock2D.*FIR"):
        prune_unet(dense, "l1", 0.5)


def _kept_rows(dense: nn.Linear, pruned: nn.Linear) -> torch.Tensor:
    """Find the original output indices kept in a pruned linear layer through its bias."""
    matches = (pruned.bias[:, None] == dense.bias[None, :]).nonzero()
    assert matches.shape[0] == pruned.out_features
    return matches[:, 1]


def _manual_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    tokens = attn.group_norm(x.view(batch, channels, -1)).transpose(1, 2)
    heads = attn.heads
    q, k, v = (layer(tokens).unflatten(-1, (heads, -1)).transpose(1, 2)
               for layer in (attn.to_q, attn.to_k, attn.to_v))
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    mixed = (weights @ v).transpose(1, 2).flatten(2)
    out = attn.to_out[0](mixed).transpose(1, 2).reshape(x.shape)
    return (out + x) / attn.rescale_output_factor


def test_prune_unet_attention_consistent(tiny_unet):
    pruned = prune_unet(tiny_unet, "l1", 0.5)
    dense_modules = dict(tiny_unet.named_modules())
    attentions = [(n, m) for n, m in pruned.named_modules() if isinstance(m, Attention)]
    assert len(attentions) == 4

    for name, attn in attentions:
        dense = dense_modules[name]
        assert attn.heads == dense.heads
        assert attn.query_dim == attn.to_q.in_features == attn.group_norm.num_channels
        assert attn.inner_dim == attn.to_q.out_features == attn.to_out[0].in_features
        assert attn.inner_kv_dim == attn.to_k.out_features == attn.to_v.out_features
        assert attn.out_dim == attn.to_out[0].out_features == attn.query_dim
        head_dim = attn.inner_dim // attn.heads
        assert head_dim == dense.inner_dim // dense.heads // 2
        assert attn.scale == pytest.approx(head_dim**-0.5)

        # q, k and v keep the same channels, and every head keeps the same number of them.
        kept_rows = _kept_rows(dense.to_q, attn.to_q)
        assert torch.equal(_kept_rows(dense.to_k, attn.to_k), kept_rows)
        assert torch.equal(_kept_rows(dense.to_v, attn.to_v), kept_rows)
        dense_head_dim = dense.inner_dim // dense.heads
        per_head = torch.bincount(kept_rows // dense_head_dim, minlength=dense.heads)
        assert per_head.tolist() == [head_dim] * attn.heads

        x = torch.randn(2, attn.query_dim, 4, 4, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert isinstance(attn.processor, AttnProcessor2_0)
            default = attn(x)
            attn.set_processor(AttnProcessor())
            classic = attn(x)
            attn.set_processor(AttnProcessor2_0())
            manual = _manual_attention(attn, x)
        torch.testing.assert_close(default, manual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(classic, manual, rtol=1e-5, atol=1e-5)


def test_prune_unet_leaves_input_untouched(tiny_unet):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    attn = next(m for m in tiny_unet.modules() if isinstance(m, Attention))
    attributes = (attn.inner_dim, attn.query_dim, attn.scale)

    _prune(tiny_unet, "taylor", 0.5)

    after = tiny_unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (attn.inner_dim, attn.query_dim, attn.scale) == attributes
    assert all(p.grad is None for p in tiny_unet.parameters())


@pytest.mark.parametrize("pruner", ["random", "taylor"])
def test_prune_unet_same_seed_same_model(tiny_unet, pruner):
    first = _prune(tiny_unet, pruner, 0.5, seed=3).state_dict()
    second = _prune(tiny_unet, pruner, 0.5, seed=3).state_dict()
    other = _prune(tiny_unet, pruner, 0.5, seed=4).state_dict()

    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


class _ScaledInput(nn.Module):
    """Predicts the noise as w * x_t: its loss falls as t grows and x_t nears pure noise."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, sample, timestep):
        return SimpleNamespace(sample=self.weight * sample)


@pytest.mark.parametrize("thr", [0.5, 0.0])
def test_diff_pruning_gradients_stop_below_threshold(thr):
    scheduler = DDPMScheduler(num_train_timesteps=100)
    images = _images(count=5, size=4)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    expected_losses, expected_grad = [], 0.0
    for t in range(100):
        noisy = scheduler.add_noise(images, noise, torch.full((5,), t))
        expected_losses.append(((noisy - noise) ** 2).mean().item())
        expected_grad += (2 * (noisy - noise) * noisy).mean().item()
        if expected_losses[-1] < thr * max(expected_losses):
            break
    model = _ScaledInput()

    losses = pruning._accumulate_diff_pruning_gradients(
        model, scheduler, images, thr, batch_size=2, generator=torch.Generator().manual_seed(7))

    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert model.weight.grad.item() == pytest.approx(expected_grad, rel=1e-4)
    if thr > 0:
        assert 1 < len(losses) < 100
        assert losses[-1] < thr * max(losses)
        assert all(loss >= thr * max(losses[: i + 1]) for i, loss in enumerate(losses[:-1]))
    else:
        assert len(losses) == 100


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_prediction_type(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type=prediction_type)
    clean, noise, timesteps = _images(2, 4, seed=1), _images(2, 4, seed=2), torch.tensor([2, 9])
    expected = {
        "epsilon": noise,
        "v_prediction": scheduler.get_velocity(clean, noise, timesteps),
        "sample": clean,
    }[prediction_type]
    assert torch.equal(pruning._training_target(scheduler, clean, noise, timesteps), expected)


def test_count_params_macs_tiny_pinned(tiny_unet):
    params, macs = count_params_macs(tiny_unet)
    assert params == _param_count(tiny_unet) == _TINY_PARAMS
    assert macs == pytest.approx(_TINY_MACS, rel=1e-3)

    pruned = prune_unet(tiny_unet, "l1", 0.5)
    pruned_params, pruned_macs = count_params_macs(pruned)
    assert pruned_params == _param_count(pruned)
    assert 0.2 < pruned_macs / macs < 0.3


def test_save_load_roundtrip_fresh_process(tiny_unet, tmp_path):
    pruned = prune_unet(tiny_unet, "l1", 0.5)
    directory = save_pruned(pruned, tmp_path / "model", metadata={"pruner": "l1"})
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = pruned(sample, torch.tensor([10, 500])).sample
    safetensors.torch.save_file({"sample": sample}, str(tmp_path / "input.safetensors"))

    script = textwrap.dedent(f"""
        import safetensors.torch, torch
        from biasprune.pruning import load_pruned
        unet = load_pruned({str(directory)!r})
        sample = safetensors.torch.load_file({str(tmp_path / "input.safetensors")!r})["sample"]
        with torch.no_grad():
            output = unet(sample, torch.tensor([10, 500])).sample
        safetensors.torch.save_file({{"output": output}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr

    output = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["output"]
    assert torch.equal(output, expected)
    weights = directory / pruning.WEIGHTS_NAME
    assert model_size_mb(directory) == os.path.getsize(weights) / 2**20
    assert model_size_mb(weights) == model_size_mb(directory)
    stored = json.loads((directory / pruning.CONFIG_NAME).read_text())
    assert stored["metadata"] == {"pruner": "l1"}
    assert stored["config"]["block_out_channels"] == [16, 32, 32]


def test_load_pruned_restores_attributes(tiny_unet, tmp_path):
    pruned = prune_unet(tiny_unet, "random", 0.5)
    loaded = load_pruned(save_pruned(pruned, tmp_path))

    assert not loaded.training
    for (name, a), (_, b) in zip(pruned.named_modules(), loaded.named_modules()):
        if not name:
            continue  # the UNet itself: its config keeps the dense layout
        for attribute in ("inner_dim", "query_dim", "out_dim", "scale", "heads", "channels",
                          "out_channels", "in_channels", "num_channels"):
            assert getattr(a, attribute, None) == getattr(b, attribute, None), (name, attribute)
    _assert_runs_forward_and_backward(loaded)


def test_load_pruned_missing_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pruned"):
        load_pruned(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent"):
        model_size_mb(tmp_path / "absent")


def test_save_pruned_metadata_invalid(tiny_unet, tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        save_pruned(tiny_unet, tmp_path, metadata={"when": object()})
    assert not (tmp_path / pruning.WEIGHTS_NAME).exists()


@pytest.mark.parametrize(
    "pruner, ratio, kwargs, message",
    [
        ("magnitude", 0.5, {}, "invalid pruner='magnitude'.*diff-pruning, taylor, l1, random"),
        ("l1", 0.0, {}, r"pruning_ratio=0.0 is outside \(0, 1\)"),
        ("l1", 1.0, {}, r"pruning_ratio=1.0 is outside \(0, 1\)"),
        ("l1", -0.1, {}, r"pruning_ratio=-0.1 is outside \(0, 1\)"),
        ("l1", "0.5", {}, "pruning_ratio='0.5' must be a number"),
        ("l1", 0.75, {}, "GroupNorm.*pruning_ratio <= 0.5"),
        ("taylor", 0.5, {"scheduler": _scheduler()}, "needs calibration_images"),
        ("diff-pruning", 0.5, {"calibration_images": _images()}, "needs the model's noise scheduler"),
        ("taylor", 0.5, {"scheduler": _scheduler(), "calibration_images": _images() * 127 + 128},
         r"expected \[-1, 1\]"),
        ("taylor", 0.5, {"scheduler": _scheduler(), "calibration_images": _images()[:, :1]},
         r"\(N, 3, H, W\)"),
        ("diff-pruning", 0.5, {"scheduler": _scheduler(), "calibration_images": _images(),
                               "thr": 1.5}, r"thr=1.5 is outside \[0, 1\)"),
    ],
)
def test_prune_unet_invalid(tiny_unet, monkeypatch, pruner, ratio, kwargs, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(pruning, "_build_pruner", no_work)
    monkeypatch.setattr(pruning, "count_params_macs", no_work)
    with pytest.raises(ValueError, match=message):
        prune_unet(tiny_unet, pruner, ratio, **kwargs)

