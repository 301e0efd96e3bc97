"""Turn a deployment's model and recipe into an evaluated, cached artifact."""
