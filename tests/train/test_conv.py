"""The CIFAR-10 modular conv network (modrt/train/conv.py): routing computes exactly the
selected blocks on their rows; M = K = 1 is a plain conv network."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modrt.train import model as lm
from modrt.train import routing
from modrt.train.config import ImageModelConfig
from modrt.train.conv import ModularConv, ModularConvNet, conv_block, max_pool


def _randomise_norms(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (eval mode then uses them)."""
    g = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_one_module_one_slot_is_a_plain_conv_network():
    torch.manual_seed(0)
    cfg = ImageModelConfig(channels=(4, 6), modules=1, k=1, method="dense")
    net = ModularConvNet(cfg).eval()
    _randomise_norms(net)
    plain = nn.Sequential(conv_block(3, 4), nn.MaxPool2d(2), conv_block(4, 6), nn.MaxPool2d(2)).eval()
    plain[0].load_state_dict(net.layers[0].blocks[0].state_dict())
    plain[2].load_state_dict(net.layers[1].blocks[0].state_dict())
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = net(x, lm.greedy_policy())
        want = net.head(plain(x).mean(dim=(2, 3)))
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-6)
    assert out.log_probs is None and out.a.shape == (2, 5, 1) and (out.a == 0).all()
    assert (out.log_pa == 0).all()


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_routed_layer_computes_the_selected_blocks_row_by_row(combine):
    torch.manual_seed(1)
    layer = ModularConv(3, 5, modules=4, k=2, combine=combine).eval()
    _randomise_norms(layer)
    x = torch.randn(6, 3, 8, 8)
    cases = [torch.tensor([[0, 1], [1, 1], [3, 0], [2, 2], [0, 3], [1, 0]]),  # a repeated module counts once
             torch.full((6, 2), 2)]  # one module gets every row, the others none
    for a in cases:
        with torch.no_grad():
            y = layer(x, a)
            for b in range(6):
                mods = sorted(set(a[b].tolist()))
                want = sum(layer.blocks[m](x[b:b + 1]) for m in mods)
                if combine == "mean":
                    want = want / len(mods)
                torch.testing.assert_close(y[b:b + 1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (1, 1, 2, 2)])
def test_max_pool_without_autograd_is_max_pool2d(shape):
    x = torch.randn(*shape)
    x[0, 0, 0, :2] = 1.0  # a tie
    with torch.no_grad():
        got = max_pool(x)
    assert torch.equal(got, F.max_pool2d(x, 2))
    assert torch.equal(max_pool(x.requires_grad_()), F.max_pool2d(x, 2))


def _plain_layer(layer: ModularConv, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The layer as it reads: every selected block on its rows, combined, then pooled."""
    d = routing.dispatch(a, layer.modules_)
    parts = [layer.blocks[m](x[d.rows[d.offsets[m]:d.offsets[m + 1]]])
             for m in range(layer.modules_) if d.offsets[m + 1] > d.offsets[m]]
    out = x.new_zeros(x.shape[0], *parts[0].shape[1:]).index_add_(0, d.rows, torch.cat(parts))
    if layer.combine == "mean":
        out = out / d.distinct.view(-1, 1, 1, 1)
    return F.max_pool2d(out, 2)


@pytest.mark.parametrize("a", [[[2], [0], [2], [1], [0]],  # K = 1: pooled before the combine
                               [[1], [1], [1], [1], [1]],  # one module on every row: no combine
                               [[0, 2], [1, 1], [3, 0], [2, 2], [0, 3]]])  # K = 2: combined, then pooled
def test_pooled_layer_gives_the_plain_layers_numbers_and_gradients(a):
    torch.manual_seed(4)
    a = torch.tensor(a)
    layer = ModularConv(3, 5, modules=4, k=a.shape[1], combine="mean")
    x = torch.randn(5, 3, 8, 8)
    grads = []
    for f in (lambda: layer(x, a, pool=True), lambda: _plain_layer(layer, x, a)):
        layer.zero_grad()
        y = f()
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), [p.grad.clone() for p in layer.parameters() if p.grad is not None]))
        with torch.no_grad():
            assert torch.equal(f(), y.detach())  # the E-step's path (no autograd) too
    (y1, g1), (y2, g2) = grads
    assert y1.shape == (5, 5, 4, 4) and torch.equal(y1, y2)
    assert len(g1) == len(g2) and all(torch.equal(u, v) for u, v in zip(g1, g2, strict=True))


def test_e_step_copies_share_their_work_and_give_the_repeated_batchs_numbers():
    """run_examples(repeat=S) in eval mode computes each distinct (image, path) once; it
    gives what the S copies of the batch give row by row, with the same draws."""
    torch.manual_seed(5)
    net = ModularConvNet(ImageModelConfig(channels=(4, 6, 8), modules=3, k=2, controller_pool=2)).eval()
    _randomise_norms(net)
    x, S = torch.randn(5, 3, 32, 32), 4
    keep = torch.randint(0, 3, (3, 5, 2))  # the stored a*: copy 0 follows it
    keys = torch.arange(S * 5) * 7919

    def policy():
        return lm.sample_policy(keep=keep, keys=keys)

    with torch.no_grad():
        got = net.run_examples(x, policy=policy(), repeat=S)
        want = net(x.repeat(S, 1, 1, 1), policy())
    assert torch.equal(got.a, want.a) and torch.equal(got.a[:, :5], keep)
    for g, w in ((got.logits, want.logits), (got.log_pa, want.log_pa), (got.log_probs, want.log_probs)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    net.train()  # batch norm on batch statistics: rows are not independent, nothing shared
    with torch.no_grad():
        torch.testing.assert_close(net.run_examples(x, policy=policy(), repeat=S).logits,
                                   net(x.repeat(S, 1, 1, 1), policy()).logits)


def test_policies_and_log_probabilities():
    torch.manual_seed(2)
    net = ModularConvNet(ImageModelConfig.demo()).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        drawn = net(x, lm.sample_policy(generator=torch.Generator().manual_seed(0)))
        again = net(x, lm.given(drawn.a))  # the M-step's replay of a stored a*
        greedy = net(x, lm.greedy_policy())
    assert drawn.a.shape == (4, 4, 1) and drawn.log_probs.shape == (4, 4, 1, 5)
    torch.testing.assert_close(again.logits, drawn.logits)
    torch.testing.assert_close(drawn.log_pa, drawn.log_probs.gather(-1, drawn.a[..., None]).squeeze(-1).sum(-1))
    assert torch.equal(greedy.a, greedy.log_probs.argmax(-1))
    # the controller sees the globally pooled input: a layer's scores ignore where a pattern sits
    layer = net.layers[0]
    shifted = torch.roll(x, shifts=(3, 5), dims=(2, 3))
    torch.testing.assert_close(layer.scores(x), layer.scores(shifted), rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_selected_modules():
    torch.manual_seed(3)
    net = ModularConvNet(ImageModelConfig(channels=(4,), modules=3, k=1))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    a = torch.tensor([[[0], [0], [2], [0]]])  # module 1 unused
    out = net(x, lm.given(a))
    (-net.log_likelihood(out.logits, y).mean() - out.log_pa.mean()).backward()
    blocks = net.layers[0].blocks
    assert all(p.grad is None for p in blocks[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[0].parameters())
    assert net.layers[0].controller.weight.grad.abs().sum() > 0


def test_pixels_are_normalised_by_the_config():
    cfg = ImageModelConfig.demo()
    net = ModularConvNet(cfg)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = net.normalise(pixels)
    want = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) \
        / torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, want)
    assert F.max_pool2d(x, 2).shape == (2, 3, 16, 16)


def test_sizes():
    """--size default, demo and mid (train cifar10 and reproduce cifar10 share them)."""
    wide, demo, mid = ImageModelConfig(), ImageModelConfig.demo(), ImageModelConfig.mid()
    assert (wide.channels, wide.modules, wide.k) == ((64, 64, 128, 128), 8, 1)
    assert (demo.channels, demo.modules, demo.k) == ((8, 8, 8, 8), 5, 1)
    assert (mid.channels, mid.modules, mid.k) == ((16, 16, 32, 32), 8, 1)
    assert ImageModelConfig.mid(method="dense", modules=1).channels == (16, 16, 32, 32)


@pytest.mark.parametrize("kw, match", [({"channels": (8,) * 6}, "halve a 32-pixel image"),
                                       ({"channels": (8, 0)}, "positive filter counts"),
                                       ({"k": 9}, "cannot exceed"),
                                       ({"method": "dense"}, "modules \\(8\\) must equal k"),
                                       ({"combine": "gate"}, "noisy top-k.s rule"),
                                       ({"method": "hash"}, "an image has none"),
                                       ({"combine": "max"}, "choose one of sum, mean, gate"),
                                       ({"std": (0.2, 0.2, 0.0)}, "std positive")])
def test_config_refuses_what_cannot_be_built(kw, match):
    with pytest.raises(ValueError, match=match):
        ImageModelConfig(**kw)


def test_controller_pool_reads_a_grid_of_the_input():
    torch.manual_seed(3)
    net = ModularConvNet(ImageModelConfig.demo(controller_pool=2)).eval()
    layer = net.layers[0]
    assert layer.controller.in_features == 3 * 2 * 2
    x = torch.randn(4, 3, 32, 32)
    quads = [x[:, :, i:i + 16, j:j + 16].mean(dim=(2, 3)) for i in (0, 16) for j in (0, 16)]
    want = torch.stack(quads, -1).flatten(1)  # (B, C, 4) channel-major, as avg_pool2d's flatten
    torch.testing.assert_close(layer.pooled(x), want, rtol=1e-5, atol=1e-6)
    # unlike the global pool, the grid tells where a pattern sits
    moved = torch.roll(x, shifts=(16, 0), dims=(2, 3))
    assert not torch.allclose(layer.scores(x), layer.scores(moved), atol=1e-4)
    with torch.no_grad():
        out = net(x, lm.greedy_policy())
    assert out.log_probs.shape == (4, 4, 1, 5)


@pytest.mark.parametrize("pool", [0, 3, 8])
def test_controller_pool_must_divide_every_layers_input(pool):
    with pytest.raises(ValueError, match="controller_pool"):
        ImageModelConfig.demo(controller_pool=pool)
