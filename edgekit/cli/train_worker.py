"""One DDP rank of ``edgekit train --nproc N`` (started by ``torch.distributed.run``; also usable with torchrun).

``torchrun --nnodes 2 --nproc_per_node 8 ... -m edgekit.cli.train_worker runs/NAME/train.yaml`` trains
across machines with the same code (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.markup import escape

from .output import err_console, set_verbosity


def main(argv: list[str] | None = None) -> int:
    from ..config.base import parse
    from ..config.train import TrainConfig, load_train
    from ..errors import EdgekitError, ExitCode, exit_code_of
    from ..train.run import train
    from ..train.trainer import DistInfo
    from .train import EpochProgress

    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1:
        err_console.print("usage: python -m edgekit.cli.train_worker TRAIN.yaml [--resume]")
        return 2
    set_verbosity(0)
    dist = DistInfo.from_env()
    try:
        cfg = load_train(Path(paths[0]))
        # validated again: under a user's own torchrun the batch must divide over these processes too
        cfg = parse(TrainConfig, {**cfg.model_dump(mode="json"), "nproc": dist.world_size}, paths[0])
        train(cfg, resume=resume,
              callbacks=EpochProgress() if dist.main else None, dist=dist)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except EdgekitError as exc:
        if dist.main:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return int(exit_code_of(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
