"""Loaded at start-up by every Python process that has this folder on its PYTHONPATH (tests/test_selection.py
puts it there for one sweep's launcher, workers and confirm): the trainer's test metrics turn adversarial,
`1 - value`, which reverses every ranking by test accuracy. A sweep that reads no test metric to decide
anything runs exactly as without it."""

import os

if os.environ.get("ALEXNET_ADVERSARIAL_TEST_METRICS") == "1":
    from alexnet.training.train import EpochRecord

    honest = EpochRecord.metrics

    def adversarial(self):
        return {k: 1 - v if k.startswith("test/") else v for k, v in honest(self).items()}

    EpochRecord.metrics = adversarial
