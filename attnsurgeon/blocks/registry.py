"""Every block of the zoo, declared once: its :class:`~.info.BlockInfo` (options and their defaults,
kind, natural position, paper) under its name. Adding a block is one file plus one entry here; the
flags, help, tables and recipe checks are derived from it. Nothing here imports torch."""

from __future__ import annotations

from .info import BlockInfo

REGISTRY: dict[str, BlockInfo] = {
    info.name: info
    for info in (
        BlockInfo(
            "se",
            "attnsurgeon.blocks.se",
            "Squeeze-and-Excitation: global average pool, bottleneck MLP, sigmoid channel gate",
            "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018, https://arxiv.org/abs/1709.01507",
            {"reduction": 16, "bias": True, "rd_divisor": 8, "keep_depth": None},
        ),
        BlockInfo(
            "eca",
            "attnsurgeon.blocks.eca",
            "Efficient Channel Attention: global average pool, 1-D conv across channels, sigmoid gate",
            "Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
            {"kernel_size": None, "keep_depth": None},
        ),  # None: ECA's adaptive k; pool over every axis
        BlockInfo(
            "cbam",
            "attnsurgeon.blocks.cbam",
            "CBAM: avg+max channel MLP gate, then a k×k spatial gate over channel avg/max maps",
            "Woo et al., CBAM, ECCV 2018, https://arxiv.org/abs/1807.06521",
            {"reduction": 16, "bias": False, "kernel_size": 7, "rd_divisor": 1},
        ),
        BlockInfo(
            "ese",
            "attnsurgeon.blocks.ese",
            "Effective SE: global average pool, one 1×1 conv C→C (no bottleneck), hard-sigmoid gate",
            "Lee & Park, CenterMask (VoVNetV2), CVPR 2020, https://arxiv.org/abs/1911.06667",
            {},
        ),
        BlockInfo(
            "ecam",
            "attnsurgeon.blocks.ecam",
            "ECA with an MLP: pooled channels through a 1-tap conv to C/8 maps, ReLU, a k-tap conv back",
            "timm's EcaModule(use_mlp=True), after Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
            {"kernel_size": None},
        ),
        BlockInfo(
            "ceca",
            "attnsurgeon.blocks.ceca",
            "Circular ECA: ECA whose conv across channels pads circularly",
            "timm's CecaModule, after Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
            {"kernel_size": None},
        ),
        BlockInfo(
            "ge",
            "attnsurgeon.blocks.ge",
            "Gather-Excite: gather context (global or e×e windows, pooled or learned), "
            "excite through an MLP, upsample the gate",
            "Hu et al., Gather-Excite, NeurIPS 2018, https://arxiv.org/abs/1810.12348",
            {"extent": 0, "extra_params": False, "reduction": 16},
        ),
        BlockInfo(
            "gc",
            "attnsurgeon.blocks.gc",
            "Global Context: softmax attention pooling, bottleneck MLP with LayerNorm, sigmoid scale",
            "Cao et al., GCNet, ICCVW 2019, https://arxiv.org/abs/1904.11492",
            {"reduction": 8},
        ),
        BlockInfo(
            "gca",
            "attnsurgeon.blocks.gca",
            "Global Context, add fusion: the transformed context is added to every position",
            "Cao et al., GCNet, ICCVW 2019, https://arxiv.org/abs/1904.11492",
            {"reduction": 8},
        ),
        BlockInfo(
            "lcbam",
            "attnsurgeon.blocks.lcbam",
            "Light CBAM: ½avg+½max pooled once through the channel MLP, then a k×k spatial gate",
            "timm's LightCbamModule, after Woo et al., CBAM, ECCV 2018, https://arxiv.org/abs/1807.06521",
            {"reduction": 16, "bias": False, "kernel_size": 7, "rd_divisor": 1},
        ),
        BlockInfo(
            "coord",
            "attnsurgeon.blocks.coord",
            "Coordinate attention: row and column pooling, a shared 1×1 conv+BN, a row gate × a column gate",
            "Hou et al., Coordinate Attention, CVPR 2021, https://arxiv.org/abs/2103.02907",
            {"reduction": 16, "rd_divisor": 8},
        ),
        BlockInfo(
            "scoord",
            "attnsurgeon.blocks.scoord",
            "Simple coordinate attention: linear layers, no norm, one sigmoid over row + column terms",
            "timm's SimpleCoordAttn, after Hou et al., CVPR 2021, https://arxiv.org/abs/2103.02907",
            {"reduction": 4, "rd_divisor": 8},
        ),
        BlockInfo(
            "ela",
            "attnsurgeon.blocks.ela",
            "Efficient Local Attention: k-tap depthwise convs along rows and columns, GroupNorm, no reduction",
            "Xu & Wan, ELA, 2024, https://arxiv.org/abs/2403.01123",
            {"kernel_size": 7},
        ),
        BlockInfo(
            "strip",
            "attnsurgeon.blocks.strip",
            "Strip attention: row and column means refined by k-tap depthwise convs, one sigmoid",
            "timm's StripAttn, after Hou et al., Strip Pooling, CVPR 2020, https://arxiv.org/abs/2003.13328",
            {"kernel_size": 3},
        ),
        BlockInfo(
            "nl",
            "attnsurgeon.blocks.nl",
            "Non-local block: every position attends to every other (θᵀφ softmax), added back through a zero-init BN",
            "Wang et al., Non-local Neural Networks, CVPR 2018, https://arxiv.org/abs/1711.07971",
            {"reduction": 8, "rd_divisor": 8},
        ),
        BlockInfo(
            "cam",
            "attnsurgeon.blocks.cam",
            "ENCAM channel attention: avg- and max-pooled descriptors through one shared MLP, summed, sigmoid",
            "seed 004 (ENCAM); CBAM's channel gate, Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521",
            {"reduction": 8, "bias": False},
        ),
        BlockInfo(
            "danet",
            "attnsurgeon.blocks.danet",
            "DANet channel attention: channel-to-channel affinity XXᵀ, max − energy, softmax, γ·(A·X) + x, γ from 0",
            "Fu et al., Dual Attention Network, CVPR 2019, https://arxiv.org/abs/1809.02983",
            {},
        ),
        BlockInfo(
            "scse",
            "attnsurgeon.blocks.scse",
            "Concurrent spatial and channel SE: an SE channel gate and a 1×1-conv spatial gate, fused by max or sum",
            "Roy et al., scSE, MICCAI 2018, https://arxiv.org/abs/1803.02579",
            {"reduction": 2, "fusion": "max"},
        ),
        BlockInfo(
            "simam",
            "attnsurgeon.blocks.simam",
            "SimAM: parameter-free, each neuron weighted by σ of its closed-form energy",
            "Yang et al., SimAM, ICML 2021, http://proceedings.mlr.press/v139/yang21o.html",
            {"e_lambda": 1e-4},
        ),
        BlockInfo(
            "bam",
            "attnsurgeon.blocks.bam",
            "Bottleneck Attention Module: channel MLP × dilated spatial branch, x·(1 + σ(c·s)), between stages",
            "Park et al., BAM, BMVC 2018, https://arxiv.org/abs/1807.06514",
            {"reduction": 16},
            position="stage",
        ),
        BlockInfo(
            "sk",
            "attnsurgeon.blocks.sk",
            "Selective Kernel: the conv becomes a 3×3 and a dilated 3×3 path, mixed per channel by a softmax attention",
            "Li et al., Selective Kernel Networks, CVPR 2019, https://arxiv.org/abs/1903.06586",
            {"reduction": 16, "rd_divisor": 8, "split_input": True},
            kind="conv",
            position="conv",
        ),
        BlockInfo(
            "splat",
            "attnsurgeon.blocks.splat",
            "Split attention (ResNeSt): the conv computes radix splits, mixed per channel by a softmax attention",
            "Zhang et al., ResNeSt: Split-Attention Networks, 2020, https://arxiv.org/abs/2004.08955",
            {"radix": 2, "reduction": 4, "rd_divisor": 8},
            kind="conv",
            position="conv",
        ),
    )
}

INITS = ("default", "identity")
