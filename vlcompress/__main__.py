"""``python -m vlcompress`` is the ``vlcompress`` command."""

from .cli import main

main()
