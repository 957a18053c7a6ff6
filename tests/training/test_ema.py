"""EMA of weights against the closed form of an exponential moving average."""
import pytest
import torch
from torch import nn

from ldm.training import EMA


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_constant_decay_matches_closed_form():
    # shadow_n = d^n p_0 + sum_k (1-d) d^(n-k) p_k  (p_0: weights at construction)
    model, d = nn.Linear(3, 2), 0.9
    values = [0.5, -1.0, 2.0, 3.0, 0.25]
    set_weights(model, values[0])
    ema = EMA(model, d)
    for v in values[1:]:
        set_weights(model, v)
        ema.update()
    n = len(values) - 1
    expected = d ** n * values[0] + sum((1 - d) * d ** (n - k) * values[k] for k in range(1, n + 1))
    for s in ema.state_dict().values():
        torch.testing.assert_close(s, torch.full_like(s, expected), rtol=0, atol=1e-6)


def test_power_warmup_decay_sequence():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.999, power=0.5)
    decays = []
    for _ in range(4):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([0.0, 1 - 2 ** -0.5, 1 - 3 ** -0.5, 1 - 4 ** -0.5])
    # n = 0 uses decay 0: the first update copies the weights.
    set_weights(model, 7.0)
    fresh = EMA(model, 0.99, power=1.0)
    set_weights(model, 3.0)
    fresh.update()
    assert all(torch.all(s == 3.0) for s in fresh.state_dict().values())
    capped = EMA(model, 0.5, power=10.0)
    capped.num_updates = 5
    assert capped.current_decay() == 0.5           # min(decay, 1 - 6^-10)


def test_shadow_is_fp32_and_swap_restores_training_weights():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    set_weights(model, 1.0)
    ema = EMA(model, 0.5)
    set_weights(model, 3.0)
    ema.update()                                   # shadow = 0.5*1 + 0.5*3 = 2
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    with ema.swapped() as m:
        assert m is model and torch.all(model.weight == 2.0)
    assert torch.all(model.weight == 3.0)
    other = nn.Linear(4, 4)
    ema.copy_to(other)
    assert torch.all(other.weight == 2.0) and torch.all(other.bias == 2.0)


def test_frozen_parameters_not_tracked_and_state_round_trip():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = EMA(model, 0.9)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    ema.update()
    restored = EMA(model, 0.9)
    restored.load_state_dict(ema.state_dict(), num_updates=ema.num_updates)
    assert restored.num_updates == 1
    for k in ema.shadow:
        assert torch.equal(restored.shadow[k], ema.shadow[k])
    with pytest.raises(ValueError, match="1.weight"):
        restored.load_state_dict({"1.weight": torch.zeros(3, 2), "1.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)
