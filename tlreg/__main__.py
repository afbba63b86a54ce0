"""`python -m tlreg` (and `torchrun -m tlreg`) run the CLI."""

from tlreg.cli import main

if __name__ == "__main__":
    main()
