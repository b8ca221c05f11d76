"""Putting bundles on devices: over SSH for one board, by signed MQTT commands for a fleet.

* :mod:`.ssh` — ``edgekit flash BUNDLE --host user@device``: resumable SFTP copy,
  then the device's ``edgekit-agent install`` (which health-checks before switching).
* :mod:`.server` — ``edgekit serve``: a small HTTP(S) bundle server with Range requests,
  so devices resume interrupted downloads.
* :mod:`.commands` / :mod:`.plan` / :mod:`.rollout` — signed ``install``/``rollback``/``bench``
  commands over MQTT; what a rollout installs where (canaries, waves, abort rule);
  running it, and its on-disk record.
* :mod:`.fleet_flash` — ``edgekit flash --fleet`` and ``edgekit rollback`` as library calls
  (typed settings; the CLI uses them, ``benchmarks/fleet_rollout.py`` runs the CLI).
* :mod:`.remote_bench` — ``edgekit bench --device``: the agent's ``bench`` command.
"""
