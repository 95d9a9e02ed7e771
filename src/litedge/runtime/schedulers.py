"""Noise schedulers for the on-device denoising loop, in numpy (no torch, no diffusers).

Each scheduler reproduces one diffusers scheduler for the settings litedge's models use,
reads the ``scheduler_config.json`` diffusers writes, and shares one signature::

    scheduler = scheduler_from_config(json.load(open("scheduler/scheduler_config.json")))
    scheduler.set_timesteps(20)
    latents = noise * scheduler.init_noise_sigma                   # (B, C, H, W)
    for i, t in enumerate(scheduler.timesteps):
        eps = transformer(scheduler.scale_model_input(latents, i), t)  # same shape as latents
        latents = scheduler.step(eps, i, latents)

Keys a scheduler does not know are ignored (as diffusers ignores them); a known setting
litedge does not implement raises :class:`LitedgeError` instead of computing something else.

The loop is the same for every scheduler: ``init_noise_sigma`` (set by ``set_timesteps``)
scales the initial noise, ``scale_model_input(x, i)`` is what the model sees at step i
(the identity except for the Euler schedulers, which divide by ``sqrt(sigma_i^2 + 1)``),
and a stochastic scheduler (Euler-ancestral) draws its noise from ``scheduler.generator``:
one ``numpy.random.Generator``, or a list of them, one per batch row (row b's noise from
generator b, so image b of a batch equals a batch-1 run with that generator).

=====================  ===================================  ==========================
litedge name           diffusers class                      kind
=====================  ===================================  ==========================
``dpmsolver++``        DPMSolverMultistepScheduler          multistep ODE, order 1-2
``dpmsolver++-karras`` the same, ``use_karras_sigmas=True``
``unipc``              UniPCMultistepScheduler              multistep ODE, bh1/bh2
``euler``              EulerDiscreteScheduler               ODE, scaled model input
``euler-ancestral``    EulerAncestralDiscreteScheduler      SDE (noise every step)
``ddim``               DDIMScheduler                        ODE (eta 0)
``flow-euler``         FlowMatchEulerDiscreteScheduler      rectified flow (SD3)
=====================  ===================================  ==========================

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


def _multistep_timesteps(last: int, T: int, n: int, spacing: str, offset: int) -> np.ndarray:
    """The n integer timesteps (n,) int64 of the multistep solvers (DPM-Solver, UniPC), as diffusers
    spaces them: ``linspace`` over n+1 points dropping the last, ``leading``, ``trailing``."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(last, 0, -T / n).round().astype(np.int64) - 1  # trailing


def _refuse_repeated_timesteps(scheduler: "Scheduler", n: int) -> None:
    """Refuse ``n`` steps whose integer timesteps repeat (rounding ``n`` points onto fewer
    training timesteps: a zero-length step divides by zero), naming the most that do not."""
    t = np.asarray(scheduler.timesteps)
    if t.size < 2 or np.unique(t).size == t.size:
        return
    best = 1
    for m in range(n - 1, 1, -1):
        scheduler._set_timesteps(m)
        if np.unique(np.asarray(scheduler.timesteps)).size == len(scheduler.timesteps):
            best = m
            break
    scheduler._set_timesteps(best)
    raise LitedgeError(f"{scheduler.class_name}: {n} steps would repeat timesteps of this "
                       f"{scheduler.config.num_train_timesteps}-step schedule; use at most {best} steps")


def _ve_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """VE noise levels ``sqrt((1 - abar) / abar)`` (T,) float64 of a training table."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


class Scheduler(abc.ABC):
    """Common interface: ``from_config``, ``set_timesteps(n)``, ``step(output, i, sample)``.

    ``timesteps``: (n,) the values fed to the model at step i, in diffusers' units and dtype.
    """

    class_name: ClassVar[str]                 # diffusers' _class_name
    short_name: ClassVar[str]                 # litedge's name (bundle manifest "scheduler.type")
    config_class: ClassVar[type]              # the frozen dataclass of implemented settings
    _FIXED: ClassVar[dict[str, tuple]] = {}   # diffusers settings pinned to these values
    _OVERRIDES: ClassVar[dict] = {}           # settings a named variant forces over the config
    flow: ClassVar[bool] = False              # for flow-matching (velocity) models, not noise ones
    _sampler: ClassVar[str]                   # the sampler's name in image UIs' "parameters" (A1111)
    init_noise_sigma: float = 1.0             # std of the initial noise: latents = noise * this

    def __init__(self, config) -> None:
        self.config = config
        self.timesteps = np.zeros(0)
        self.num_inference_steps = 0
        # noise source of stochastic schedulers: a Generator, or one per batch row
        self.generator: np.random.Generator | list[np.random.Generator] | None = None

    @classmethod
    def from_config(cls, config: dict) -> "Scheduler":
        """Build from a diffusers ``scheduler_config.json`` dict (unknown keys ignored)."""
        return cls(_parse_config(cls.class_name, cls.config_class, cls._FIXED, {**config, **cls._OVERRIDES}))

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """What the model is fed at step i for ``sample`` (B, C, H, W): the sample itself here."""
        return sample

    @property
    def sampler_name(self) -> str:
        """The name image UIs give this sampler ("DPM++ 2M Karras", "Euler a"), for PNG ``parameters``."""
        return self._sampler + (" Karras" if getattr(self.config, "use_karras_sigmas", False) else "")

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Fill ``timesteps`` for ``num_inference_steps`` steps (an int >= 1) and reset state."""
        n = num_inference_steps
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise LitedgeError(f"{self.class_name}: num_inference_steps must be a positive integer, got {n!r}")
        self._set_timesteps(int(n))
        _refuse_repeated_timesteps(self, int(n))  # a repeated timestep is a zero-length step (h = 0)
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
    _sampler = "DPM++ 2M"
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
            timesteps = _multistep_timesteps(last, T, n, c.timestep_spacing, c.steps_offset)
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
    _sampler = "DDIM"
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
    _sampler = "Euler (flow)"
    flow = True
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


class DPMSolverKarras(DPMSolverMultistep):
    """DPM-Solver++ 2M on Karras et al.'s rho=7 sigmas ("DPM++ 2M Karras"): the bundle's
    DPMSolverMultistepScheduler config with ``use_karras_sigmas=True``."""

    short_name = "dpmsolver++-karras"
    _OVERRIDES = {"use_karras_sigmas": True}


# -- UniPC -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UniPCConfig:
    """The UniPCMultistepScheduler settings litedge implements (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: Prediction = "epsilon"
    solver_order: Literal[1, 2, 3] = 2
    solver_type: Literal["bh1", "bh2"] = "bh2"
    lower_order_final: bool = True
    timestep_spacing: Spacing = "linspace"
    steps_offset: int = 0
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"


class UniPCMultistep(Scheduler):
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) and corrector (UniC) on the data
    prediction x0 = diffusers' ``UniPCMultistepScheduler`` with ``predict_x0=True``.

    Step i first corrects the sample with this step's x0 (UniC, from step 1 on), then predicts
    the next one (UniP) from the last ``order`` x0 estimates. Multistep state as
    :class:`DPMSolverMultistep`: ``i == 0`` or :meth:`reset` starts a trajectory, steps run in order.
    """

    class_name = "UniPCMultistepScheduler"
    short_name = "unipc"
    _sampler = "UniPC"
    config_class = UniPCConfig
    _FIXED = {"predict_x0": (True,), "thresholding": (False,), "disable_corrector": ([],), "solver_p": (None,),
              "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
              "use_flow_sigmas": (False,), "rescale_betas_zero_snr": (False,), "use_dynamic_shifting": (False,),
              "sigma_min": (None,), "sigma_max": (None,), "shift_terminal": (None,)}

    @classmethod
    def from_config(cls, config: dict) -> "Scheduler":
        """As diffusers, a DPM-Solver ``solver_type`` (midpoint, heun, logrho) reads as ``bh2``."""
        if config.get("solver_type") in ("midpoint", "heun", "logrho"):
            config = {**config, "solver_type": "bh2"}
        return super().from_config(config)

    def __init__(self, config: UniPCConfig) -> None:
        super().__init__(config)
        c = config
        self.train_sigmas = _ve_sigmas(_alphas_cumprod(                     # (T,) VE sigma
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas))
        self.sigmas = np.zeros(0)                                           # (n+1,) after set_timesteps
        self.reset()

    def reset(self) -> None:
        """Forget the previous steps (start a new trajectory)."""
        self._x0s: list[np.ndarray] = []          # the last solver_order data predictions, oldest first
        self._last: tuple[int, np.ndarray, int] | None = None   # (step, sample before UniP, order used)

    def _set_timesteps(self, n: int) -> None:
        c, T = self.config, self.config.num_train_timesteps
        if n > T:
            raise LitedgeError(f"{self.class_name}: {n} steps > num_train_timesteps={T}; use at most {T}")
        self.timesteps = _multistep_timesteps(T, T, n, c.timestep_spacing, c.steps_offset)
        final = self.train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.append(self.train_sigmas[self.timesteps], final).astype(np.float32).astype(np.float64)
        self.reset()

    def _lambda(self, j: int) -> tuple[float, float, float]:
        """VP (alpha, sigma) and log-SNR lambda = log(alpha / sigma) at ``sigmas[j]`` (inf at sigma 0)."""
        s = self.sigmas[j]
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return alpha, s * alpha, (math.inf if s == 0 else -math.log(s))

    def _update(self, x: np.ndarray, src: int, dst: int, x0: np.ndarray, history: list[np.ndarray],
                order: int, x0_dst: np.ndarray | None) -> np.ndarray:
        """One UniP (``x0_dst`` None) or UniC update from ``sigmas[src]`` to ``sigmas[dst]``.

        x0: the data prediction at ``src``; history: the ones at src-1, src-2, ... (order-1 used);
        x0_dst: UniC's data prediction at ``dst``. float64 arrays (B, C, H, W).
        """
        alpha_t, sigma_t, lam_t = self._lambda(dst)
        _, sigma_s, lam_s = self._lambda(src)
        hh = -(lam_t - lam_s)                                  # -h, predict_x0
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lambda(src - k)[2] - lam_s) / (lam_t - lam_s)
            rks.append(rk)
            d1s.append((history[k - 1] - x0) / rk)
        h_phi_1 = math.expm1(hh)                               # e^-h - 1
        b_h = hh if self.config.solver_type == "bh1" else h_phi_1
        r, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            r.append(np.power(np.array(rks + [1.0]), k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        out = sigma_t / sigma_s * x - alpha_t * h_phi_1 * x0
        if x0_dst is None:                                     # UniP: order - 1 differences
            if d1s:
                rhos = [0.5] if order == 2 else np.linalg.solve(np.array(r)[:-1, :-1], np.array(b)[:-1])
                out = out - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, d1s))
            return out
        rhos = [0.5] if order == 1 else np.linalg.solve(np.array(r), np.array(b))  # UniC: one more
        res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), np.zeros_like(x)) + rhos[-1] * (x0_dst - x0)
        return out - alpha_t * b_h * res

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """UniC on ``sample`` with this step's x0 (i > 0), then UniP to step i+1.

        Shapes as :meth:`DPMSolverMultistep.step`; returns ``sample.dtype``.
        """
        self._check_step(model_output, i, sample)
        if i == 0:
            self.reset()
        if self._last is not None and self._last[0] != i - 1:
            raise LitedgeError(f"{self.class_name}: step({i}) after step({self._last[0]}); run the steps in "
                               "order, or call reset() to start a new trajectory at this step")
        c, n = self.config, self.num_inference_steps
        x = sample.astype(np.float64)
        alpha, sigma, _ = self._lambda(i)
        x0 = _vp_x0(c.prediction_type, model_output.astype(np.float64), x, alpha, sigma)
        if self._last is not None:                             # correct the sample UniP predicted
            _, last_x, last_order = self._last
            x = self._update(last_x, i - 1, i, self._x0s[-1], self._x0s[-2::-1], last_order, x0)
        self._x0s = (self._x0s + [x0])[-c.solver_order:]
        order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        order = min(order, len(self._x0s))                     # warm-up: the history there is
        self._last = (i, x, order)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self._update(x, i, i + 1, x0, self._x0s[-2::-1], order, None)
        return out.astype(sample.dtype)


def _vp_x0(prediction: str, output: np.ndarray, x: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """Data prediction from a VP-parameterized model output (x = alpha x0 + sigma eps)."""
    if prediction == "epsilon":
        return (x - sigma * output) / alpha
    if prediction == "v_prediction":
        return alpha * x - sigma * output
    return output


# -- Euler, Euler-ancestral (k-diffusion's samplers on VE sigmas) ---------------------------------

@dataclass(frozen=True)
class EulerConfig:
    """The EulerDiscreteScheduler settings litedge implements (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: Prediction = "epsilon"
    use_karras_sigmas: bool = False
    timestep_spacing: Spacing = "linspace"
    steps_offset: int = 0
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"


@dataclass(frozen=True)
class EulerAncestralConfig:
    """The EulerAncestralDiscreteScheduler settings litedge implements (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    timestep_spacing: Spacing = "linspace"
    steps_offset: int = 0


class EulerDiscrete(Scheduler):
    """Euler on the probability-flow ODE in VE form (Karras et al. 2022, Algorithm 2 without churn)
    = diffusers' ``EulerDiscreteScheduler``.

    The sample lives at VE scale ``x = x0 + sigma eps``: the initial noise is scaled by
    ``init_noise_sigma`` (sigma_max, or sqrt(sigma_max^2 + 1) for ``leading`` spacing) and the
    model sees ``scale_model_input(x, i) = x / sqrt(sigma_i^2 + 1)``. Timesteps are float32 (the
    sigmas' positions in the training table). Stateless.
    """

    class_name = "EulerDiscreteScheduler"
    short_name = "euler"
    _sampler = "Euler"
    config_class = EulerConfig
    _FIXED = {"interpolation_type": ("linear",), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
              "sigma_min": (None,), "sigma_max": (None,), "timestep_type": ("discrete",),
              "rescale_betas_zero_snr": (False,)}

    def __init__(self, config) -> None:
        super().__init__(config)
        c = config
        # as diffusers: VE sigmas of the float32 table computed in float32 (the Karras timesteps
        # interpolate in their logs, where float64 would move a timestep by ~1e-4)
        abar = _alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                               c.trained_betas).astype(np.float32)
        self.train_sigmas = ((1 - abar) / abar) ** np.float32(0.5)          # (T,) float32
        self.sigmas = np.zeros(0)                                           # (n+1,) float64 after set_timesteps

    def _set_timesteps(self, n: int) -> None:
        c, T = self.config, self.config.num_train_timesteps
        if n > T:
            raise LitedgeError(f"{self.class_name}: {n} steps > num_train_timesteps={T}; use at most {T}")
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif c.timestep_spacing == "leading":
            timesteps = (np.arange(n) * (T // n)).round()[::-1].astype(np.float32) + c.steps_offset
        else:  # trailing
            timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
        sigmas = np.interp(timesteps, np.arange(T), self.train_sigmas)      # (n,) float64
        if getattr(c, "use_karras_sigmas", False):
            rho, s_min, s_max = 7.0, sigmas[-1], sigmas[0]
            ramp = np.linspace(0, 1, n)
            sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            timesteps = _sigma_to_t(sigmas, np.log(self.train_sigmas)).astype(np.float32)  # float32 table
        final = self.train_sigmas[0] if getattr(c, "final_sigmas_type", "zero") == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, final).astype(np.float32).astype(np.float64)
        self.timesteps = timesteps
        top = float(self.sigmas.max())
        self.init_noise_sigma = top if c.timestep_spacing in ("linspace", "trailing") else math.sqrt(top * top + 1)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """``sample / sqrt(sigma_i^2 + 1)``: the VE sample at VP scale, as the model was trained."""
        return (sample / math.sqrt(self.sigmas[i] ** 2 + 1)).astype(sample.dtype)

    def _x0(self, model_output: np.ndarray, x: np.ndarray, s: float) -> np.ndarray:
        """Data prediction at VE sigma ``s`` (float64 arrays; the model saw x / sqrt(s^2 + 1))."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return x - s * model_output
        if kind == "v_prediction":
            return model_output * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
        return model_output

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One Euler step ``x + (sigma_{i+1} - sigma_i) (x - x0) / sigma_i``. Shapes as
        :meth:`DPMSolverMultistep.step`; ``model_output`` is the model's at the scaled input."""
        self._check_step(model_output, i, sample)
        x, s = sample.astype(np.float64), self.sigmas[i]
        derivative = (x - self._x0(model_output.astype(np.float64), x, s)) / s
        return (x + derivative * (self.sigmas[i + 1] - s)).astype(sample.dtype)


class EulerAncestral(EulerDiscrete):
    """Euler-ancestral = diffusers' ``EulerAncestralDiscreteScheduler``: an Euler step down to
    ``sigma_down``, then fresh noise of std ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2).

    The noise comes from ``self.generator`` (a numpy Generator, or a list with one per batch
    row; None: a fresh unseeded Generator), drawn as ``standard_normal(shape, float32)``.
    """

    class_name = "EulerAncestralDiscreteScheduler"
    short_name = "euler-ancestral"
    _sampler = "Euler a"
    config_class = EulerAncestralConfig
    _FIXED = {"rescale_betas_zero_snr": (False,)}

    def _noise(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 noise of ``shape`` (B, ...): row b from generator b of a list."""
        gen = self.generator if self.generator is not None else np.random.default_rng()
        if isinstance(gen, np.random.Generator):
            return gen.standard_normal(shape, dtype=np.float32)
        if len(gen) != shape[0]:
            raise LitedgeError(f"{self.class_name}: {len(gen)} generators for a batch of {shape[0]}; "
                               "give one numpy Generator per image")
        return np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in gen])

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One ancestral step; draws ``sample.shape`` noise. Shapes as :meth:`EulerDiscrete.step`."""
        self._check_step(model_output, i, sample)
        x, s, s_to = sample.astype(np.float64), self.sigmas[i], self.sigmas[i + 1]
        sigma_up = math.sqrt(s_to**2 * (s**2 - s_to**2) / s**2)
        sigma_down = math.sqrt(s_to**2 - sigma_up**2)
        derivative = (x - self._x0(model_output.astype(np.float64), x, s)) / s
        out = x + derivative * (sigma_down - s) + self._noise(sample.shape) * sigma_up
        return out.astype(sample.dtype)


def _sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional training timesteps (n,) float64 of VE ``sigmas``: linear in log sigma between
    the entries of the increasing ``log_table`` (T,), clamped at its ends, as diffusers' ``_sigma_to_t``."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# -- registry --------------------------------------------------------------------------------

SCHEDULERS: dict[str, type[Scheduler]] = {
    name: cls for cls in (DPMSolverMultistep, DDIM, FlowMatchEuler, UniPCMultistep, EulerDiscrete, EulerAncestral)
    for name in (cls.class_name, cls.short_name)
}
SCHEDULERS[DPMSolverKarras.short_name] = DPMSolverKarras  # a named variant: no diffusers class of its own


def scheduler_for_sampler(sampler: str) -> str | None:
    """The litedge scheduler name of an image UI's sampler name ("DPM++ 2M Karras" -> "dpmsolver++-karras"), or None."""
    names = {cls._sampler: cls.short_name for cls in set(SCHEDULERS.values()) if cls is not DPMSolverKarras}
    names["DPM++ 2M Karras"] = DPMSolverKarras.short_name
    return names.get(sampler)


def scheduler_from_config(config: dict, name: str | None = None) -> Scheduler:
    """A scheduler for a diffusers scheduler config: by ``name`` (a key of :data:`SCHEDULERS`,
    e.g. the bundle manifest's ``scheduler.type``) or else by the config's ``_class_name``.
    ``set_timesteps`` must still be called."""
    key = name if name is not None else config.get("_class_name")
    if key not in SCHEDULERS:
        source = f"name {name!r}" if name is not None else f"_class_name {key!r}"
        raise LitedgeError(f"unknown scheduler {source}; expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[key].from_config(config)
