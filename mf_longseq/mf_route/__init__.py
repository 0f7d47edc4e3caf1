"""MindFormers' Trainer route (``run_mindformer.py`` with the plugin's registered classes): the trainer, the runner
wrapper, the optimizer, the start checkpoint, the adapter that reads MindFormers' settings, and the dataset columns.

Layer: above ``models/`` and ``train/``; nothing below imports it (``registry.py`` registers its classes)."""
