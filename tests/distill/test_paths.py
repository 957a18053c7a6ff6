"""Teacher-path fine-tuning (ldm/distill/paths.py): the kept states are DDIM's, the targets land on them."""
import pytest
import torch

from ldm.diffusion.param import ddim_step
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedules import schedule_from_config
from ldm.distill.paths import load_paths, path_batch, path_error, save_paths, teacher_path
from ldm.distill.targets import coefficients

SCHEDULE = schedule_from_config({"name": "cosine_logsnr"})


def toy_model(x, t, scale):
    """A nonlinear x0-model with a per-sample argument, so that states depend on every step."""
    return torch.tanh(x * scale.view(-1, 1, 1, 1)) * (1 - t.view(-1, 1, 1, 1)) + 0.1 * t.view(-1, 1, 1, 1)


def test_kept_states_are_ddim_on_the_grid_prefix():
    torch.manual_seed(0)
    noise, scale, ts = torch.randn(3, 2, 4, 4), torch.tensor([0.5, 1.0, 2.0]), SCHEDULE.timesteps(12)
    states = teacher_path(toy_model, noise, ts, SCHEDULE, keep=4, extra_args={"scale": scale})
    assert states.shape == (5, 3, 2, 4, 4)
    assert torch.equal(states[0], noise)
    for k in range(1, 5):                     # DDIM run to the k-th kept time, independently
        ref = sample_ddim(toy_model, noise, ts[: 3 * k + 1], SCHEDULE, extra_args={"scale": scale}, disable=True)
        torch.testing.assert_close(states[k], ref, rtol=0, atol=1e-6)


def test_one_student_step_with_the_target_lands_on_the_path():
    torch.manual_seed(1)
    states = torch.randn(9, 16, 2, 4, 4)      # any states: the target is algebra on them
    for steps in (1, 2, 4, 8):
        z_t, t, target, idx = path_batch(states, steps, SCHEDULE, batch=32)
        grid = SCHEDULE.timesteps(steps).float()
        i = torch.stack([(grid - v).abs().argmin() for v in t])          # the student step drawn
        stride = 8 // steps
        assert torch.equal(z_t, states[i * stride, idx])
        a, s = coefficients(SCHEDULE, t, z_t)
        a_n, s_n = coefficients(SCHEDULE, grid[i + 1], z_t)
        landed = ddim_step(z_t, target, a, s, a_n, s_n)
        torch.testing.assert_close(landed, states[(i + 1) * stride, idx], rtol=1e-4, atol=1e-4)
    assert len({int(v) for v in path_batch(states, 4, SCHEDULE, batch=64)[3]}) > 8   # paths vary


def test_path_error_is_the_mean_squared_gap_to_the_path_end():
    torch.manual_seed(2)
    noise, scale = torch.randn(5, 2, 4, 4), torch.tensor([0.5, 1.0, 2.0, 1.5, 0.8])
    states = teacher_path(toy_model, noise, SCHEDULE.timesteps(8), SCHEDULE, keep=4, extra_args={"scale": scale})
    # The drawing model on the drawing grid retraces its paths; batches of 2 must weigh paths alike.
    assert path_error(toy_model, states, 8, SCHEDULE, {"scale": scale}, batch=2) < 1e-10
    for steps in (1, 2):
        z = sample_ddim(toy_model, noise, SCHEDULE.timesteps(steps), SCHEDULE, extra_args={"scale": scale},
                        disable=True)
        expected = ((z - states[-1]) ** 2).mean().item()
        assert expected > 1e-4
        assert path_error(toy_model, states, steps, SCHEDULE, {"scale": scale}, batch=2) == pytest.approx(expected,
                                                                                                        rel=1e-5)


def test_grids_that_do_not_nest_are_refused():
    with pytest.raises(ValueError, match="divide"):
        teacher_path(toy_model, torch.zeros(1, 1, 2, 2), SCHEDULE.timesteps(10), SCHEDULE, keep=4,
                     extra_args={"scale": torch.ones(1)})
    with pytest.raises(ValueError, match="multiple"):
        path_batch(torch.zeros(5, 2, 1, 2, 2), 8, SCHEDULE, batch=2)


def test_paths_round_trip_through_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_paths(a, torch.randn(3, 2, 1, 2, 2), torch.tensor([0.5, 1.5]), ["a red circle", ""])
    save_paths(b, torch.randn(3, 1, 1, 2, 2), torch.tensor([3.0]), ["a blue square"])
    states, w, prompts = load_paths([a, b])
    assert states.shape == (3, 3, 1, 2, 2) and w.tolist() == [0.5, 1.5, 3.0]
    assert prompts == ["a red circle", "", "a blue square"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        load_paths([])
