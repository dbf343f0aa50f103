"""``python -m rico_torch`` / ``rico-torch``: LightningCLI over the DataModules and models.

Example: ``python -m rico_torch fit --config configs/eurosat.yaml``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import rico_torch.data  # noqa: F401  (registers the DataModules for class-path lookup)
import rico_torch.models  # noqa: F401


def main(args: list[str] | None = None) -> None:
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
