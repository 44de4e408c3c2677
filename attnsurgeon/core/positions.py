"""The insertion positions, named as in the SENet paper's integration study, plus BAM's ``stage``
and the ``conv`` replacement, and the anchors ``after``/``before`` any module (torch-free).

What a block may go where is declared here once: a block's ``kind`` (see
:class:`attnsurgeon.blocks.BlockInfo`) names the positions it allows. A gate (SE, ECA, CBAM, BAM…)
is a module added on a tensor's path and goes anywhere but ``conv``; a conv block (SK, splat)
takes the place of a convolution and goes only at ``conv``.
"""

POSITIONS = ("standard", "pre", "post", "identity", "3x3", "stage", "conv")
POSITION_HELP = {
    "standard": "on the residual branch after its last op, before the merge (SENet, timm)",
    "pre": "at the start of the residual branch; the skip still sees the raw block input",
    "post": "after the merge (after the block's closing activation where it has one)",
    "identity": "on the skip branch, in parallel with the residual branch (after a projection)",
    "3x3": "right after the block's spatial (k>1) conv and its norm/activation (SE-3x3; MobileNetV3's SE)",
    "stage": "between stages: after the last block of every stage that has a following stage, on the path "
    "into it (BAM); one per stage, --stages picks which",
    "conv": "in place of the block's spatial (k>1) conv, same channels, stride, groups and dilation, and of the "
    "norm/activation after it (SKNet, ResNeSt: blocks of kind conv only)",
}
# Anchors: a gate after (on the output of) or before (on the input of) every module whose qualified name
# matches a glob, anywhere in the model (attnsurgeon.graph.anchors). An anchor takes the place of a position.
ANCHORS = ("after", "before")
ANCHOR_HELP = {
    "after": "--after GLOB: on the output of every module whose name matches (layer3.*.conv2, model.9, "
    "decoder.blocks.*.conv2); every reader of that output sees the block's",
    "before": "--before GLOB: on the tensor every module whose name matches receives (head, decoder.blocks.*.conv1); "
    "only that module sees the block's output",
}

# the positions whose site is one per stage, not one per block
STAGE_POSITIONS = ("stage",)
# what each kind of block may go where
KIND_POSITIONS = {"gate": tuple(p for p in POSITIONS if p != "conv"), "conv": ("conv",)}
KIND_HELP = {
    "gate": "a module added on the tensor's path (it keeps the shape)",
    "conv": "replaces a spatial convolution",
}
