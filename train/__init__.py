"""Programs: ``python -m train.main``, ``python -m train.evaluate``, ``python -m train.bench``."""
