"""``python -m twat_mp``."""

from twat_mp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
