"""``python -m offline.local_hub``: serve folders as hub repos (see :mod:`.cli`)."""

from offline.local_hub.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
