"""The on-host sensor: sources, resolver, prefilter, outbox, shipper and the
runtime that wires them."""
