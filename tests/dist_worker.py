"""Entry point for the multi-process tests: ``torchrun ... tests/dist_worker.py SIDE ARGS...`` runs
``momkd ARGS...`` in each rank, after

* writing ``SIDE/pid_rank<r>`` (so a test can kill one rank),
* on ranks other than 0, recording every file-system write below the run directory (``--out``) with
  an audit hook into ``SIDE/writes_rank<r>.json``,
* saving each rank's model state after every fold's epoch loop into ``SIDE/rank<r>_fold<k>.pt``
  (and, with a cohort cache, what the rank cached into ``SIDE/cache_rank<r>_fold<k>.json``).

SIDE lies outside the run directory. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path


def main() -> int:
    side = Path(sys.argv[1])
    argv = sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    side.mkdir(parents=True, exist_ok=True)
    (side / f"pid_rank{rank}").write_text(str(os.getpid()))
    run_dir = Path(argv[argv.index("--out") + 1]).absolute()
    writes: list[str] = []

    def under_run(path: object) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(run_dir)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and len(args) >= 3 and under_run(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            ):
                writes.append(f"{event} {args[0]}")
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink") and any(
            under_run(a) for a in args[:2]
        ):
            writes.append(f"{event} {args[0]}")

    if rank != 0:
        sys.addaudithook(hook)
        atexit.register(lambda: (side / f"writes_rank{rank}.json").write_text(json.dumps(writes)))

    import torch
    from momkd.train import trainer as fold_trainer

    fit = fold_trainer.FoldTrainer.fit

    def fit_and_dump(self: fold_trainer.FoldTrainer) -> None:
        fit(self)
        torch.save(self.model.state_dict(), side / f"rank{rank}_fold{self.data.fold}.pt")
        cache = self.cache
        if cache is not None:  # which bags this rank wrote to / mapped from a shared host cache
            info = {
                "type": type(cache).__name__,
                "bags": sorted(int(i) for i in cache._bags),
                "written": sorted(
                    int(p.name.split(".")[0]) for p in getattr(cache, "_written", [])
                ),
                "directory": str(getattr(cache, "directory", "")),
            }
            (side / f"cache_rank{rank}_fold{self.data.fold}.json").write_text(json.dumps(info))

    fold_trainer.FoldTrainer.fit = fit_and_dump  # type: ignore[method-assign]
    from momkd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
