"""`python -m m2r2core.train …`: the training CLI (see the package docstring)."""

from m2r2core.train import main

if __name__ == "__main__":  # importing the package's modules (the boundary test) runs nothing
    main()
