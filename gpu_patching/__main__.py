"""``python -m gpu_patching``: the ``gpu-patching`` command."""

from .cli import main

raise SystemExit(main())
