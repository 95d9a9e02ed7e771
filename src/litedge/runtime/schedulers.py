"""Noise schedulers for the on-device denoising loop, in numpy (no torch, no diffusers).

Each scheduler reproduces one diffusers scheduler for the settings litedge's models use,
reads the ``scheduler_config.json`` diffusers writes, and shares one signature::

    scheduler = scheduler_from_config(json.load(open("scheduler/scheduler_config.json")))
    scheduler.set_timesteps(20)
    latents = noise * scheduler.init_noise_sigma                   # (B, C, H, W)
    for i, t in enumerate(scheduler.timesteps):
        eps = transformer(latents, t)                              # same shape as latents
        latents = scheduler.step(eps, i, latents)

Keys a scheduler does not know are ignored (as diffusers ignores them); a known setting
litedge does not implement raises :class:`LitedgeError` instead of computing something else.
``scale_model_input`` is the identity for all three diffusers schedulers here, so there
is none; ``init_noise_sigma`` is 1.0 for all three.

Coefficients are computed in float64; ``step`` returns the sample's own dtype.
Model outputs with learned sigma (2C channels) are split explicitly with
:func:`split_learned_sigma` before ``step``; ``step`` refuses them otherwise.
"""

from __future__ import annotations

import abc
import math
import typing
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import numpy as np

from litedge.errors import LitedgeError

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Spacing = Literal["linspace", "leading", "trailing"]
Prediction = Literal["epsilon", "v_prediction", "sample"]


def split_learned_sigma(model_output: np.ndarray, latent_channels: int) -> np.ndarray:
    """Keep the noise/data half of a learned-sigma output (PixArt, DiT: ``learned_sigma``).

    model_output: (B, 2*latent_channels, ...) -> (B, latent_channels, ...), the first half
    along axis 1; the predicted variance (second half) is not used by these ODE solvers.
    """
    channels = model_output.shape[1] if model_output.ndim > 1 else None
    if channels != 2 * latent_channels:
        raise LitedgeError(
            f"split_learned_sigma: expected {2 * latent_channels} channels on axis 1 "
            f"(2 x {latent_channels} latent channels), got shape {model_output.shape}; "
            "call it only for models with learned_sigma")
    return model_output[:, :latent_channels]


# -- config parsing ------------------------------------------------------------------------

def _check_value(owner: str, name: str, value, hint) -> object:
    """Validate one config value against its dataclass type hint; returns the stored value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        expected = f"one of {list(args)}"
    elif hint is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:  # tuple[float, ...] | None: trained_betas
        if value is None:
            return None
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            return tuple(float(v) for v in value)
        expected = "null or a list of numbers"
    raise LitedgeError(f"{owner}: {name}={value!r} is not supported; expected {expected}")


def _parse_config(owner: str, cls: type, fixed: dict[str, tuple], config: dict):
    """Build the frozen config dataclass ``cls`` from a diffusers config dict.

    Unknown keys are ignored; keys in ``fixed`` (diffusers settings litedge does not
    implement) must hold one of the listed values.
    """
    for key, allowed in fixed.items():
        if key in config and not any(config[key] == a and type(config[key]) is type(a) for a in allowed):
            raise LitedgeError(
                f"{owner}: {key}={config[key]!r} is not supported by litedge (supported: "
                f"{', '.join(map(repr, allowed))}); change it in the scheduler config or pick another scheduler")
    hints = typing.get_type_hints(cls)
    values = {f.name: _check_value(owner, f.name, config[f.name], hints[f.name])
              for f in fields(cls) if f.name in config}
    return cls(**values)


# -- shared pieces -------------------------------------------------------------------------

def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, schedule: str,
                    trained_betas: tuple[float, ...] | None) -> np.ndarray:
    """Training noise table abar_t = prod_{s<=t} (1 - beta_s): (num_train_timesteps,) float64.

    Built in float32, as diffusers builds it, so that the runtime reproduces diffusers'
    pipelines: near t = 0, 1 - abar cancels and float32 moves sigma by up to ~3e-4 relative
    there (the original PixArt/DiT code used float64). Everything downstream is float64.
    """
    if trained_betas is not None:
        if len(trained_betas) != num_train_timesteps:
            raise LitedgeError(f"trained_betas has {len(trained_betas)} values but num_train_timesteps is "
                               f"{num_train_timesteps}; make them agree in the scheduler config")
        betas = np.asarray(trained_betas, dtype=np.float32)
    elif schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    else:  # squaredcos_cap_v2: discretized cosine alpha_bar (GLIDE), each beta capped at 0.999
        t = np.arange(num_train_timesteps + 1) / num_train_timesteps
        alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    return np.cumprod(np.float32(1.0) - betas, dtype=np.float32).astype(np.float64)


class Scheduler(abc.ABC):
    """Common interface: ``from_config``, ``set_timesteps(n)``, ``step(output, i, sample)``.

    ``timesteps``: (n,) the values fed to the model at step i, in diffusers' units and dtype.
    """

    class_name: ClassVar[str]                 # diffusers' _class_name
    short_name: ClassVar[str]                 # litedge's name (bundle manifest "scheduler.type")
    config_class: ClassVar[type]              # the frozen dataclass of implemented settings
    _FIXED: ClassVar[dict[str, tuple]] = {}   # diffusers settings pinned to these values
    init_noise_sigma: ClassVar[float] = 1.0   # std of the initial noise: latents = noise * this

    def __init__(self, config) -> None:
        self.config = config
        self.timesteps = np.zeros(0)
        self.num_inference_steps = 0

    @classmethod
    def from_config(cls, config: dict) -> "Scheduler":
        """Build from a diffusers ``scheduler_config.json`` dict (unknown keys ignored)."""
        return cls(_parse_config(cls.class_name, cls.config_class, cls._FIXED, config))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Fill ``timesteps`` for ``num_inference_steps`` steps (an int >= 1) and reset state."""
        n = num_inference_steps
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise LitedgeError(f"{self.class_name}: num_inference_steps must be a positive integer, got {n!r}")
        self._set_timesteps(int(n))
        self.num_inference_steps = len(self.timesteps)

    @abc.abstractmethod
    def _set_timesteps(self, n: int) -> None:
        """Fill ``timesteps`` (and sigmas) for n >= 1 steps; clear multistep state."""

    @abc.abstractmethod
    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The sample after step i (0..n-1), from the model's output at ``timesteps[i]``."""

    def _check_step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> None:
        if not self.num_inference_steps:
            raise LitedgeError(f"{self.class_name}: call set_timesteps(n) before step()")
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < self.num_inference_steps:
            raise LitedgeError(f"{self.class_name}: step index {i} out of range 0..{self.num_inference_steps - 1}")
        if model_output.shape != sample.shape:
            hint = ""
            if model_output.ndim > 1 and sample.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]:
                hint = f"; a learned-sigma output: pass split_learned_sigma(model_output, {sample.shape[1]})"
            raise LitedgeError(f"{self.class_name}: model output shape {model_output.shape} "
                               f"!= sample shape {sample.shape}{hint}")


# -- DPM-Solver++ (2M) ---------------------------------------------------------------------

@dataclass(frozen=True)
class DPMSolverConfig:
    """The DPMSolverMultistepScheduler settings litedge implements (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: Prediction = "epsilon"
    solver_order: Literal[1, 2] = 2
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float = -math.inf
    timestep_spacing: Spacing = "linspace"
    steps_offset: int = 0


class DPMSolverMultistep(Scheduler):
    """DPM-Solver++ multistep (order 1 or 2, ODE, data prediction) = diffusers'
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``.

    Noise levels are VE sigmas ``s = sqrt((1 - abar) / abar)``; the VP pair is
    ``alpha = 1/sqrt(1+s^2)``, ``sigma = s*alpha`` and ``lambda = log(alpha/sigma) = -log s``.

    Multistep state: ``step(..., i, ...)`` keeps the data prediction of step i for step i+1.
    ``i == 0`` (or :meth:`reset`) starts a new trajectory; a trajectory may also start at any
    i > 0 after a reset (first-order first step, as diffusers). Calling ``step`` with an index
    that does not follow the previous one raises.
    """

    class_name = "DPMSolverMultistepScheduler"
    short_name = "dpmsolver++"
    config_class = DPMSolverConfig
    _FIXED = {"algorithm_type": ("dpmsolver++", "deis"), "thresholding": (False,),
              "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
              "use_flow_sigmas": (False,), "rescale_betas_zero_snr": (False,), "use_dynamic_shifting": (False,),
              # learned variance is split off explicitly with split_learned_sigma, never inside step
              "variance_type": (None, "learned", "learned_range")}

    def __init__(self, config: DPMSolverConfig) -> None:
        super().__init__(config)
        c = config
        self.alphas_cumprod = _alphas_cumprod(                              # (T,)
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        self.train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)  # (T,) VE sigma
        self.sigmas = np.zeros(0)                                           # (n+1,) after set_timesteps
        self._prev: tuple[int, np.ndarray] | None = None

    def reset(self) -> None:
        """Forget the previous model output (start a new trajectory)."""
        self._prev = None

    def _set_timesteps(self, n: int) -> None:
        c, T = self.config, self.config.num_train_timesteps
        if n > T:
            raise LitedgeError(f"{self.class_name}: {n} steps > num_train_timesteps={T}; use at most {T}")
        if c.use_karras_sigmas:
            sigmas, timesteps = self._karras(n)
        else:
            last = T - int(np.sum(-np.log(self.train_sigmas) < c.lambda_min_clipped))  # lambda clipping
            if c.timestep_spacing == "linspace":
                timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
            elif c.timestep_spacing == "leading":
                ratio = last // (n + 1)
                timesteps = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
            else:  # trailing
                timesteps = np.arange(last, 0, -T / n).round().astype(np.int64) - 1
            sigmas = self.train_sigmas[timesteps]
        final = self.train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, final)
        self.timesteps = timesteps
        self._prev = None

    def _karras(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Karras et al. (2022) rho=7 sigmas between the training extremes, and their timesteps."""
        rho, s_min, s_max = 7.0, self.train_sigmas[0], self.train_sigmas[-1]
        ramp = np.linspace(0, 1, n)
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        # timestep = position of log(sigma) in the (increasing) log training sigmas
        t = np.interp(np.log(sigmas), np.log(self.train_sigmas), np.arange(len(self.train_sigmas)))
        if self.config.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
        return sigmas, t.astype(np.int64)

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, s: float) -> np.ndarray:
        """x0 estimate from the model output at VE sigma ``s`` (float64 arrays)."""
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        sigma = s * alpha
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - sigma * model_output) / alpha
        if kind == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One DPM-Solver++ step from ``timesteps[i]`` to the next noise level.

        model_output, sample: same shape (B, C, H, W), any float dtype; returns the sample at
        step i+1 in ``sample.dtype``.
        """
        self._check_step(model_output, i, sample)
        if i == 0:
            self._prev = None
        if self._prev is not None and self._prev[0] != i - 1:
            raise LitedgeError(f"{self.class_name}: step({i}) after step({self._prev[0]}); run the steps in "
                               "order, or call reset() to start a new trajectory at this step")
        x = sample.astype(np.float64)
        d0 = self._data_prediction(model_output.astype(np.float64), x, self.sigmas[i])
        s0, s_next = self.sigmas[i], self.sigmas[i + 1]       # VE sigmas now and next
        alpha0, alpha_next = 1.0 / math.sqrt(1.0 + s0 * s0), 1.0 / math.sqrt(1.0 + s_next * s_next)
        ratio = s_next / s0                                     # exp(-h), h = lambda_next - lambda_i
        # first order: (sigma_next / sigma_i) x + alpha_next (1 - e^-h) D0, sigma = VP sigma
        out = (s_next * alpha_next) / (s0 * alpha0) * x + alpha_next * (1.0 - ratio) * d0

        c, n = self.config, self.num_inference_steps
        first_order_final = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        if c.solver_order == 2 and self._prev is not None and not first_order_final:
            h = math.log(s0 / s_next)
            r0 = math.log(self.sigmas[i - 1] / s0) / h          # h_prev / h
            d1 = (d0 - self._prev[1]) / r0
            if c.solver_type == "midpoint":
                out += 0.5 * alpha_next * (1.0 - ratio) * d1
            else:  # heun
                out += alpha_next * ((ratio - 1.0) / h + 1.0) * d1
        self._prev = (i, d0)
        return out.astype(sample.dtype)


# -- DDIM ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DDIMConfig:
    """The DDIMScheduler settings litedge implements (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: Prediction = "epsilon"
    timestep_spacing: Spacing = "leading"


class DDIM(Scheduler):
    """Deterministic DDIM (eta = 0) = diffusers' ``DDIMScheduler``.

    Stateless. As in diffusers, the step from timestep t goes to ``t - T // n`` whatever the
    spacing (``alphas_cumprod`` at 0 or 1.0, per ``set_alpha_to_one``, below zero).
    """

    class_name = "DDIMScheduler"
    short_name = "ddim"
    config_class = DDIMConfig
    _FIXED = {"thresholding": (False,), "rescale_betas_zero_snr": (False,)}

    def __init__(self, config: DDIMConfig) -> None:
        super().__init__(config)
        c = config
        self.alphas_cumprod = _alphas_cumprod(                 # (T,)
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        self.final_alpha_cumprod = 1.0 if c.set_alpha_to_one else float(self.alphas_cumprod[0])

    def _set_timesteps(self, n: int) -> None:
        c, T = self.config, self.config.num_train_timesteps
        if n > T:
            raise LitedgeError(f"{self.class_name}: {n} steps > num_train_timesteps={T}; use at most {T}")
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif c.timestep_spacing == "leading":
            timesteps = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + c.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        self.timesteps = timesteps

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One DDIM step from ``timesteps[i]``. Shapes as :meth:`DPMSolverMultistep.step`."""
        self._check_step(model_output, i, sample)
        c = self.config
        t = int(self.timesteps[i])
        t_prev = t - c.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else self.final_alpha_cumprod
        x, out = sample.astype(np.float64), model_output.astype(np.float64)
        if c.prediction_type == "epsilon":
            x0, eps = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out
        elif c.prediction_type == "v_prediction":
            x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out
            eps = math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x
        else:  # sample
            x0, eps = out, (x - math.sqrt(a_t) * out) / math.sqrt(1 - a_t)
        if c.clip_sample:  # eps is kept from before clipping, as diffusers does
            x0 = np.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return prev.astype(sample.dtype)


# -- flow matching, Euler --------------------------------------------------------------------

@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """The FlowMatchEulerDiscreteScheduler settings litedge implements (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0


class FlowMatchEuler(Scheduler):
    """Euler on the rectified-flow ODE (SD3, SD3.5) = diffusers' ``FlowMatchEulerDiscreteScheduler``.

    ``x_sigma = (1 - sigma) x0 + sigma noise``; the model predicts the velocity
    ``noise - x0``; ``timesteps = sigmas * num_train_timesteps`` (float32, 1000 -> ~0).
    Shifted sigmas: ``shift*s / (1 + (shift-1)*s)``. Stateless.
    """

    class_name = "FlowMatchEulerDiscreteScheduler"
    short_name = "flow-euler"
    config_class = FlowMatchEulerConfig
    _FIXED = {"use_dynamic_shifting": (False,), "invert_sigmas": (False,), "shift_terminal": (None, 0, 0.0),
              "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
              "stochastic_sampling": (False,)}

    def __init__(self, config: FlowMatchEulerConfig) -> None:
        super().__init__(config)
        self.sigmas = np.zeros(0)                                 # (n+1,) after set_timesteps

    def _shifted(self, s: np.ndarray | float):
        shift = self.config.shift
        return shift * s / (1 + (shift - 1) * s)

    def _set_timesteps(self, n: int) -> None:
        T = self.config.num_train_timesteps
        # diffusers: evenly spaced between the shifted training extremes, then shifted again
        s_max, s_min = self._shifted(1.0), self._shifted(1.0 / T)
        sigmas = self._shifted(np.linspace(s_max, s_min, n))
        self.sigmas = np.append(sigmas, 0.0)                       # (n+1,) float64
        self.timesteps = sigmas.astype(np.float32) * np.float32(T)  # (n,) float32, as diffusers

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One Euler step ``x + (sigma_{i+1} - sigma_i) * v``. Shapes as :meth:`DPMSolverMultistep.step`."""
        self._check_step(model_output, i, sample)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (sample.astype(np.float64) + dt * model_output.astype(np.float64)).astype(sample.dtype)


# -- registry --------------------------------------------------------------------------------

SCHEDULERS: dict[str, type[Scheduler]] = {
    name: cls for cls in (DPMSolverMultistep, DDIM, FlowMatchEuler) for name in (cls.class_name, cls.short_name)
}


def scheduler_from_config(config: dict, name: str | None = None) -> Scheduler:
    """A scheduler for a diffusers scheduler config: by ``name`` (a key of :data:`SCHEDULERS`,
    e.g. the bundle manifest's ``scheduler.type``) or else by the config's ``_class_name``.
    ``set_timesteps`` must still be called."""
    key = name if name is not None else config.get("_class_name")
    if key not in SCHEDULERS:
        source = f"name {name!r}" if name is not None else f"_class_name {key!r}"
        raise LitedgeError(f"unknown scheduler {source}; expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[key].from_config(config)
