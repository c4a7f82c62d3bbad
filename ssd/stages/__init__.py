"""One module per ``ssd`` command: the only code that reads argparse, params and workspace paths.

Each module has ``add_arguments(parser)`` and ``run(args) -> int``; ``ssd.cli`` maps a command to
its module. A stage module declares the params its command reads (``PARAMS``; ``dvc.yaml`` lists
the same keys, ``tests/pipeline/test_dvc_deps.py`` compares), loads them with :func:`common.settings`, and calls
the layers below with typed settings and paths.
"""
