"""The zoo's blocks that timm does not have — cam, danet, scse, bam, simam — against transcriptions of
their reference code (seed 004, the authors' repositories), given the same weights, plus their
parameter and MAC formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnsurgeon import AttnSurgeonError, insert
from attnsurgeon.blocks import build_block
from attnsurgeon.profiling.flops import count_macs

from formulas import n_params


def randomise(m: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for b in m.buffers():
            if b.dtype.is_floating_point:
                b.copy_(torch.rand_like(b) + 0.5)
    return m.eval()


class SeedChannelAttention(nn.Module):  # seed 004, "ENCAM中的实现", as written there
    def __init__(self, in_planes):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(in_planes, in_planes // 8, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Conv2d(in_planes // 8, in_planes, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = self.fc2(self.relu1(self.fc1(self.avg_pool(x))))
        max_out = self.fc2(self.relu1(self.fc1(self.max_pool(x))))
        return self.sigmoid(avg_out + max_out)


def test_cam_is_the_seeds_encam_gate():
    ours = randomise(build_block("cam", 64, size=(9, 7)))
    seed = SeedChannelAttention(64).eval()
    seed.fc1.weight.data, seed.fc2.weight.data = ours.fc1.weight.data, ours.fc2.weight.data
    x = torch.randn(2, 64, 9, 7)
    torch.testing.assert_close(ours(x), x * seed(x))
    assert n_params(ours) == 2 * 64 * 8


def seed_danet_cam(x, gamma):  # seed 004's CAM (DANet, mmseg) forward, the print()s left out
    batch_size, channels, height, width = x.size()
    proj_query = x.view(batch_size, channels, -1)
    proj_key = x.view(batch_size, channels, -1).permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = F.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, x.view(batch_size, channels, -1)).view(batch_size, channels, height, width)
    return gamma * out + x


def test_danet_is_the_seeds_channel_attention_module_and_its_gamma_starts_at_zero():
    m = build_block("danet", 32, size=(6, 5))
    assert n_params(m) == 1 and m.gamma.item() == 0.0
    x = torch.randn(2, 32, 6, 5)
    assert torch.equal(m(x), x)
    m(x).square().sum().backward()
    assert m.gamma.grad.abs().item() > 0  # γ learns from the first step
    with torch.no_grad():
        m.gamma.fill_(0.7)
    torch.testing.assert_close(m(x), seed_danet_cam(x, 0.7))
    c, n = 32, 30
    counted = count_macs(m, x[:1])
    # two C×C×N matmuls; amax, subtract, softmax over C×C; γ·out and + x over C×N
    assert counted.uncounted == {} and counted.macs == 2 * c * c * n + 3 * c * c + 2 * c * n


class AimedChannelSpatialSE(nn.Module):
    """ai-med/squeeze_and_excitation (the scSE authors' code): ChannelSELayer, SpatialSELayer,
    ChannelSpatialSELayer = max(cSE(x), sSE(x))."""

    def __init__(self, c, reduction_ratio=2):
        super().__init__()
        r = c // reduction_ratio
        self.fc1, self.fc2 = nn.Linear(c, r, bias=True), nn.Linear(r, c, bias=True)
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x, fusion="max"):
        b, c, h, w = x.size()
        squeeze = x.view(b, c, -1).mean(dim=2)
        fc_out_2 = torch.sigmoid(self.fc2(F.relu(self.fc1(squeeze))))
        cse = torch.mul(x, fc_out_2.view(b, c, 1, 1))
        sse = torch.mul(x, torch.sigmoid(self.conv(x)).view(b, 1, h, w))
        return torch.max(cse, sse) if fusion == "max" else cse + sse


@pytest.mark.parametrize("fusion", ["max", "sum"])
def test_scse_is_the_authors_channel_spatial_se(fusion):
    ours = randomise(build_block("scse", 64, size=(8, 8), fusion=fusion))
    ref = AimedChannelSpatialSE(64).eval()
    with torch.no_grad():
        ref.fc1.weight.copy_(ours.fc1.weight.flatten(1))
        ref.fc1.bias.copy_(ours.fc1.bias)
        ref.fc2.weight.copy_(ours.fc2.weight.flatten(1))
        ref.fc2.bias.copy_(ours.fc2.bias)
        ref.conv.weight.copy_(ours.spatial.weight)
        ref.conv.bias.copy_(ours.spatial.bias)
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(ours(x), ref(x, fusion))
    rd = 32
    assert n_params(ours) == 2 * 64 * rd + rd + 64 + 64 + 1


class JongchanBAM(nn.Module):
    """Jongchan/attention-module bam.py (ChannelGate, SpatialGate, BAM), transcribed."""

    def __init__(self, c, reduction_ratio=16, dilation_val=4):
        super().__init__()
        r = c // reduction_ratio
        self.gate_c = nn.Sequential(nn.Linear(c, r), nn.BatchNorm1d(r), nn.ReLU(), nn.Linear(r, c))
        self.gate_s = nn.Sequential(
            nn.Conv2d(c, r, 1),
            nn.BatchNorm2d(r),
            nn.ReLU(),
            nn.Conv2d(r, r, 3, padding=dilation_val, dilation=dilation_val),
            nn.BatchNorm2d(r),
            nn.ReLU(),
            nn.Conv2d(r, r, 3, padding=dilation_val, dilation=dilation_val),
            nn.BatchNorm2d(r),
            nn.ReLU(),
            nn.Conv2d(r, 1, 1),
        )

    def forward(self, in_tensor):
        avg_pool = F.avg_pool2d(in_tensor, in_tensor.size(2), stride=in_tensor.size(2))
        channel_att = self.gate_c(avg_pool.flatten(1)).unsqueeze(2).unsqueeze(3).expand_as(in_tensor)
        spatial_att = self.gate_s(in_tensor).expand_as(in_tensor)
        att = 1 + torch.sigmoid(channel_att * spatial_att)
        return att * in_tensor


def test_bam_is_the_reference_bam():
    ours = randomise(build_block("bam", 64, size=(10, 10)))
    ref = JongchanBAM(64).eval()
    ref_params = list(ref.gate_c.state_dict().values()) + list(ref.gate_s.state_dict().values())
    ours_params = list(ours.channel.state_dict().values()) + list(ours.spatial.state_dict().values())
    assert [t.shape for t in ref_params] == [t.shape for t in ours_params]
    with torch.no_grad():
        for a, b in zip(ref_params, ours_params, strict=True):
            a.copy_(b)
    x = torch.randn(2, 64, 10, 10)
    torch.testing.assert_close(ours(x), ref(x))
    c, rd = 64, 4
    assert n_params(ours) == (2 * c * rd + rd + c + 2 * rd) + (
        c * rd + rd + 2 * rd + 2 * (9 * rd * rd + rd + 2 * rd) + rd + 1
    )


def reference_simam(x, e_lambda=1e-4):  # ZjjConan/SimAM simam_module.forward
    b, c, h, w = x.size()
    n = w * h - 1
    x_minus_mu_square = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
    y = x_minus_mu_square / (4 * (x_minus_mu_square.sum(dim=[2, 3], keepdim=True) / n + e_lambda)) + 0.5
    return x * torch.sigmoid(y)


def test_simam_is_the_reference_and_starts_as_an_identity_through_the_alpha_gate():
    m = build_block("simam", 64, size=(9, 9), e_lambda=1e-3)
    x = torch.randn(2, 64, 9, 9)
    torch.testing.assert_close(m(x), reference_simam(x, 1e-3))
    assert n_params(m) == 0
    # 1-D: the same energy over the positions of a sequence
    seq = build_block("simam", 8, size=(20,))
    s = torch.randn(2, 8, 20)
    torch.testing.assert_close(seq(s), reference_simam(s.unsqueeze(-1)).squeeze(-1))
    gated = build_block("simam", 64, "identity", size=(9, 9), e_lambda=1e-3)  # x + α·(SimAM(x) − x), α = 0
    assert torch.equal(gated(x), x) and n_params(gated) == 1
    with torch.no_grad():
        gated.alpha.fill_(1.0)
    torch.testing.assert_close(gated(x), reference_simam(x, 1e-3))
    with pytest.raises(AttnSurgeonError, match="single position"):
        build_block("simam", 64, size=(1, 1))
    counted = count_macs(m, x[:1])
    c, n = 64, 81
    # per element: mean, subtract, square, sum, divide, +½, sigmoid, ×x; per channel: /(n−1), +λ, ×4;
    # and the three scalar ops the trace records for n − 1 from the map's shape
    assert counted.uncounted == {} and counted.macs == 8 * c * n + 3 * c + 3


def test_new_options_reach_the_api_and_are_checked(resnet18):
    _, report = insert(resnet18(), "scse", stages=[1], fusion="sum", reduction=4, input_size=(3, 64, 64))
    assert report.insertions[0].options["fusion"] == "sum" and report.insertions[0].options["hidden"] == 16
    with pytest.raises(AttnSurgeonError, match="fusion must be one of max, sum"):
        insert(resnet18(), "scse", fusion="mean", input_size=(3, 64, 64))
    with pytest.raises(AttnSurgeonError, match="e_lambda must be a number > 0"):
        insert(resnet18(), "simam", e_lambda=-1, input_size=(3, 64, 64))
