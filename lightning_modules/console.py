"""What a run prints that is not ours to fix: the one place where known harmless messages are filtered.

Each entry says why the message is harmless and where it comes from. Filters match the message text and the
emitting package, so that a warning raised by effitrain (or a new one from a dependency) still shows.
``quiet_known_warnings`` is called by the CLI before anything is built; a notebook or script can call it too.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownMessage:
    message: str   # regular expression, matched at the start of the message
    module: str    # regular expression on the module that issues the warning (``""`` for log records)
    why: str


KNOWN_HARMLESS_WARNINGS = (
    KnownMessage(r"'set_vital' is deprecated", r"torchdata\.",
                 "torchdata's StatefulDataLoader (0.10/0.11) calls torch.set_vital, deprecated in torch 2.6+; "
                 "the loader works the same (our resume tests check it) and the call is not ours to remove."),
    KnownMessage(r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree",
                 "Lightning 2.5/2.6's _pytree helper uses torch's LeafSpec, deprecated in torch 2.9; it is "
                 "Lightning's internal code path for moving batches and still correct."),
    KnownMessage(r"Starting from v1\.9\.0, `tensorboardX` has been removed", r"lightning\.",
                 "Lightning says it logs to CSV when TensorBoard is absent: the README says this and how to "
                 "install TensorBoard (pip install -e .[tensorboard])."),
    KnownMessage(r"`loftq_config` specified but will be ignored", r"peft\.",
                 "jsonargparse builds peft's config dataclasses with every field given, loftq_config as an "
                 "empty default; peft then warns although LoftQ is not asked for (init_lora_weights decides)."),
    KnownMessage(r"`is_gradient_checkpointing` is deprecated", r"transformers\.",
                 "peft reads transformers' old property name when it wraps a model; nothing changes in training."),
)

#: Lightning's rank-zero INFO lines that are not about this run: product tips, and the note that our forced
#: ``model_summary`` section replaces Lightning's default summary (which is what it is for).
KNOWN_ADVERTISEMENTS = (r"💡 Tip: For seamless cloud", r"Trainer already configured with model summary callbacks")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.match(pattern, record.getMessage()) for pattern in KNOWN_ADVERTISEMENTS)


_ADVERTISEMENT_FILTER = _DropAdvertisements()


def quiet_known_warnings() -> None:
    """Ignore the dependency warnings in ``KNOWN_HARMLESS_WARNINGS`` and Lightning's product tips; idempotent."""
    for known in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=Warning, module=known.module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _ADVERTISEMENT_FILTER not in logger.filters:
            logger.addFilter(_ADVERTISEMENT_FILTER)
