"""``python -m attnsurgeon.cli``: the same as the ``attnsurgeon`` command."""

from . import main

main()
