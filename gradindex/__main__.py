"""``python -m gradindex``: the command line, as ``torchrun`` starts it."""

from gradindex.cli import main

main()
