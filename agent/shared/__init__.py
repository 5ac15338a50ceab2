"""What the agent and the collector share: the rule, the event shape, the wire
format, the configuration, errors, the clock and small helpers. Nothing here
imports :mod:`agent.sensor` or :mod:`agent.collector`."""
