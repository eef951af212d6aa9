"""Run a fuzz target, or all of them, under atheris (libFuzzer).

    python -m fuzz TARGET [--runs N | --seconds S] [--merge] [-- LIBFUZZER_ARGS...]
    python -m fuzz all --runs N        each target in turn, each in its own process
    python -m fuzz list

The repository's corpus (``fuzz/corpus/TARGET``) is read, never written: new
inputs go to a work directory (``--work``, default ``.fuzz/TARGET``), crashes
to ``crashes/`` beside it. ``--merge`` minimises the work directory into the
repository's corpus (libFuzzer ``-merge=1``): what it adds is what to commit.
Exit status: 0 when no input raised anything but the declared errors.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Final

import atheris

ROOT: Final = Path(__file__).resolve().parent
CORPUS_DIR: Final = ROOT / "corpus"
WORK_DIR: Final = Path(".fuzz")
# Modules whose code the fuzzer instruments for coverage: the decoders and
# what ingest applies to a decoded batch. numpy and msgspec are C and are not.
INSTRUMENTED: Final = ("contracts", "ingest", "fuzz.targets")


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="a target name, 'all' or 'list'")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--runs", type=int, help="inputs to run (libFuzzer -runs)")
    limit.add_argument("--seconds", type=int, help="time to run (libFuzzer -max_total_time)")
    parser.add_argument("--work", type=Path, help="directory for new inputs (default .fuzz/TARGET)")
    parser.add_argument("--merge", action="store_true", help="minimise --work into the corpus")
    # libFuzzer's merge re-runs the program in child processes with its own
    # flags; --raw hands those straight to libFuzzer (see _merge_program).
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    if "--" in argv:
        split = argv.index("--")
        return parser.parse_args(argv[:split]), argv[split + 1 :]
    return parser.parse_args(argv), []


def _merge_program(target: str, work: Path) -> str:
    """An executable that runs ``target`` with libFuzzer's arguments as given.

    libFuzzer's ``-merge=1`` starts the program named by argv[0] again (the
    outer process only reads and writes files); a Python module is not a
    program, so this writes a two-line one beside the work directory.
    """
    program = work.parent / f"{target}-merge.sh"
    program.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fuzz {target} --raw -- "$@"\n')
    program.chmod(0o755)
    return str(program)


def _run_one(args: argparse.Namespace, extra: list[str]) -> None:
    """Instrument, then hand the process to libFuzzer; it exits when done."""
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        from fuzz.targets import MAX_LEN, TARGETS
    target = TARGETS.get(args.target)
    if target is None:
        sys.exit(f"unknown target {args.target!r}; known: {', '.join(TARGETS)}")
    if args.raw:
        atheris.Setup([sys.argv[0], *extra], target)
        atheris.Fuzz()
        return
    work = args.work or WORK_DIR / args.target
    work.mkdir(parents=True, exist_ok=True)
    crashes = work.parent / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    corpus = CORPUS_DIR / args.target
    flags = [f"-max_len={MAX_LEN[args.target]}", f"-artifact_prefix={crashes}/{args.target}-"]
    # A slow input is a finding too: no decoder should need a second for 16 KiB.
    flags.append("-timeout=10")
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    if args.seconds is not None:
        flags.append(f"-max_total_time={args.seconds}")
    program = sys.argv[0]
    if args.merge:
        dirs = [str(corpus), str(work)]
        flags.append("-merge=1")
        program = _merge_program(args.target, work)
    else:
        dirs = [str(work), str(corpus)]
    atheris.Setup([program, *flags, *extra, *dirs], target)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> None:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    if args.target == "list":
        from fuzz.targets import TARGETS

        sys.stdout.write("\n".join(TARGETS) + "\n")
        return
    if args.target != "all":
        _run_one(args, extra)
        return
    from fuzz.targets import TARGETS

    failed = []
    for name in TARGETS:
        command = [sys.executable, "-m", "fuzz", name]
        if args.runs is not None:
            command += ["--runs", str(args.runs)]
        if args.seconds is not None:
            command += ["--seconds", str(args.seconds)]
        if args.merge:
            command.append("--merge")
        if extra:
            command += ["--", *extra]
        sys.stdout.write(f"== {name}\n")
        sys.stdout.flush()
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
