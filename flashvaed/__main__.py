"""`python -m flashvaed`: the console script, for environments where it is not on the PATH."""

from .cli import main

main()
