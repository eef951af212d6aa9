"""A short coverage-guided run of every fuzz target, and a replay of the corpus.

Each target runs for a second under atheris in its own process (libFuzzer
takes over the process and exits), from the repository's corpus into a
temporary work directory; any exception other than the declared InputError
tree, or a broken invariant, makes libFuzzer exit non-zero and write the
input beside the work directory. The million-input runs are in
bench/RESULTS.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fuzz.seeds import seeds
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
# Thousands of mutated inputs even on a loaded machine; start-up (~1.5 s, most
# of it instrumenting the imported modules) costs more than the run itself.
SECONDS_PER_TARGET = 1
# Two at a time (the machine CI runs on has two cores): the thirteen targets
# then take ~25 s instead of ~50.
PARALLEL = 2


def _run(target: str, tmp: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    work = tmp / target / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "fuzz", target, "--seconds", str(SECONDS_PER_TARGET)]
    command += ["--work", str(work)]
    done = subprocess.run(
        command, cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return done, sorted(p.name for p in (tmp / target / "crashes").glob("*"))


@pytest.fixture(scope="module")
def short_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], list[str]]]:
    # The replay below needs no atheris; only these runs do.
    pytest.importorskip("atheris", reason="atheris (the fuzz extra) is not installed")
    tmp = tmp_path_factory.mktemp("fuzz")
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        runs = {target: pool.submit(_run, target, tmp) for target in TARGETS}
    return {target: future.result() for target, future in runs.items()}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_fuzz_run_finds_nothing(target: str, short_runs) -> None:
    done, crashes = short_runs[target]
    assert done.returncode == 0, f"{target}: {crashes}\n{done.stderr[-4000:]}"
    assert not crashes
    runs = re.search(r"^#(\d+)\s+DONE\s+cov: (\d+)", done.stderr, re.MULTILINE)
    assert runs is not None, done.stderr[-2000:]
    # More inputs than the corpus holds: the fuzzer mutated, not only replayed.
    assert int(runs.group(1)) > len(list((CORPUS / target).iterdir()))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays_without_errors(target: str) -> None:
    """Every stored input (seeds and findings) through its harness, in this process."""
    files = sorted((CORPUS / target).iterdir())
    assert files, f"no corpus for {target}"
    for path in files:
        TARGETS[target](path.read_bytes())


def test_seed_corpus_is_what_the_encoders_write() -> None:
    """The committed seeds are current: rerun `python -m fuzz.seeds` after changing a message."""
    for target, found in seeds().items():
        for name, data in found:
            path = CORPUS / target / f"seed-{name}"
            assert path.read_bytes() == data, f"{path} is stale"
