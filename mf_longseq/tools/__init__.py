"""Command-line tools around a run: ``validate`` (check a YAML without devices) and the msrun launcher.

Nothing here is imported by ``import mf_longseq``; the CLI imports each tool on demand.
"""
