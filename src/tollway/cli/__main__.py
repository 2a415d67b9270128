"""``python -m tollway.cli``: the same as the ``tollway`` console script."""

from tollway.cli import main

main()
