import torch
from kvrelay_worker.engine.sampler import sample
from kvrelay_worker.engine.sampling_params import SamplingParams


def _logits() -> torch.Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3


def test_greedy_and_degenerate_filters_pick_argmax() -> None:
    logits = _logits()
    argmax = logits.argmax(-1).tolist()
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=3),
        SamplingParams(temperature=1e-4, seed=4),
    ]
    assert sample(logits, params, [0, 0, 0, 0]) == argmax


def test_seed_is_reproducible_and_step_dependent() -> None:
    logits = _logits()[:1].repeat(1, 1)
    p = SamplingParams(temperature=1.5, seed=7)
    draws = [sample(logits, [p], [step])[0] for step in range(20)]
    again = [sample(logits, [p], [step])[0] for step in range(20)]
    assert draws == again
    assert len(set(draws)) > 1  # a varying step gives varying draws


def test_top_k_restricts_support() -> None:
    logits = _logits()[:1]
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=3)
    seen = {sample(logits, [p], [0])[0] for _ in range(200)}
    assert seen <= top3 and len(seen) > 1


def test_top_p_restricts_support() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]])
    p = SamplingParams(temperature=1.0, top_p=0.9)
    seen = {sample(logits, [p], [0])[0] for _ in range(200)}
    assert seen == {0, 1}


def test_seeded_draw_is_a_function_of_seed_and_output_index_only() -> None:
    """A resumed request at index k draws what the original would have, whatever ran before it here."""
    logits = _logits()[:1]
    p = SamplingParams(temperature=1.5, seed=7)
    straight = [sample(logits, [p], [k])[0] for k in range(24)]
    torch.manual_seed(123)  # the global RNG plays no part
    backwards = [sample(logits, [p], [k])[0] for k in reversed(range(24))][::-1]
    assert straight == backwards
    # output_offset: a worker that sees the request from index 10 on counts its own steps from 0
    resumed = SamplingParams(temperature=1.5, seed=7, output_offset=10)
    assert [sample(logits, [resumed], [k])[0] for k in range(14)] == straight[10:]
    # a row's draw does not depend on the rows sharing the batch
    other = SamplingParams(temperature=1.0, seed=8)
    batch = logits.repeat(2, 1)
    assert [sample(batch, [other, resumed], [3, k])[1] for k in range(14)] == straight[10:]


def test_seeded_draw_in_a_fresh_process_matches() -> None:
    """Index 17 drawn in a process that never ran indices 0..16 equals the one drawn after them."""
    import subprocess
    import sys

    logits = _logits()[:1]
    p = SamplingParams(temperature=1.5, seed=99)
    here = [sample(logits, [p], [k])[0] for k in range(18)][17]
    code = (
        "import torch; from kvrelay_worker.engine.sampler import sample; "
        "from kvrelay_worker.engine.sampling_params import SamplingParams as S; "
        "l = (torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3)[:1]; "
        "print(sample(l, [S(temperature=1.5, seed=99, output_offset=15)], [2])[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert int(out.stdout.strip()) == here


def test_draw_seeds_differ_across_seeds_and_indices() -> None:
    from kvrelay_worker.engine.sampler import draw_seed

    seeds = {draw_seed(s, k) for s in (-1, 0, 1, 2, 2**40) for k in range(200)}
    assert len(seeds) == 5 * 200 and all(0 <= x < 2**63 for x in seeds)
