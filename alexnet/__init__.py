"""alexnet-sweeps: the d2l.ai AlexNet-on-Fashion-MNIST baseline (chapter 7.1), tracked in MLflow and
swept with Optuna.

Importing the package is cheap: torch, mlflow and optuna are imported only by the modules that need
them, so `alexnet --help` answers at once.
"""

import os

__version__ = "0.1.0"

# MLflow 3 sends usage telemetry from every process that uses it and waits for its threads at exit
# (2 s a command on these machines, offline or not). Off unless the user has set it either way.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class UsageError(Exception):
    """Bad input from the user: a config key, a file, a run id. The CLI prints it as one line and exits 2."""
