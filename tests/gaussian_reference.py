"""Gaussian data whose HOLD marginals, exact score and exact sampler output law are known in closed form."""

from __future__ import annotations

import numpy as np
import torch

from diffusers_hold import HOLDScheduler


class GaussianData:
    """Data ``x_0 ~ N(mean, cov)`` in ``C`` dimensions, noised by the HOLD kernel of ``dynamics``.

    The state is laid out block-major, ``[q (C) | p (C) | ...]``, so its marginal at time t is
    ``N(kron(a_t, mean), kron(a_t a_t^T, cov) + kron(Sigma_t, I_C))``, with ``a_t`` and ``Sigma_t`` computed
    independently here (scipy matrix exponential and Van Loan) rather than by the code under test.
    """

    def __init__(self, scheduler: HOLDScheduler, mean, cov):
        self.scheduler = scheduler
        self.mean = np.atleast_1d(np.asarray(mean, dtype=float))
        self.cov = np.atleast_2d(np.asarray(cov, dtype=float))
        self.channels = len(self.mean)
        dyn = scheduler.dynamics
        n = dyn.order
        self._drift = dyn.drift_matrix.numpy()
        self._gg = np.zeros((n, n))
        self._gg[-1, -1] = dyn.diffusion_sq
        self._cov0 = np.diag([0.0] + [dyn.aux_init_var * dyn.L_inv] * (n - 1))
        self._eps = dyn.eps_num

    def kernel(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Kernel mean coefficients and covariance at time t, from scipy alone.

        Van Loan's block exponential for t < 1; for t >= 1, where it loses digits to ``e^{+rt}``,
        ``Sigma_inf - e^{Ft} Sigma_inf e^{Ft}^T`` with ``Sigma_inf`` from scipy's Lyapunov solver.
        """
        import scipy.linalg

        n = self._drift.shape[0]
        transition = scipy.linalg.expm(self._drift * t)
        if t < 1.0:
            block = np.block([[-self._drift, self._gg], [np.zeros((n, n)), self._drift.T]]) * t
            van_loan = scipy.linalg.expm(block)
            noise = van_loan[n:, n:].T @ van_loan[:n, n:]
        else:
            stationary = scipy.linalg.solve_continuous_lyapunov(self._drift, -self._gg)
            noise = stationary - transition @ stationary @ transition.T
        cov = noise + transition @ self._cov0 @ transition.T + self._eps * np.eye(n)
        return transition[:, 0], cov

    def marginal(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        a, sigma = self.kernel(t)
        return np.kron(a, self.mean), np.kron(np.outer(a, a), self.cov) + np.kron(sigma, np.eye(self.channels))

    def eps_prediction(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The exact ``E[eps_n | z_t]`` a perfect HOLD model would output, shape ``(batch, C)``."""
        t = float(self.scheduler.timestep_to_time(timestep))
        mu, cov = self.marginal(t)
        _, sigma = self.kernel(t)
        last_diag = np.linalg.cholesky(sigma)[-1, -1]
        score = -(z.double().numpy() - mu) @ np.linalg.inv(cov)  # (batch, n C), symmetric precision
        return torch.from_numpy(-score[:, -self.channels :] * last_diag).to(z.dtype)

    def output_law(self, t_end: float, denoised: bool) -> tuple[np.ndarray, np.ndarray]:
        """Exact law of the position block at ``t_end``, or of ``E[x_0 | z]`` there when ``denoised``.

        A denoising final step returns (an approximation of) the posterior mean, whose law is narrower than the
        data's by the posterior variance at ``t_end`` (about 2 % at order 1, negligible for orders >= 2).
        """
        mu, cov = self.marginal(t_end)
        c = self.channels
        if not denoised:
            return mu[:c], cov[:c, :c]
        a, _ = self.kernel(t_end)
        cross = np.kron(a[None, :], self.cov)  # Cov(x0, z), (C, n C)
        return self.mean, cross @ np.linalg.solve(cov, cross.T)


def sample_with_exact_score(data: GaussianData, num_inference_steps: int, num_samples: int, seed: int = 0):
    """Run the scheduler's public loop with the exact model; returns the final states (float64)."""
    sched = data.scheduler
    sched.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    n = sched.config.order
    z = torch.randn(num_samples, n * data.channels, generator=generator, dtype=torch.float64)
    # moment-matched prior draws (exact zero mean, identity covariance) remove the Monte Carlo error of the start
    z = z - z.mean(0)
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(z.T @ z / num_samples), z.T, upper=False).T
    z = z * sched.init_noise_sigma
    for t in sched.timesteps:
        model_input = sched.scale_model_input(z, t, full_state=True)
        z = sched.step(data.eps_prediction(model_input, t), t, z, generator=generator, full_state=True).prev_sample
    return z


def exact_sampler_law(data: GaussianData, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the final state of the discretised sampler, with no Monte Carlo error.

    With Gaussian data and the exact model, every solver step is affine in the state, the model's predictions and
    Gaussian noise (``z' = M z + v eps_hat + sum_j D_j x0_hat_j + sum_j H_j y_j + S xi``, acting block-wise on ``C``
    channels), and the predictions are affine in the state, so the law of the sampler's output is Gaussian and its
    moments propagate exactly through the scheduler's per-step coefficients. What a multistep solver keeps of its
    earlier calls (denoised estimates ``x0_hat_j``, or noise parts ``y_j`` carried by ``transport``) is propagated as
    extra coordinates. ``x0_hat`` is the exact posterior mean ``E[x_0 | z]`` of the data law, computed here
    independently of the scheduler.
    """
    sched = data.scheduler
    sched.set_timesteps(num_inference_steps)
    c = data.channels
    eye = np.eye(c)
    n = sched.config.order
    forms = (sched._steps, *sched._multistep_steps)
    noise_form = sched._steps.transport is not None
    slot = n * c if noise_form else c  # size of one kept item
    slots = len(forms) - 1
    d = n * c
    size = d + slots * slot
    mean = np.zeros(size)
    cov = np.zeros((size, size))
    cov[:d, :d] = sched.config.L_inv * np.eye(d)

    def embed(matrix: np.ndarray) -> np.ndarray:  # a map of z alone as a map of the whole vector
        full = np.zeros((matrix.shape[0], size))
        full[:, :d] = matrix
        return full

    num_steps = len(sched.timesteps)
    for i, timestep in enumerate(sched.timesteps):
        t = float(sched.timestep_to_time(timestep))
        reads = min(i, slots)  # earlier estimates this step reads
        if sched.config.lower_order_final:  # the last step first order; with < 15 steps the one before at most second
            reads = 0 if i == num_steps - 1 else min(reads, 1) if num_steps < 15 and i == num_steps - 2 else reads
        mu, marginal_cov = data.marginal(t)
        a, sigma = data.kernel(t)
        precision = np.linalg.inv(marginal_cov)
        gain = np.linalg.cholesky(sigma)[-1, -1] * precision[-c:]  # eps_hat = gain (z - mu)
        posterior = np.kron(a[None, :], data.cov) @ precision
        x0_map, x0_offset = embed(posterior), data.mean - posterior @ mu  # x0_hat = E[x0 | z], affine
        steps = forms[reads]
        kept = [(np.eye(slot, size, d + j * slot), np.zeros(slot)) for j in range(reads)]
        eps_vector = np.kron(steps.eps_vector[i].numpy()[:, None], eye)  # (n C, C)
        z_map = embed(np.kron(steps.state_matrix[i].numpy(), eye) + eps_vector @ gain)
        z_offset = -eps_vector @ gain @ mu
        if steps.data_vectors is not None:
            estimates = [(x0_map, x0_offset)] + ([] if noise_form else kept)
            for vector, (linear, constant) in zip(steps.data_vectors[i].numpy(), estimates, strict=True):
                z_map, z_offset = (
                    z_map + np.kron(vector[:, None], eye) @ linear,
                    z_offset + np.kron(vector[:, None], eye) @ constant,
                )
        if steps.history_matrices is not None:
            for matrix, (linear, _) in zip(steps.history_matrices[i].numpy(), kept, strict=True):
                z_map = z_map + np.kron(matrix, eye) @ linear
        if noise_form:  # this call's noise part z - a x0_hat, then all parts carried to the next time
            part = (embed(np.eye(d)) - np.kron(a[:, None], eye) @ x0_map, -np.kron(a[:, None], eye) @ x0_offset)
            carry = np.kron(steps.transport[i].numpy(), eye)
            new_kept = [(carry @ linear, carry @ constant) for linear, constant in [part, *kept]]
        else:
            new_kept = [(x0_map, x0_offset), *kept]
        transition = np.zeros((size, size))
        offset = np.zeros(size)
        transition[:d], offset[:d] = z_map, z_offset
        for j, (linear, constant) in enumerate(new_kept[:slots]):
            transition[d + j * slot : d + (j + 1) * slot], offset[d + j * slot : d + (j + 1) * slot] = linear, constant
        mean = transition @ mean + offset
        cov = transition @ cov @ transition.T
        if steps.noise_matrix is not None:
            noise = np.kron(steps.noise_matrix[i].numpy(), eye)
            cov[:d, :d] += noise @ noise.T
    return mean[:d], cov[:d, :d]
