"""Put first on ``PYTHONPATH`` by ``hive-ratelimit run``: turns the autoload on in interpreters
that do not have ``hive_ratelimit_autoload.pth`` installed (another venv, a source checkout).

It imports ``hive_ratelimit_plugin._autoload`` (which registers a ``HiveLimiter`` once the
program imports LiteLLM), then runs the ``sitecustomize`` module it shadows, if there is one, so
that the interpreter's own start-up customisation still happens. If the package cannot be
imported normally here, only the package itself is loaded from the copy that ``run`` came from
(its dependencies must be importable in this interpreter; if they are not, ``import litellm``
fails loudly instead of running unlimited).
"""

import os
import sys


def _boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    import importlib

    try:
        importlib.import_module("hive_ratelimit_plugin._autoload")  # installs the hook (the variable is set)
    except ImportError:
        import importlib.machinery
        import importlib.util

        root = os.path.dirname(os.path.dirname(here))
        spec = importlib.machinery.PathFinder.find_spec("hive_ratelimit_plugin", [root])
        if spec is None or spec.loader is None:
            raise
        package = importlib.util.module_from_spec(spec)
        sys.modules["hive_ratelimit_plugin"] = package
        spec.loader.exec_module(package)
        importlib.import_module("hive_ratelimit_plugin._autoload")
    _chain()


def _chain() -> None:
    """Run the ``sitecustomize`` that this file shadows (found later on ``sys.path``)."""
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_boot()
