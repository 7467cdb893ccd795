"""``python -m nautilus_pipeline``: the ``nautilus-pipeline`` command (``cli.main``)."""

from .cli import main

raise SystemExit(main())
