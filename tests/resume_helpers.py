"""Kill-and-resume helpers: a callback that SIGKILLs its own process at a step, and a runner that imports the
CLI once and runs each killed run in a forked child (one import for the whole matrix).

    python resume_helpers.py RUNS.json    # RUNS.json: [{"cwd": ..., "args": [...]}, ...]; prints one exit line each
"""

from __future__ import annotations

import json
import os
import signal
import sys

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the process at the end of optimizer step ``step`` (no Python clean-up, as a preemption)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_callback(step: int) -> str:
    return f"--trainer.callbacks+={json.dumps({'class_path': 'resume_helpers.KillAtStep', 'init_args': {'step': step}})}"


def main(runs_file: str) -> None:
    import torch
    from effitrain.lightning_modules.cli import build_cli

    torch.set_num_threads(1)
    for run in json.load(open(runs_file)):
        pid = os.fork()
        if pid == 0:  # the child trains until KillAtStep kills it
            os.chdir(run["cwd"])
            try:
                build_cli(run["args"])
            finally:
                os._exit(3)  # reached only if the kill did not happen
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"cwd": run["cwd"], "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
