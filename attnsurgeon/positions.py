"""The insertion positions, named as in the SENet paper's integration study, plus BAM's ``stage``
and the ``conv`` replacement (torch-free).

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
    "conv": "in place of the block's spatial (k>1) conv, same channels, stride, groups and dilation; its "
            "norm/activation stay (SKNet, ResNeSt: blocks of kind conv only)",
}
# the positions whose site is one per stage, not one per block
STAGE_POSITIONS = ("stage",)
# what each kind of block may go where
KIND_POSITIONS = {
    "gate": tuple(p for p in POSITIONS if p != "conv"),
    "conv": ("conv",),
}
KIND_HELP = {
    "gate": "a module added on the tensor's path (it keeps the shape)",
    "conv": "replaces a spatial convolution",
}
