r"""LightningCLI entry point::

    python -m example_projects.cli.main fit --config example_projects/cli/config.yaml
    python -m example_projects.cli.main fit --config example_projects/cli/config.yaml \
        --trainer.callbacks+=lightning_conditioning.WeightDominationCallback \
        --trainer.callbacks.threshold=1e-5

Run from the repository root.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from example_projects.cli.model import MLPClassifier, SyntheticClassification


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(MLPClassifier, SyntheticClassification, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
