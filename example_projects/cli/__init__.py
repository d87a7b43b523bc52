"""LightningCLI example: both callbacks configured from YAML (``config.yaml``)."""
