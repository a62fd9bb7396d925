"""``jaxquant check DIR``: validate a ModelOpt unified HF checkpoint (jaxquant.check).

Prints one line per finding, ``<key>: [<rule>] <message>``, then a summary line. Exit status: 0 when
clean, 1 with findings, 2 when the checkpoint cannot be read. Reads headers and scale tensors only
(seconds on a 30B checkpoint) unless ``--deep``.
"""

from __future__ import annotations

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_UNREADABLE = 2


def add_check_parser(subparsers) -> None:
    """Register the ``check`` subcommand on the ``jaxquant`` parser's subparsers."""
    c = subparsers.add_parser(
        "check", help="validate a ModelOpt-format checkpoint against what vLLM/TRT-LLM/SGLang loaders require",
        description="Validate a ModelOpt unified HF checkpoint (jaxquant's, nvidia-modelopt's or a published one): "
                    "formats, scale tensors (dtype, shape, NaN/Inf/zero), fused-sibling scales, KV-cache scales, "
                    "exclude_modules and the two JSON configs. One line per finding; exit 0 clean, 1 findings, "
                    "2 unreadable. Rules: docs/export.md.",
    )
    c.add_argument("directory", metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    c.add_argument("--deep", action="store_true",
                   help="also decode every FP8 and unquantized weight and report NaN/Inf (reads all the weights)")
    c.add_argument("--quiet", "-q", action="store_true", help="print the findings only, no summary line")
    c.set_defaults(func=run_check)


def run_check(args) -> int:
    """Run ``jaxquant check``; return the exit status (0 clean, 1 findings, 2 unreadable)."""
    from jaxquant.check import validate_checkpoint

    report = validate_checkpoint(args.directory, deep=args.deep)
    for f in report.findings:
        print(f.format())
    if not args.quiet:
        print(report.summary())
    if report.unreadable:
        return EXIT_UNREADABLE
    return EXIT_CLEAN if report.ok else EXIT_FINDINGS
