"""SIGKILL at random points of a save (one rank, several ranks, local and S3) and of reshard and
consolidate: the previous checkpoint stays loadable bitwise, nothing partial is visible to load,
inspect, ls, consolidate, reshard or retention, and the next save (or rerun) succeeds.

tests/store/test_crash.py kills one process that writes every rank's shards; these tests kill
real rank processes (a file-based barrier between the phases, as the engine's collectives), pick
the victim at random, exercise retention (keep_last=2) and the root lock left by a dead rank 0.
The same harness functions, with larger counts, produce docs/reliability.md.
"""

from __future__ import annotations

import pytest

from tests.reliability._harness import crash_convert, crash_save

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("world", "kills"), [(1, 20), (3, 20)])
def test_sigkill_during_save_local(tmp_path, world, kills):
    out = crash_save(str(tmp_path / "root"), world=world, kills=kills, seed=world)
    assert out.runs == kills
    assert out.counts["previous checkpoint intact"] == kills
    assert out.counts["next save succeeded"] == kills
    # The kills did land inside saves, not only between them.
    assert out.counts["kill mid-save (uncommitted directory left, invisible)"] >= 2, out.counts


@pytest.mark.s3
def test_sigkill_during_save_s3_two_ranks(s3_bucket, moto_endpoint):
    out = crash_save(f"{s3_bucket}/root", world=2, kills=5, seed=7, s3_endpoint=moto_endpoint)
    assert out.counts["previous checkpoint intact"] == out.runs == 5
    assert out.counts["next save succeeded"] == 5


@pytest.mark.parametrize("kind", ["reshard", "consolidate", "consolidate-dir"])
def test_sigkill_during_reshard_and_consolidate(tmp_path, kind):
    out = crash_convert(kind, kills=8, seed=3, workdir=str(tmp_path))
    assert out.runs == 8
    assert out.counts["rerun succeeded"] == 8
    assert out.counts["half-written under the final name"] == 0
    # Some kills landed before the output was complete.
    assert out.counts["output absent (killed before the rename/commit)"] >= 1, out.counts
