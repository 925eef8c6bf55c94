"""Sweep a program over a grid of flag values and seeds, one Ray task per trial.

    python scripts/sweep.py ppo_cbp/train.py --env Hopper-v4 --steps 1000000 \\
        --grid method=bp,cbp replacement-rate=1e-4,1e-5 --seeds 0-29 --name hopper_rr
    python scripts/sweep.py scripts/supervised.py slowly-changing-regression --examples 200000 \\
        --grid method=bp,cbp --seeds 0-9 --seeds-per-trial 5 --name scr

The program (``ppo_cbp/train.py`` or ``scripts/supervised.py <subcommand>``) comes first,
followed by its fixed flags; the sweep's own options may come anywhere after it. A grid item
is ``flag=value1,value2,...`` (``true``/``false`` for switches; for PPO ``method=bp,cbp,l2,
snp,redo,stdadam``, combined with ``+``). Seeds: ``0-29``, ``0,3,7`` or several words.

Without ``--address`` a local Ray instance uses this machine's cores (``--num-cpus`` to
limit it); ``--address <host:port>`` (or ``auto``) joins a running cluster:

    ray start --head --port 6379                           # on the head machine
    RAY_AUTH_MODE=token ray start --address HEAD:6379      # on each worker
    RAY_AUTH_MODE=token python scripts/sweep.py ... --address HEAD:6379

Ray 2.60's ``ray start --head`` turns on token authentication: every machine that joins needs
the head's ``~/.ray/auth_token`` (copy it, or set ``RAY_AUTH_TOKEN``) and ``RAY_AUTH_MODE=token``
in its environment. The repository must sit at the same path on every machine and
``--runs-dir`` on a shared filesystem. Everything goes to
``<runs-dir>/<name>/``: ``manifest.json``, one folder per trial with its ``trial.log``,
``results.csv`` (per trial and seed) and ``summary.csv`` (mean and standard error over seeds
per configuration). Running the same command again skips finished trials and continues
interrupted ones from their checkpoints. See :mod:`ppo_cbp.sweep` for the exact definitions.

Every configuration's command is first read by the program's own parser: a flag it does not
know or a value it cannot read stops the sweep before Ray starts. A trial whose program exits
with 2 (it refused its input) is not retried.

Exit codes: 0 all trials done, 1 some trial failed, 2 bad input (one ``error:`` line, nothing
written: bad arguments, flags or values the program refuses, a folder that cannot be written,
Ray missing, a cluster that cannot be joined), 130 when interrupted (Ctrl-C or SIGTERM; the
trials checkpoint and continue on the next run).
"""

from __future__ import annotations

import argparse
import sys

from ppo_cbp.cli import UsageError, help_description, report_error
from ppo_cbp.sweep import parse_grid, parse_program, parse_seeds, run_sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage and exit
        raise UsageError(f"{message} (see sweep.py --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        usage="sweep.py PROGRAM [SUBCOMMAND] [fixed flags...] --grid FLAG=V1,V2 ...\n"
        "       --seeds 0-29 --name NAME [options]",
        description=help_description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    required = p.add_argument_group("required arguments")
    required.add_argument("--seeds", nargs="+", required=True, help="seeds: 0-29, 0,1,2 or 0 1 2")
    required.add_argument("--name", required=True, help="sweep name: output in <runs-dir>/<name>")
    p.add_argument("--grid", nargs="+", default=[], metavar="FLAG=V1,V2", help="grid items")
    p.add_argument("--runs-dir", default="runs", help="parent folder of sweeps (default runs)")
    p.add_argument(
        "--seeds-per-trial",
        type=int,
        default=1,
        help="supervised benchmarks: seeds of one configuration trained together in one trial",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=1,
        help="retries of a failing trial (default 1; one that exits 2, bad input, gets none)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial declares")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs each trial declares (fractions share one); default 1 if the cluster has GPUs",
    )
    p.add_argument("--address", default=None, help="join this Ray cluster (host:port or auto)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none when stderr is not a terminal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args, rest = _parser().parse_known_args(argv)
        program, fixed = parse_program(rest)
        outcome = run_sweep(
            program,
            fixed,
            parse_grid(args.grid),
            parse_seeds(args.seeds),
            args.name,
            runs_dir=args.runs_dir,
            seeds_per_trial=args.seeds_per_trial,
            max_retries=args.max_retries,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            address=args.address,
            num_cpus=args.num_cpus,
            progress=not args.no_progress,
        )
    except UsageError as e:
        return report_error(e)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
