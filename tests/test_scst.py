import numpy as np
import pytest

from caption_attn.scst import advantages


def test_mean_baseline_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 6.0], [0.5, 0.5, 0.5]])
    got = advantages(rewards, "mean")
    want = [[1 - 4, 2 - 3.5, 6 - 1.5], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=1), [(3 * 9 - 3 * 9) / 2, 0.0], atol=1e-12)


def test_greedy_baseline_subtracts_the_greedy_reward():
    rewards = np.array([[1.0, 2.0, 6.0], [0.5, 0.0, 0.25]])
    got = advantages(rewards, "greedy", greedy_rewards=np.array([2.0, 0.5]))
    np.testing.assert_array_equal(got, [[-1.0, 0.0, 4.0], [0.0, -0.5, -0.25]])


def test_advantage_refusals():
    with pytest.raises(ValueError, match=r"`baseline` \"mean\" needs K >= 2.*K=1"):
        advantages(np.ones((2, 1)), "mean")
    with pytest.raises(ValueError, match=r"`baseline` must be one of .*'max'"):
        advantages(np.ones((2, 3)), "max")
    with pytest.raises(ValueError, match=r"`baseline` \"greedy\" needs `greedy_rewards`"):
        advantages(np.ones((2, 3)), "greedy")
    with pytest.raises(ValueError, match=r"`greedy_rewards` must have shape \(B,\) = \(2,\)"):
        advantages(np.ones((2, 3)), "greedy", greedy_rewards=np.ones(3))
    with pytest.raises(ValueError, match="`greedy_rewards` is for"):
        advantages(np.ones((2, 3)), "mean", greedy_rewards=np.ones(2))
