import numpy as np
import pytest
import torch

from splitlora_mpi.aggregate import fedavg, flatten, mean_from_sum, unflatten, weighted_contribution, weighted_mean


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.lora_B.weight": torch.randn(3, 2, generator=g), "a.lora_A.weight": torch.randn(2, 5, generator=g)}


def test_flatten_unflatten_round_trip():
    s = _state(0)
    flat = flatten(s)
    assert flat.dtype == np.float64 and flat.size == 16
    back = unflatten(flat, s)
    assert back.keys() == s.keys()
    for k in s:
        assert back[k].dtype == s[k].dtype and torch.equal(back[k], s[k])


def test_unflatten_rejects_wrong_size():
    with pytest.raises(ValueError):
        unflatten(np.zeros(3), _state(0))


def test_weighted_mean_is_token_weighted():
    states, weights = [_state(i) for i in range(3)], [10.0, 30.0, 60.0]
    mean = weighted_mean(states, weights)
    for k in states[0]:
        expected = sum(w * s[k].double() for s, w in zip(states, weights)) / 100.0
        assert torch.allclose(mean[k].double(), expected, atol=1e-6)


def test_equal_states_are_a_fixed_point():
    s = _state(4)
    mean = weighted_mean([s, s], [1.0, 7.0])
    assert all(torch.equal(mean[k], s[k]) for k in s)


def test_fedavg_through_a_sum_equals_reference():
    states, weights = [_state(i) for i in range(4)], [5.0, 1.0, 2.0, 8.0]
    total = np.sum([weighted_contribution(s, w) for s, w in zip(states, weights)], axis=0)
    for s, w in zip(states, weights):
        out = fedavg(s, w, lambda buf: total)
        ref = mean_from_sum(total, s)
        assert all(torch.equal(out[k], ref[k]) for k in s)
    assert total[-1] == sum(weights)


def test_zero_weight_is_refused():
    with pytest.raises(ValueError):
        weighted_contribution(_state(0), 0)


def test_fedavg_by_key_averages_each_tensor_among_its_holders():
    """Per-client cut points: rank X holds a and b, rank Y only a, rank Z only b."""
    from splitlora_mpi.aggregate import fedavg_by_key

    full = _state(0)
    layout = {k: list(v.shape) for k, v in full.items()}
    a, b = "a.lora_A.weight", "b.lora_B.weight"
    held = {"X": _state(1), "Y": {a: _state(2)[a]}, "Z": {b: _state(3)[b]}}
    weights = {"X": 1.0, "Y": 3.0, "Z": 4.0}
    contributions = []

    def record(buf: np.ndarray) -> np.ndarray:
        contributions.append(buf)
        return buf

    for rank, state in held.items():  # first pass: collect what each rank adds to the Allreduce
        fedavg_by_key(state, dict.fromkeys(state, weights[rank]), layout, record)
    total = np.sum(contributions, axis=0)
    out = {rank: fedavg_by_key(s, dict.fromkeys(s, weights[rank]), layout, lambda _: total) for rank, s in held.items()}
    assert out["Y"].keys() == {a} and out["Z"].keys() == {b} and out["X"].keys() == {a, b}
    expect_a = (held["X"][a].double() * 1 + held["Y"][a].double() * 3) / 4
    expect_b = (held["X"][b].double() * 1 + held["Z"][b].double() * 4) / 5
    for rank in ("X", "Y"):
        assert torch.allclose(out[rank][a].double(), expect_a, rtol=1e-6)
    for rank in ("X", "Z"):
        assert torch.allclose(out[rank][b].double(), expect_b, rtol=1e-6)
