"""Federated adaptation: a head trained on the devices' own samples, aggregated here, released through the gate."""
