"""Fleet monitoring over MQTT: ingest, history, alerts, dashboard, simulated devices, a local broker.

:mod:`.queries` answers what ``edgekit fleet ls/show/history/plot`` show, as data.
The contract with devices is :mod:`edgekit_runtime.contract.fleet_protocol` (topics and
envelope); ``docs/telemetry.md`` describes it and how the monitor reads it.
"""
