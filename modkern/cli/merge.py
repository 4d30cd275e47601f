"""`modkern merge`: merge two Hugging Face checkpoint folders by MoD weight select.

    modkern merge BASE OTHER OUT --alpha 0.9
    modkern merge BASE OTHER OUT --alpha 'layers.0.*=0.8' --alpha 0.9 --include mlp
    modkern merge --config mod_config.yml OUT --precision reference --include mlp

Streams tensor by tensor, reads OTHER only where it is selected, and publishes OUT only
when complete (a killed merge leaves no OUT, or the previous one with --force).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import AlphaError, CheckpointError, ModkernError
from . import one_line
from .arguments import add_force, add_quiet, add_tensor_choice, subcommand


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "merge", "merge two checkpoint folders into a new one",
                   __doc__)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="BASE OTHER OUT (model 1, model 2, output folder), or only OUT with "
                   "--config")
    p.add_argument("--config", metavar="FILE",
                   help="the paper's released config (base_model, experts: [{source_model}], "
                   "weights: [alpha, 1-alpha]); gives BASE, OTHER and alpha")
    p.add_argument("--alpha", action="append", metavar="RULE",
                   help="threshold in [0, 1], e.g. 0.9; or PATTERN=VALUE for the tensors a "
                   "name pattern matches (repeatable, first match wins; a bare number is "
                   "the default for the rest)")
    p.add_argument("--recipe", metavar="FILE",
                   help="YAML/JSON with alpha (number or pattern mapping), include, exclude, "
                   "precision, strict, dtype, vocab; e.g. the modkern_recipe.yaml of an earlier "
                   "merge. Command-line options win")
    add_tensor_choice(p)
    p.add_argument("--vocab", choices=("strict", "common"), default=None,
                   help="strict (default): tensors of different shapes are an error; common: "
                   "where only the first dimension differs (embed_tokens and lm_head of "
                   "vocabularies padded to different sizes, e.g. 151936 vs 152064 rows), merge "
                   "the rows both have and keep BASE's further rows; config.json's "
                   "vocab_size may then differ (OUT keeps BASE's)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), or cuda / cuda:N to run the select on the GPU")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="the select's engine: auto (default: the Triton kernels on a CUDA "
                   "device, torch on the CPU), torch, or triton (on the CPU only under "
                   "TRITON_INTERPRET=1); every backend writes the same bits")
    p.add_argument("--dtype", default=None,
                   help="cast floating-point output tensors to this dtype (bfloat16, "
                   "float16, float32); default: keep BASE's")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest output shard (default 5GB; e.g. 2GB, 500MB, 4GiB)")
    add_force(p)
    p.add_argument("--full-hash", action="store_true",
                   help="record the sha256 of every input weight file in the recipe (reads "
                   "all of OTHER); default: sha256 of each file's header and its size")
    p.add_argument("--distributed", action="store_true",
                   help="run as one rank of a torch.distributed job (implied when started "
                   "by torchrun with more than one process): `torchrun --nproc-per-node N "
                   "-m modkern merge ...` splits the tensors over N processes")
    p.add_argument("--split-above", default=None, metavar="SIZE",
                   help="distributed: split tensors larger than this over all ranks by rows "
                   "(default 4GB; e.g. 500MB or a number of bytes)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="distributed: how long a rank waits for the others before the merge "
                   "fails (default 1800)")
    add_quiet(p, "no progress bar and no summary line")
    p.set_defaults(command="merge")


def parse_alpha(rules: list[str]):
    """--alpha values -> a float, or a pattern mapping (a bare number becomes '*')."""
    mapping: dict[str, float] = {}
    default = None
    for rule in rules:
        pattern, _, value = rule.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise AlphaError(f"--alpha {rule!r}: expected a number in [0, 1] or "
                             "PATTERN=NUMBER") from None
        if pattern:
            mapping[pattern] = number
        elif default is not None:
            raise AlphaError(f"--alpha given two default values ({default} and {number}); "
                             "expected one")
        else:
            default = number
    if not mapping:
        return default
    if default is not None:
        mapping["*"] = default
    return mapping


def _terminate(signum, frame):  # SIGTERM: unwind like Ctrl-C so the temp folder is removed
    raise KeyboardInterrupt


def _merge_function(args: argparse.Namespace):
    """merge_checkpoints, or its distributed form under torchrun / --distributed; this
    process's rank; the options only the distributed form takes."""
    from ..checkpoint.merge import merge_checkpoints
    from ..checkpoint.distributed import launched_by_torchrun, merge_checkpoints_distributed
    from ..checkpoint.shard_writer import parse_size

    if not (args.distributed or launched_by_torchrun()):
        for opt, value in (("--split-above", args.split_above),
                           ("--dist-timeout", args.dist_timeout)):
            if value is not None:
                raise CheckpointError(f"{opt} applies to a distributed merge only; launch "
                                      "with torchrun --nproc-per-node N -m modkern merge ...")
        return merge_checkpoints, 0, {}
    if not os.environ.get("RANK") or not os.environ.get("WORLD_SIZE"):
        raise CheckpointError("--distributed: no torch.distributed environment (RANK and "
                              "WORLD_SIZE unset); launch with torchrun --nproc-per-node N "
                              "-m modkern merge ...")
    options = {}
    if args.split_above is not None:
        options["split_above"] = parse_size(args.split_above)
    if args.dist_timeout is not None:
        if not 0 < args.dist_timeout < 10**8:  # also NaN, which timedelta refuses
            raise CheckpointError(f"--dist-timeout {args.dist_timeout}: expected a number of "
                                  "seconds > 0")
        options["timeout_s"] = args.dist_timeout
    return merge_checkpoints_distributed, int(os.environ["RANK"]), options


def run(args: argparse.Namespace) -> int:
    args.merge_started = False
    previous = signal.getsignal(signal.SIGTERM)  # _run installs its own while it merges
    try:
        return _run(args)
    except ModkernError as err:
        from ..checkpoint.distributed import DistributedMergeError, launched_by_torchrun

        distributed = args.distributed or launched_by_torchrun()
        same_on_all = isinstance(err, DistributedMergeError) or not args.merge_started
        if distributed and (os.environ.get("RANK") or "0") != "0" and same_on_all:
            return 2  # every rank has this error (agreed, or the same bad arguments):
            # rank 0 prints it, once
        raise
    finally:
        # torchrun sends SIGTERM to the other ranks when one fails. Once this rank's merge
        # has cleaned up, only its one line is left to print: a rank ignores SIGTERM from
        # here, or the line could be lost (torchrun kills a rank that does not end soon);
        # a plain run gets the process's own handling back.
        from ..checkpoint.distributed import launched_by_torchrun

        ranked = args.distributed or launched_by_torchrun()
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ranked else previous)


def _run(args: argparse.Namespace) -> int:
    from ..checkpoint.hooks import hooks_from_environment
    from ..checkpoint.paper_config import load_paper_config
    from ..checkpoint.recipe import load_rules

    rules = load_rules(args.recipe) if args.recipe else {}
    extra = None
    if args.config:
        if len(args.paths) != 1:
            raise CheckpointError(f"with --config give only OUT, got {len(args.paths)} paths "
                                  f"{args.paths}")
        cfg = load_paper_config(args.config)
        base, other, out = cfg.base, cfg.other, args.paths[0]
        rules.setdefault("alpha", cfg.alpha)
        extra = {"paper_config": args.config, "content": cfg.raw}
    else:
        if len(args.paths) != 3:
            raise CheckpointError(f"expected BASE OTHER OUT (or --config FILE OUT), got "
                                  f"{len(args.paths)} paths {args.paths}")
        base, other, out = args.paths
    alpha = parse_alpha(args.alpha) if args.alpha else rules.get("alpha")
    if alpha is None:
        raise AlphaError("no alpha: pass --alpha 0.9 (or PATTERN=VALUE rules), --recipe or "
                         "--config")
    signal.signal(signal.SIGTERM, _terminate)
    merge, rank, extra_options = _merge_function(args)
    args.merge_started = True
    report = merge(
        base, other, out, alpha, **extra_options,
        include=args.include or rules.get("include"),
        exclude=args.exclude or rules.get("exclude"),
        strict=args.strict if args.strict is not None else rules.get("strict", True),
        precision=args.precision or rules.get("precision", "exact"),
        vocab=args.vocab or rules.get("vocab", "strict"),
        backend=args.backend, device=args.device, dtype=args.dtype or rules.get("dtype"),
        max_shard_size=args.max_shard_size, force=args.force,
        progress=False if args.quiet else None, full_hash=args.full_hash,
        extra_recipe=extra, hooks=hooks_from_environment())  # tests' fault injection
    if not args.quiet and rank == 0:
        print(f"modkern merge: {one_line(report.summary())}", file=sys.stdout)
    return 0
