"""``python -m rico_torch`` / ``rico-torch``: LightningCLI over the DataModules and models.

Examples::

    python -m rico_torch fit --config configs/demo.yaml
    python -m rico_torch fit --config configs/eurosat.yaml --data.init_args.lmdb_path encoded-eurosat
    rico-torch info demo-lmdb          # = python -m rico_torch.encode info demo-lmdb

A mistake in the data or the config (missing LMDB or metadata, unknown band, a config for another
dataset's LMDB, ...) ends with one line ``error: <message>`` and exit code 1; set
``RICO_TORCH_DEBUG=1`` for the traceback. ``trainer.precision`` left unset means
:func:`auto_precision`: ``bf16-mixed`` on a CUDA GPU with bf16 support, ``32-true`` elsewhere.
"""

from __future__ import annotations

import logging
import sys
import warnings

import torch
from lightning.pytorch.cli import LightningCLI

import rico_torch.data  # noqa: F401  (registers the DataModules for class-path lookup)
import rico_torch.models  # noqa: F401

from .cli_errors import program, user_errors


def auto_precision(accelerator: object) -> str:
    """``bf16-mixed`` when training runs on a CUDA GPU that supports bf16, else ``32-true``
    (bf16 autocast on a CPU is several times slower than float32)."""
    on_cuda = accelerator in (None, "auto", "gpu", "cuda")
    if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips (litlogger, litmodels) from the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


class RicoCLI(LightningCLI):
    """LightningCLI that resolves an unset ``trainer.precision`` by the accelerator."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:
            config.trainer.precision = auto_precision(config.trainer.get("accelerator"))


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    prog = program("rico_torch", "rico-torch")
    if argv[:1] == ["info"]:
        from .encode.cli import main as encode_main

        raise SystemExit(encode_main(argv, prog=prog))
    tips = _NoTips()
    loggers = [logging.getLogger(f"lightning.{part}.utilities.rank_zero") for part in ("pytorch", "fabric")]
    for logger in loggers:  # rank_zero_info logs there (a filter on a parent logger would not apply)
        logger.addFilter(tips)
    try:
        with user_errors(), warnings.catch_warnings():
            # Lightning 2.6 builds torch's LeafSpec, which torch 2.13 deprecated: nothing the user can change
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            # an epoch shorter than trainer.log_every_n_steps (a small set): steps are still logged, every
            # log_every_n_steps across epochs, and epoch metrics at each epoch's end
            warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than "
                                    r"the logging interval")
            if next((a for a in argv if not a.startswith("-")), None) in ("validate", "test", "predict"):
                # --ckpt_path restores ModelCheckpoint's top-k bookkeeping, which these runs (a new log
                # folder, no checkpoint written) do not use: its "dirpath has changed" notice says nothing
                warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
            RicoCLI(subclass_mode_model=True, subclass_mode_data=True, args=args,
                    save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": prog})
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


if __name__ == "__main__":
    main()
