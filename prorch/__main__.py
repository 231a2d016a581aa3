"""`python -m prorch`: the same as the `prorch` command."""

from prorch.cli import main

main()
