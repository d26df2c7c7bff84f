"""`python -m haps`: the `haps` command line."""

from haps.cli import main

if __name__ == "__main__":
    main()
