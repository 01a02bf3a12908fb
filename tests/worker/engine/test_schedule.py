import numpy as np
import pytest

from worker.engine import schedule
from worker.engine.schedule import MAX_STEPS, NoiseConfig, Scheduler

STEPS = (1, 4, 20, 37, 150)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("scheduler", [Scheduler.euler, Scheduler.ddim, Scheduler.dpmpp_2m_karras])
@pytest.mark.parametrize("steps", STEPS)
def test_tables_match_diffusers_pytorch(reference, scheduler, steps, spacing):
    table = schedule.build(NoiseConfig(timestep_spacing=spacing), scheduler, steps)
    prefix = f"table/{scheduler.value}/{spacing}/{steps}"
    np.testing.assert_array_equal(table.timesteps[:steps], reference[f"{prefix}/timesteps"])
    if f"{prefix}/sigmas" in reference:  # DDIM keeps no sigmas table
        np.testing.assert_allclose(
            table.sigmas[:steps], reference[f"{prefix}/sigmas"][:steps], rtol=1e-5
        )  # float32 cumprod order
    if scheduler is Scheduler.euler:  # the only one whose initial sample is scaled in diffusers' own space
        assert table.init_scale == pytest.approx(float(reference[f"{prefix}/init_noise_sigma"]), rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("scheduler", [Scheduler.euler_ancestral, Scheduler.lcm])
@pytest.mark.parametrize("steps", (1, 2, 4, 8, 20))
def test_few_step_tables_match_diffusers_pytorch(sampling, scheduler, steps, spacing):
    table = schedule.build(NoiseConfig(timestep_spacing=spacing), scheduler, steps)
    prefix = f"table/{scheduler.value}/{spacing}/{steps}"
    np.testing.assert_array_equal(table.timesteps[:steps], sampling[f"{prefix}/timesteps"])
    if f"{prefix}/sigmas" in sampling:  # LCM keeps none
        np.testing.assert_allclose(table.sigmas[:steps], sampling[f"{prefix}/sigmas"][:steps], rtol=1e-5)
        assert table.init_scale == pytest.approx(float(sampling[f"{prefix}/init_noise_sigma"]), rel=1e-6)


def test_a_skipped_start_shifts_the_tables_and_restarts_dpm_at_first_order():
    full = schedule.build(NoiseConfig(), Scheduler.dpmpp_2m_karras, 10)
    late = schedule.build(NoiseConfig(), Scheduler.dpmpp_2m_karras, 10, start=4)
    assert late.steps == 6
    np.testing.assert_array_equal(late.timesteps[:6], full.timesteps[4:10])
    assert late.c[0] == 0 and full.c[4] != 0  # no history at the first step run
    np.testing.assert_array_equal(late.c[1:5], full.c[5:9])
    assert late.image_scale == pytest.approx(full.sigmas[4])
    assert (late.blend[:6] == 1).all() and (late.blend[6:] == 0).all()


def test_strength_skips_steps_as_diffusers():
    assert [schedule.skipped_steps(6, s) for s in (0.3, 0.75, 0.9999, 1.0)] == [5, 2, 1, 0]


def test_lcm_refuses_more_steps_than_its_grid():
    with pytest.raises(schedule.ScheduleError, match="steps: LCM runs at most 50") as err:
        schedule.build(NoiseConfig(), Scheduler.lcm, 51)
    assert err.value.field == "steps" and err.value.message.startswith("LCM runs at most 50")


def test_ddim_linspace_rounds_where_truncating_would_be_off_by_one(reference):
    # 20 steps over 0..999: 999 * k / 19 has fractional parts above .5 for many k; a truncating table misses
    truncated = np.linspace(0, 999, 20, dtype=np.float32)[::-1].astype(np.int64)
    want = reference["table/ddim/linspace/20/timesteps"]
    assert not np.array_equal(truncated, want)
    np.testing.assert_array_equal(
        schedule.build(NoiseConfig(timestep_spacing="linspace"), "ddim", 20).timesteps[:20], want
    )


def test_padding_steps_are_identity():
    table = schedule.build(NoiseConfig(), Scheduler.dpmpp_2m_karras, 10)
    assert table.a.shape == (MAX_STEPS,)
    assert (table.a[10:] == 1).all() and (table.b[10:] == 0).all() and (table.c[10:] == 0).all()
    # DPM++ 2M: first and last steps first order, the rest use the previous estimate
    assert table.c[0] == 0 and table.c[9] == 0 and (table.c[1:9] != 0).all()


@pytest.mark.parametrize("steps", [0, MAX_STEPS + 1, -3])
def test_steps_out_of_range(steps):
    with pytest.raises(schedule.ScheduleError, match="steps: must be between 1 and 150") as err:
        schedule.build(NoiseConfig(), Scheduler.euler, steps)
    assert err.value.field == "steps"


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseConfig.from_diffusers({"prediction_type": "flow"})
