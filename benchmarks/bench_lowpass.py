"""The seed's low-pass claim, measured: the q-trajectory's high-frequency energy under a fixed score signal, by order.

    python benchmarks/bench_lowpass.py [--orders 1 2 3 4 5]

**Claim** (*Reducing Diffusion Model Memorization with Higher Order Langevin Dynamics*, 2026;
``docs/HOLD_MATH.md`` section 6). In HOLD the score enters only the last block; eliminating
the auxiliaries, the data variable ``q`` is the score passed through an ``n``-pole filter with
``|H(i w)| = prod(gamma) / (w^2 + r^2)^(n/2)``. So for one and the same score signal, the higher the order, the less
high-frequency energy reaches ``q``.

**Measurement.** For each order, the chain of :class:`~diffusers_hold.HOLDDynamics` (its drift matrix ``F``, read
from the one place that defines it) is driven at the last block by the *same* signal ``u(t)``:
``dz/dt = F z + e_n u(t)``, discretised exactly for a piecewise-constant input (``z_{k+1} = e^{F h} z_k +
F^{-1}(e^{F h} - I) e_n u_k``, float64). Two signals: white noise, and a random telegraph signal (jumps at
Poisson times), which is what the empirical score looks like near ``t = 0`` when it jumps between training points.
The reverse-time filter has the poles mirrored (``(s - r)^n``), hence the same magnitude response; a stable
forward chain is what can be simulated over a long horizon. From the simulated ``q(t)`` (burn-in dropped) the
Hann-windowed periodogram gives the fraction of ``q``'s energy above cutoffs ``w_c`` = 2, 4, 8 rad per unit time. The
same fraction from ``|H(i w)|^2`` times the signal's spectrum, with ``H(i w) = [(i w - F)^{-1}]_{1,n}`` solved in
complex128, is the independent check of the simulation. Results go to ``benchmarks/results/lowpass.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from harness import ForeignLoad, environment, finish

from diffusers_hold import HOLDDynamics

RESULTS = Path(__file__).resolve().parent / "results" / "lowpass.json"
CUTOFFS = (2.0, 4.0, 8.0)


def input_signals(num_steps: int, step: float, seed: int) -> dict[str, np.ndarray]:
    """The fixed score signals, one draw shared by every order."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(num_steps) / np.sqrt(step)  # unit spectral density
    flips = rng.random(num_steps) < 1.0 * step  # a jump once per unit time on average
    telegraph = np.where(np.cumsum(flips) % 2 == 0, 1.0, -1.0)
    return {"white_noise": white, "telegraph": telegraph}


def simulate_position(dynamics: HOLDDynamics, signal: np.ndarray, step: float) -> np.ndarray:
    """``q`` of ``dz/dt = F z + e_n u`` for piecewise-constant ``u``, with the exact zero-order-hold update."""
    drift = dynamics.drift_matrix
    transition = torch.linalg.matrix_exp(drift * step)
    input_gain = torch.linalg.solve(drift, transition - torch.eye(dynamics.order, dtype=torch.float64))[:, -1]
    transition, input_gain = transition.numpy(), input_gain.numpy()
    state = np.zeros(dynamics.order)
    position = np.empty(len(signal))
    for k, u in enumerate(signal):
        state = transition @ state + input_gain * u
        position[k] = state[0]
    return position


def transfer_power(dynamics: HOLDDynamics, frequencies: np.ndarray) -> np.ndarray:
    """``|H(i w)|^2`` from the last block's input to ``q``, by solving ``(i w - F) x = e_n`` in complex128."""
    n = dynamics.order
    drift = dynamics.drift_matrix.to(torch.complex128)
    omega = torch.as_tensor(frequencies, dtype=torch.float64)
    systems = 1j * omega[:, None, None] * torch.eye(n, dtype=torch.complex128) - drift
    unit = torch.zeros(n, dtype=torch.complex128)
    unit[-1] = 1
    response = torch.linalg.solve(systems, unit.expand(len(omega), n))[:, 0]
    return (response.abs() ** 2).numpy()


def high_frequency_fraction(power: np.ndarray, frequencies: np.ndarray, cutoff: float) -> float:
    return float(power[frequencies > cutoff].sum() / power[frequencies > 0].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--num_steps", type=int, default=2**17)
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--burn_in", type=float, default=50.0, help="Time dropped before the periodogram.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start, load = time.perf_counter(), ForeignLoad()
    signals = input_signals(args.num_steps, args.step, args.seed)
    drop = int(args.burn_in / args.step)
    frequencies = 2 * np.pi * np.fft.rfftfreq(args.num_steps - drop, d=args.step)
    window = np.hanning(args.num_steps - drop)  # without it, leakage from the ends floors the spectrum
    rows = []
    for order in args.orders:
        dynamics = HOLDDynamics(order)
        gain = transfer_power(dynamics, frequencies)
        row = {"order": order, "r": dynamics.r, "signals": {}}
        for name, signal in signals.items():
            position = simulate_position(dynamics, signal, args.step)[drop:]
            measured = np.abs(np.fft.rfft(window * (position - position.mean()))) ** 2
            spectrum = np.abs(np.fft.rfft(window * (signal[drop:] - signal[drop:].mean()))) ** 2
            predicted = gain * spectrum  # the same signal's periodogram through |H|^2
            row["signals"][name] = {
                f"w>{cutoff:g}": {
                    "measured": high_frequency_fraction(measured, frequencies, cutoff),
                    "predicted": high_frequency_fraction(predicted, frequencies, cutoff),
                }
                for cutoff in CUTOFFS
            }
        rows.append(row)
    base = rows[0]
    for row in rows:
        for name, fractions in row["signals"].items():
            for key, value in fractions.items():
                value["ratio_to_first_order"] = value["measured"] / base["signals"][name][key]["measured"]
    env = environment(("torch", "numpy"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    results = {
        "claim": "high-frequency energy of q under a fixed score signal falls with the HOLD order",
        "settings": vars(args),
        "orders": rows,
        "falls_with_order": {
            name: {
                f"w>{cutoff:g}": all(
                    later["signals"][name][f"w>{cutoff:g}"]["measured"]
                    < earlier["signals"][name][f"w>{cutoff:g}"]["measured"]
                    for earlier, later in zip(rows, rows[1:], strict=False)
                )
                for cutoff in CUTOFFS
            }
            for name in signals
        },
        "environment": env,
        "wall_time_s": time.perf_counter() - start,
    }
    finish(results, RESULTS, print_report)


def print_report(results: dict) -> None:
    print("Fraction of the q-trajectory's energy above w_c (measured; predicted from |H|^2 in brackets)")
    for name in results["orders"][0]["signals"]:
        print(f"\n{name}:")
        print("order   r     " + "  ".join(f"{'w > ' + format(c, 'g'):>24}" for c in CUTOFFS))
        for row in results["orders"]:
            cells = []
            for cutoff in CUTOFFS:
                value = row["signals"][name][f"w>{cutoff:g}"]
                cells.append(
                    f"{value['measured']:.2e} [{value['predicted']:.2e}] x{value['ratio_to_first_order']:.3f}"
                )
            print(f"{row['order']:>5}  {row['r']:.2f}  " + "  ".join(f"{c:>24}" for c in cells))
    print("\nfalls with order at every cutoff:", results["falls_with_order"])


if __name__ == "__main__":
    main()
