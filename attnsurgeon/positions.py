"""The insertion positions, named as in the SENet paper's integration study (torch-free)."""

POSITIONS = ("standard", "pre", "post", "identity", "3x3")
POSITION_HELP = {
    "standard": "on the residual branch after its last op, before the merge (SENet, timm)",
    "pre": "at the start of the residual branch; the skip still sees the raw block input",
    "post": "after the merge (after the block's closing activation where it has one)",
    "identity": "on the skip branch, in parallel with the residual branch (after a projection)",
    "3x3": "right after the block's spatial (k>1) conv and its norm/activation (SE-3x3; MobileNetV3's SE)",
}
