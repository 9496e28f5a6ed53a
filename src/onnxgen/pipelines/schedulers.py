"""Diffusion schedulers in numpy: Euler, Euler ancestral, DDIM, DPM-Solver++ (multistep, 2nd order).

Each follows the diffusers scheduler of the same name, reading the same ``scheduler_config.json``
keys (``beta_start``, ``beta_end``, ``beta_schedule``, ``num_train_timesteps``, ``steps_offset``,
``timestep_spacing``, ``prediction_type``, …); a key the file lacks takes that scheduler's own
default, as diffusers' ``from_config`` does.  The tests run each against diffusers.

A scheduler is used in a loop::

    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        eps = unet(scheduler.scale_model_input(latents, i), t, text)
        latents = scheduler.step(eps, i, latents, noise=draw)   # draw(shape) -> standard normal array

Only the ancestral sampler (and DDIM with ``eta > 0``) calls ``noise``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Noise = Callable[[tuple[int, ...]], np.ndarray]


def _betas(config: dict) -> np.ndarray:
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float32)
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float32)
    if schedule == "scaled_linear":
        return (np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2).astype(np.float32)
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    raise ValueError(f"beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


class Scheduler:
    """The common part: the noise schedule from the config, timestep spacing, per-step state."""

    name = ""
    order = 1
    DEFAULTS: dict = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace",
                      "steps_offset": 0}

    def __init__(self, config: dict | None = None):
        config = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
        self.config = {**self.DEFAULTS, **{k: v for k, v in config.items() if k in self.DEFAULTS}}
        if self.config["prediction_type"] not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.config['prediction_type']!r} is not supported "
                             "(epsilon, v_prediction)")
        if self.config["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise ValueError(f"timestep_spacing {self.config['timestep_spacing']!r} is not supported "
                             "(linspace, leading, trailing)")
        self.alphas_cumprod = np.cumprod(1.0 - _betas(self.config), dtype=np.float32)
        self.timesteps = np.zeros(0, np.float32)
        self.num_inference_steps = 0

    def _spaced(self, steps: int, last: int | None = None, extra: int = 0) -> np.ndarray:
        """Timesteps, from high to low, by the config's spacing (``extra`` points dropped at the end)."""
        n = self.config["num_train_timesteps"]
        last = n if last is None else last
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, last - 1, steps + extra)
            return t[::-1][:steps] if extra else t[::-1]
        if spacing == "leading":
            ratio = last // (steps + extra)
            t = (np.arange(0, steps + extra) * ratio).round()[::-1][:steps]
            return t + self.config["steps_offset"]
        ratio = n / steps
        return np.arange(last, 0, -ratio).round() - 1

    def set_timesteps(self, steps: int) -> None:
        raise NotImplementedError

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: Noise | None = None) -> np.ndarray:
        raise NotImplementedError


class _SigmaScheduler(Scheduler):
    """Euler-family: sigmas interpolated at the timesteps, a final sigma of 0."""

    def set_timesteps(self, steps: int) -> None:
        if self.config["timestep_spacing"] == "linspace":
            n = self.config["num_train_timesteps"]
            timesteps = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        else:
            timesteps = self._spaced(steps).astype(np.float32)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = steps

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max())
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        sigma = float(self.sigmas[index])
        return (sample / np.float32((sigma ** 2 + 1) ** 0.5)).astype(np.float32)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        if self.config["prediction_type"] == "epsilon":
            return sample - np.float32(sigma) * model_output
        return model_output * np.float32(-sigma / (sigma ** 2 + 1) ** 0.5) + sample / np.float32(sigma ** 2 + 1)


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""

    name = "euler"

    def step(self, model_output, index, sample, noise=None):
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        denoised = self._denoised(model_output, sample, sigma)
        derivative = (sample - denoised) / np.float32(sigma)
        return (sample + derivative * np.float32(sigma_next - sigma)).astype(np.float32)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler steps to ``sigma_down`` plus fresh noise of ``sigma_up`` (k-diffusion's sample_euler_ancestral)."""

    name = "euler_ancestral"

    def step(self, model_output, index, sample, noise=None):
        if noise is None:
            raise ValueError("the ancestral sampler needs a noise source")
        sigma, sigma_to = float(self.sigmas[index]), float(self.sigmas[index + 1])
        denoised = self._denoised(model_output, sample, sigma)
        sigma_up = (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        derivative = (sample - denoised) / np.float32(sigma)
        prev = sample + derivative * np.float32(sigma_down - sigma)
        return (prev + noise(model_output.shape).astype(np.float32) * np.float32(sigma_up)).astype(np.float32)


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2020); ``eta`` = 0 is deterministic."""

    name = "ddim"
    DEFAULTS = {**Scheduler.DEFAULTS, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
                "clip_sample_range": 1.0}

    def __init__(self, config: dict | None = None, eta: float = 0.0):
        super().__init__(config)
        self.eta = eta
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def set_timesteps(self, steps: int) -> None:
        n = self.config["num_train_timesteps"]
        if steps > n:
            raise ValueError(f"num_inference_steps ({steps}) cannot exceed the {n} training timesteps")
        if self.config["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1]
        else:
            timesteps = self._spaced(steps)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = steps

    def step(self, model_output, index, sample, noise=None):
        t = int(self.timesteps[index])
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if self.config["prediction_type"] == "epsilon":
            x0 = (sample - np.float32(b_t ** 0.5) * model_output) / np.float32(a_t ** 0.5)
            eps = model_output
        else:
            x0 = np.float32(a_t ** 0.5) * sample - np.float32(b_t ** 0.5) * model_output
            eps = np.float32(a_t ** 0.5) * model_output + np.float32(b_t ** 0.5) * sample
        if self.config["clip_sample"]:
            bound = self.config["clip_sample_range"]
            x0 = np.clip(x0, -bound, bound)
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
        std = self.eta * variance ** 0.5
        prev = np.float32(a_prev ** 0.5) * x0 + np.float32((1 - a_prev - std ** 2) ** 0.5) * eps
        if self.eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs a noise source")
            prev = prev + np.float32(std) * noise(model_output.shape).astype(np.float32)
        return prev.astype(np.float32)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (Lu et al. 2022), multistep, 2nd order, midpoint; first order at the last step."""

    name = "dpmpp"
    order = 1  # one model call per step
    DEFAULTS = {**Scheduler.DEFAULTS, "solver_order": 2, "lower_order_final": True, "euler_at_final": False,
                "final_sigmas_type": "zero", "algorithm_type": "dpmsolver++", "solver_type": "midpoint"}

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        if self.config["algorithm_type"] != "dpmsolver++" or self.config["solver_type"] != "midpoint":
            raise ValueError("onnxgen's DPM-Solver is dpmsolver++ with the midpoint solver")
        if self.config["solver_order"] not in (1, 2):
            raise ValueError("onnxgen's DPM-Solver++ has orders 1 and 2")

    def set_timesteps(self, steps: int) -> None:
        n = self.config["num_train_timesteps"]
        if self.config["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
        elif self.config["timestep_spacing"] == "leading":
            ratio = n // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1] + self.config["steps_offset"]
        else:
            timesteps = self._spaced(steps)
        timesteps = timesteps.astype(np.int64)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        if self.config["final_sigmas_type"] == "zero":
            last = 0.0
        else:
            last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = steps
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float, float]:
        """(alpha_t, sigma_t, lambda_t) of a Karras sigma; lambda = log(alpha/sigma) (+inf at sigma 0)."""
        alpha = 1.0 / (sigma ** 2 + 1) ** 0.5
        s = sigma * alpha
        return alpha, s, (math.log(alpha) - math.log(s)) if s > 0 else math.inf

    def step(self, model_output, index, sample, noise=None):
        steps = len(self.timesteps)
        lower_final = index == steps - 1 and (self.config["euler_at_final"] or self.config["final_sigmas_type"] == "zero"
                                              or (self.config["lower_order_final"] and steps < 15))
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma(float(self.sigmas[index]))
        if self.config["prediction_type"] == "epsilon":
            x0 = (sample - np.float32(sigma_s0) * model_output) / np.float32(alpha_s0)
        else:
            x0 = np.float32(alpha_s0) * sample - np.float32(sigma_s0) * model_output
        self.model_outputs = self.model_outputs[1:] + [x0]
        alpha_t, sigma_t, lambda_t = self._alpha_sigma(float(self.sigmas[index + 1]))
        h = lambda_t - lambda_s0
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        first = self.config["solver_order"] == 1 or self.lower_order_nums < 1 or lower_final
        prev = np.float32(sigma_t / sigma_s0) * sample - np.float32(alpha_t * phi) * x0
        if not first:
            _, _, lambda_s1 = self._alpha_sigma(float(self.sigmas[index - 1]))
            r0 = (lambda_s0 - lambda_s1) / h
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            prev = prev - np.float32(0.5 * alpha_t * phi / r0) * (m0 - m1)
        if self.lower_order_nums < self.config["solver_order"]:
            self.lower_order_nums += 1
        return prev.astype(np.float32)


SCHEDULERS = {cls.name: cls for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler,
                                        DPMSolverMultistepScheduler)}
ALIASES = {"euler_a": "euler_ancestral", "dpm++": "dpmpp", "dpmsolver++": "dpmpp", "dpm_solver++": "dpmpp",
           "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
           "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp"}


def create(name: str, config: dict | None = None) -> Scheduler:
    """A scheduler by name (euler, euler_ancestral, ddim, dpmpp, or a diffusers class name)."""
    key = ALIASES.get(name, name)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key](config)
