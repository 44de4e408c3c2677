"""Loading a model: names from torchvision, timm, a ``file.py:factory``, a module, or a library by
prefix (``sources/``: ``yolo:``, ``hf:``, ``smp:``), parsed and looked up (``names``), built offline
unless published weights are asked for (``builders``, ``network``), with the input size it takes
(``sizes``), all composed in ``models``; weights files read without unpickling (``weights``);
sample inputs of the right kind and size for a model (``samples``). A saved modified model is read
one floor up, in :mod:`attnsurgeon.saving.saved`, because rebuilding it needs the rewrite.
"""
