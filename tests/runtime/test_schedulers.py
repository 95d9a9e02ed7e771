"""The numpy schedulers against diffusers' own, step by step, on the same trajectories."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
)

from litedge.errors import LitedgeError
from litedge.runtime.schedulers import (
    DDIM, SCHEDULERS, DPMSolverKarras, DPMSolverMultistep, EulerAncestral, EulerDiscrete, FlowMatchEuler,
    UniPCMultistep, scheduler_from_config, split_learned_sigma,
)

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS scheduler/scheduler_config.json
PIXART_SIGMA = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "lambda_min_clipped": float("-inf"),
    "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None,
}
# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
# facebook/DiT-XL-2-256 style DDIM, and a Stable Diffusion 1.x style one
DIT_DDIM = {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "set_alpha_to_one": True, "steps_offset": 0}
SD_DDIM = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}

CASES = {  # id -> (litedge class, diffusers class, config, steps)
    "pixart-sigma": (DPMSolverMultistep, DPMSolverMultistepScheduler, PIXART_SIGMA, 20),
    "pixart-sigma-7": (DPMSolverMultistep, DPMSolverMultistepScheduler, PIXART_SIGMA, 7),
    "dpm-v-trailing-heun-sigma_min": (DPMSolverMultistep, DPMSolverMultistepScheduler, {
        **PIXART_SIGMA, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
        "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 20),
    "dpm-scaled-karras-leading": (DPMSolverMultistep, DPMSolverMultistepScheduler, {
        **PIXART_SIGMA, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}, 20),
    "dpm-cosine-clipped-sample-euler": (DPMSolverMultistep, DPMSolverMultistepScheduler, {
        **PIXART_SIGMA, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
        "prediction_type": "sample", "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
    "dpm-order1-leading": (DPMSolverMultistep, DPMSolverMultistepScheduler, {
        **PIXART_SIGMA, "solver_order": 1, "timestep_spacing": "leading"}, 20),
    "ddim-dit": (DDIM, DDIMScheduler, DIT_DDIM, 20),
    "ddim-sd": (DDIM, DDIMScheduler, SD_DDIM, 20),
    "ddim-v-trailing-clip": (DDIM, DDIMScheduler, {
        "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 20),
    "ddim-sample-linspace": (DDIM, DDIMScheduler, {
        **DIT_DDIM, "prediction_type": "sample", "timestep_spacing": "linspace"}, 20),
    "flow-sd3": (FlowMatchEuler, FlowMatchEulerDiscreteScheduler, SD3, 20),
    "flow-sd3-7": (FlowMatchEuler, FlowMatchEulerDiscreteScheduler, SD3, 7),
    "flow-unshifted": (FlowMatchEuler, FlowMatchEulerDiscreteScheduler, {"shift": 1.0}, 20),
    "dpm-karras-variant": (DPMSolverKarras, DPMSolverMultistepScheduler, {**PIXART_SIGMA, "use_karras_sigmas": True}, 20),
    "unipc-from-pixart": (UniPCMultistep, UniPCMultistepScheduler, PIXART_SIGMA, 20),  # midpoint reads as bh2
    "unipc-7": (UniPCMultistep, UniPCMultistepScheduler, {}, 7),
    # bh1 with a final sigma of 0: diffusers' last step is NaN (B(h) = -inf), ours lands on x0; compared at sigma_min
    "unipc-bh1-order3-v-trailing": (UniPCMultistep, UniPCMultistepScheduler, {
        "solver_type": "bh1", "solver_order": 3, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
        "final_sigmas_type": "sigma_min"}, 20),
    "unipc-order1-leading-scaled": (UniPCMultistep, UniPCMultistepScheduler, {
        **SD_DDIM, "solver_order": 1, "timestep_spacing": "leading"}, 20),
    "unipc-sample-sigma_min-no-lower-final": (UniPCMultistep, UniPCMultistepScheduler, {
        "prediction_type": "sample", "final_sigmas_type": "sigma_min", "lower_order_final": False}, 20),
    "euler-pixart": (EulerDiscrete, EulerDiscreteScheduler, PIXART_SIGMA, 20),
    "euler-sd-leading-v": (EulerDiscrete, EulerDiscreteScheduler, {
        **SD_DDIM, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, 20),
    "euler-karras-sample": (EulerDiscrete, EulerDiscreteScheduler, {
        "use_karras_sigmas": True, "prediction_type": "sample"}, 20),
    "euler-trailing-sigma_min-7": (EulerDiscrete, EulerDiscreteScheduler, {
        "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 7),
    "euler-ancestral-pixart": (EulerAncestral, EulerAncestralDiscreteScheduler, PIXART_SIGMA, 20),
    "euler-ancestral-sd-leading-v": (EulerAncestral, EulerAncestralDiscreteScheduler, {
        **SD_DDIM, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, 20),
}

SHAPE = (2, 4, 8, 8)


def toy_model(ref, prediction: str):
    """A fixed, nonlinear model of the sample and the timestep, so each trajectory feeds
    back into its own outputs: a data estimate x0 = tanh(alpha x) + 0.1 n cos(t / 150)
    (n fixed noise) given in the scheduler's parameterization, using the reference's
    noise table, so trajectories stay at realistic magnitudes. float32 in, float32 out."""
    noise = 0.1 * np.random.default_rng(7).standard_normal(SHAPE)

    def model(x: np.ndarray, t) -> np.ndarray:
        t = float(t)
        if isinstance(ref, FlowMatchEulerDiscreteScheduler):
            alpha, sigma = 1.0 - t / 1000.0, t / 1000.0   # x = (1-s) x0 + s noise
        else:
            abar = float(ref.alphas_cumprod[int(t)])
            alpha, sigma = abar**0.5, (1.0 - abar) ** 0.5  # x = alpha x0 + sigma eps
        x = x.astype(np.float64)
        x0 = np.tanh(alpha * x) + noise * np.cos(t / 150.0)
        eps = (x - alpha * x0) / sigma
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0, "flow": eps - x0}
        return out[prediction].astype(np.float32)

    return model


def _same_noise_as_ours(monkeypatch, seed: int):
    """diffusers' Euler-ancestral draws its step noise from numpy's default_rng(seed), as ours does."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    rng = np.random.default_rng(seed)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(
        rng.standard_normal(tuple(shape), dtype=np.float32)))
    return np.random.default_rng(seed)


def _vp_scale(scheduler, i: int) -> float:
    """1 / sqrt(sigma_i^2 + 1) for the Euler schedulers, whose samples live at VE scale (|x| up to
    sigma_max ~ 157, where float32 itself rounds by 1e-5): errors are compared at the scale the
    model sees, as for the other schedulers (1)."""
    if isinstance(scheduler, EulerDiscrete):
        return 1.0 / float(np.sqrt(scheduler.sigmas[i] ** 2 + 1))
    return 1.0


@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_step_by_step(case, monkeypatch):
    ours_cls, ref_cls, config, steps = CASES[case]
    ours, ref = ours_cls.from_config(config), ref_cls.from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    if getattr(ours.config, "use_karras_sigmas", False) and isinstance(ours, EulerDiscrete):
        # fractional positions of the Karras sigmas in the log-sigma table: torch's float32 cumprod
        # and linspace differ from numpy's by an ulp, which moves a position by up to 2e-4 (of 1000)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-3)
    else:
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype == ref.timesteps.numpy().dtype
    assert ours.init_noise_sigma == pytest.approx(float(getattr(ref, "init_noise_sigma", 1.0)), rel=1e-6)
    if ours_cls is EulerAncestral:
        ours.generator = _same_noise_as_ours(monkeypatch, seed=11)

    model = toy_model(ref, "flow" if ours_cls is FlowMatchEuler else ours.config.prediction_type)
    x_ours = (np.random.default_rng(0).standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    for i, t in enumerate(ref.timesteps):  # the model sees scale_model_input's sample (Euler: x / sqrt(s^2 + 1))
        scale = getattr(ref, "scale_model_input", lambda x, t: x)  # FlowMatchEuler has none
        out_ref = model(scale(x_ref, t).numpy(), t)
        x_ref = ref.step(torch.from_numpy(out_ref), t, x_ref).prev_sample
        x_ours = ours.step(model(ours.scale_model_input(x_ours, i), ours.timesteps[i]), i, x_ours)
        assert x_ours.dtype == np.float32
        err = np.abs(x_ours - x_ref.numpy()).max() * _vp_scale(ours, i + 1)
        assert err < 1e-5, f"step {i}: max abs error {err:.2e}"
    assert np.isfinite(x_ours).all() and np.abs(x_ours).max() > 0.1


def test_single_step_is_the_data_prediction():
    """One step from t=999 lands on x0 = (x - sigma eps) / alpha with alpha = 0.0064.
    diffusers forms x - sigma eps in float32 and loses ~1e-4 there to cancellation; this
    scheduler works in float64 and matches the exact value to float32 rounding."""
    ours, ref = DPMSolverMultistep.from_config(PIXART_SIGMA), DPMSolverMultistepScheduler.from_config(PIXART_SIGMA)
    ours.set_timesteps(1)
    ref.set_timesteps(1)
    assert list(ours.timesteps) == list(ref.timesteps.numpy()) == [999]
    model = toy_model(ref, "epsilon")
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    eps = model(x, 999)
    abar = ours.alphas_cumprod[999]
    exact = (x.astype(np.float64) - (1 - abar) ** 0.5 * eps) / abar**0.5
    np.testing.assert_allclose(ours.step(eps, 0, x), exact, rtol=1e-6, atol=1e-6)
    expected = ref.step(torch.from_numpy(eps), 999, torch.from_numpy(x)).prev_sample.numpy()
    np.testing.assert_allclose(ours.step(eps, 0, x), expected, atol=1e-4)


def test_multistep_state_restarts_at_zero_and_refuses_skips():
    s = DPMSolverMultistep.from_config(PIXART_SIGMA)
    s.set_timesteps(10)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    model = np.tanh

    def run(n):
        y = x
        for i in range(n):
            y = s.step(model(y), i, y)
        return y

    first, second = run(10), run(10)  # the second run starts at i=0: history reset
    np.testing.assert_array_equal(first, second)
    s.step(model(x), 0, x)
    with pytest.raises(LitedgeError, match="reset"):
        s.step(model(x), 3, x)
    s.reset()  # a trajectory may start mid-schedule (img2img) after reset()
    s.step(model(x), 3, x)


def test_split_learned_sigma():
    out = np.arange(2 * 8 * 3 * 3, dtype=np.float32).reshape(2, 8, 3, 3)
    np.testing.assert_array_equal(split_learned_sigma(out, 4), out[:, :4])
    with pytest.raises(LitedgeError, match="expected 8 channels"):
        split_learned_sigma(out[:, :4], 4)
    s = DPMSolverMultistep.from_config(PIXART_SIGMA)
    s.set_timesteps(4)
    with pytest.raises(LitedgeError, match="split_learned_sigma"):
        s.step(out, 0, out[:, :4])


@pytest.mark.parametrize("cls", [DPMSolverMultistep, DDIM, FlowMatchEuler, UniPCMultistep, EulerDiscrete,
                                 EulerAncestral])
@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_invalid_steps(cls, steps):
    with pytest.raises(LitedgeError, match="num_inference_steps"):
        cls.from_config({}).set_timesteps(steps)


def test_step_errors():
    s = FlowMatchEuler.from_config(SD3)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(LitedgeError, match="set_timesteps"):
        s.step(x, 0, x)
    s.set_timesteps(3)
    with pytest.raises(LitedgeError, match="out of range"):
        s.step(x, 3, x)
    with pytest.raises(LitedgeError, match="num_train_timesteps"):
        DDIM.from_config({}).set_timesteps(1001)


@pytest.mark.parametrize("name, config, message", [
    ("dpmsolver++", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+' is not supported"),
    ("dpmsolver++", {"solver_order": 3}, "solver_order=3"),
    ("dpmsolver++", {"thresholding": True}, "thresholding=True"),
    ("dpmsolver++", {"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ("dpmsolver++", {"use_lu_lambdas": True}, "use_lu_lambdas=True"),
    ("ddim", {"timestep_spacing": "uniform"}, "timestep_spacing='uniform'"),
    ("ddim", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
    ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ("flow-euler", {"use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
    ("flow-euler", {"shift": "3"}, "shift='3'"),
])
def test_unsupported_config_raises_one_line(name, config, message):
    with pytest.raises(LitedgeError, match=message) as info:
        scheduler_from_config(config, name)
    assert "\n" not in str(info.value)


def test_registry_and_unknown_keys():
    assert isinstance(scheduler_from_config(PIXART_SIGMA), DPMSolverMultistep)
    assert isinstance(scheduler_from_config({**SD3, "some_future_key": 1}), FlowMatchEuler)
    assert isinstance(scheduler_from_config(PIXART_SIGMA, "ddim"), DDIM)  # name wins, as DDIM.from_config
    assert SCHEDULERS["ddim"] is SCHEDULERS["DDIMScheduler"] is DDIM
    assert set(SCHEDULERS) == {"DPMSolverMultistepScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler",
                               "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                               "dpmsolver++", "dpmsolver++-karras", "ddim", "flow-euler", "unipc", "euler",
                               "euler-ancestral"}
    assert isinstance(scheduler_from_config({"_class_name": "EulerDiscreteScheduler"}), EulerDiscrete)
    karras = scheduler_from_config(PIXART_SIGMA, "dpmsolver++-karras")
    assert karras.config.use_karras_sigmas and not DPMSolverMultistep.from_config(PIXART_SIGMA).config.use_karras_sigmas
    with pytest.raises(LitedgeError, match="unknown scheduler"):
        scheduler_from_config({"_class_name": "HeunDiscreteScheduler"})
    with pytest.raises(LitedgeError, match="unknown scheduler"):
        scheduler_from_config({})


def test_imports_without_torch():
    code = ("import sys\n"
            "for m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None\n"
            "import numpy as np\n"
            "from litedge.runtime.schedulers import scheduler_from_config\n"
            "s = scheduler_from_config({'_class_name': 'DPMSolverMultistepScheduler'})\n"
            "s.set_timesteps(2)\n"
            "x = np.ones((1, 4, 2, 2), np.float32)\n"
            "print(s.step(x, 0, x).dtype)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "float32"


def test_euler_ancestral_noise_per_row_from_its_own_generator():
    """Row b of a batch run with generators [g0, g1] equals a batch-1 run with g_b alone."""
    s = EulerAncestral.from_config(PIXART_SIGMA)
    s.set_timesteps(6)
    x = (np.random.default_rng(2).standard_normal((2, 4, 4, 4)) * s.init_noise_sigma).astype(np.float32)

    def run(rows: np.ndarray, seeds: list[int]) -> np.ndarray:
        s.generator = [np.random.default_rng(k) for k in seeds]
        for i in range(s.num_inference_steps):
            rows = s.step(np.tanh(s.scale_model_input(rows, i)), i, rows)
        return rows

    batch = run(x, [5, 9])
    np.testing.assert_array_equal(batch[1:], run(x[1:], [9]))
    np.testing.assert_array_equal(batch[:1], run(x[:1], [5]))
    assert not np.allclose(batch, run(x, [5, 10]))
    s.generator = [np.random.default_rng(0)]
    with pytest.raises(LitedgeError, match="1 generators for a batch of 2"):
        s.step(x, 0, x)


def test_scale_model_input_is_the_identity_except_for_euler():
    x = np.full(SHAPE, 3.0, np.float32)
    for cls in (DPMSolverMultistep, DDIM, FlowMatchEuler, UniPCMultistep):
        s = cls.from_config({})
        s.set_timesteps(4)
        assert s.scale_model_input(x, 0) is x and s.init_noise_sigma == 1.0
    e = EulerDiscrete.from_config(PIXART_SIGMA)
    e.set_timesteps(4)
    np.testing.assert_allclose(e.scale_model_input(x, 0), x / np.sqrt(e.sigmas[0] ** 2 + 1), rtol=1e-6)
    assert e.scale_model_input(x, 0).dtype == np.float32 and e.init_noise_sigma == pytest.approx(e.sigmas[0])
