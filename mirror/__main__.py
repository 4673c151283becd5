"""`python -m mirror` is the same as the `registry-mirror` command."""

from mirror.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
