"""``python -m cdl_tools.cli``: the ``cdl`` command."""

from cdl_tools.cli import main

__all__: list[str] = []

main()
