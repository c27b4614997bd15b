"""The two sides of a split step: `server.Server` and `client.Client`, each with its options
(where the loss is computed, the micro-batch schedule, per-client cut points) chosen once,
when it is built."""
