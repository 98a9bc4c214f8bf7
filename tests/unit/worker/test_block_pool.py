import pytest
from kvrelay_worker.engine.block_pool import BlockPool


def test_allocate_free_exact_ids_and_counts() -> None:
    pool = BlockPool(6)
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 0
    a = pool.allocate(2)
    assert a == [1, 2]
    b = pool.allocate(3)
    assert b == [3, 4, 5]
    assert pool.allocate(1) is None  # shortage is a normal outcome
    assert pool.usage == 1.0
    pool.incref(a)
    assert pool.ref_counts[1] == 2
    pool.free(a)
    assert pool.num_free_blocks == 0 and pool.ref_counts[1:3] == [1, 1]
    pool.free(a)
    assert pool.num_free_blocks == 2
    pool.free(b)
    # freed tail first: the next allocation gets the most recently freed tail blocks of `a` first
    assert pool.allocate(5) == [2, 1, 5, 4, 3]
    assert pool.ref_counts[0] == 0  # the null block is never handed out


def test_double_free_and_null_block_rejected() -> None:
    pool = BlockPool(3)
    ids = pool.allocate(1)
    assert ids is not None
    pool.free(ids)
    with pytest.raises(ValueError, match="double free"):
        pool.free(ids)
    with pytest.raises(ValueError):
        pool.free([0])
    with pytest.raises(ValueError, match="too small"):
        BlockPool(1)


def test_scheduler_side_imports_without_torch() -> None:
    """The scheduler, block pool and request types are pure: they work with torch unimportable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from kvrelay_worker.engine.scheduler import Scheduler, SchedulerConfig\n"
        "from kvrelay_worker.engine import Request, SamplingParams\n"
        "s = Scheduler(SchedulerConfig(num_blocks=8, block_size=4))\n"
        "s.add_request(Request('r', [1, 2, 3, 4, 5], SamplingParams(max_tokens=2), 0.0))\n"
        "out = s.schedule(0.0)\n"
        "assert [q.block_ids for q in out.seqs] == [[1, 2]], out\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
