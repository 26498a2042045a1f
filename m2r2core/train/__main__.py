"""`python -m m2r2core.train …`: the training CLI (see the package docstring)."""

from m2r2core.train import main

main()
