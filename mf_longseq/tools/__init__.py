"""Command-line tools around a run: ``validate`` (check a YAML without devices), the ``train`` / ``demo`` verbs
(``train_cli.py``), the msrun launchers (``launch.py`` behind ``scripts/msrun_launcher.sh``, ``workers.py`` behind
``--workers``; both build their command with ``msrun.py``) and their supervisor (``supervise.py``, ``rank_guard.py``).

Nothing here is imported by ``import mf_longseq``; the CLI imports each tool on demand.  This is the top layer:
``train/`` and the layers below never import it.
"""
