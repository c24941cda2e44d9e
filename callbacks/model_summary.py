"""Lightning's Rich model summary without the FLOPs that were never measured.

``ModelSummary`` counts FLOPs only for a module with an ``example_input_array``; for every other module it
prints a FLOPs column of zeros and ``Total FLOPs: 0``, which reads as a measurement. ``RunModelSummary``
prints the FLOPs column and total only when some FLOPs were counted.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from rich import get_console
from rich.table import Table
from typing_extensions import override


class RunModelSummary(RichModelSummary):
    """``RichModelSummary`` that leaves out FLOPs when none were measured (no ``example_input_array``).

    Args:
        max_depth: module depth shown (``0`` or ``-1`` as in Lightning: none / all).
        **summarize_kwargs: ``header_style`` of the table.
    """

    @staticmethod
    @override
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        if total_flops:
            return RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops, **summarize_kwargs)
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        right = {"Params", "Params per Device", "In sizes", "Out sizes"}
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name in right else "left", style="dim" if not name.strip() else None)
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}   "
                      f"[bold]Non-trainable[/]: {get_human_readable_count(int(frozen))}   "
                      f"[bold]Total[/]: {get_human_readable_count(int(total_parameters))} "
                      f"({get_formatted_model_size(model_size)} MB)   "
                      f"[bold]Modules[/]: {total_training_modes['train']} train, {total_training_modes['eval']} eval",
                      highlight=False)
