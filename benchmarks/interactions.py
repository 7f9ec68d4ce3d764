#!/usr/bin/env python3
"""Complementary training examples: does ``linear-pairwise`` capture what Simfluence-Linear cannot?

    .venv/bin/python benchmarks/interactions.py                 # two-key task, then digits-mlp
    .venv/bin/python benchmarks/interactions.py --quick         # small sizes (what the test runs)
    .venv/bin/python benchmarks/interactions.py --skip-digits --json out.json

**The two-key task** (real training, constructed so that two groups of examples only help
together). A tanh MLP (8 inputs, 6 hidden units, two 2-class heads; the loss of an example is
the cross-entropy of its head) starts from a fixed checkpoint in which hidden unit 0 reads
input 1 and head 1 reads unit 0, while nothing connects input 0 to unit 0 and head 2 ignores
unit 0. Fine-tuning with SGD on

* group **A** (input 0, head 1, class 1) teaches unit 0 to fire on input 0 (through head 1),
* group **B** (input 1, head 2, class 1) teaches head 2 to read unit 0,
* 32 distractors (inputs 2..7, labels of a fixed random teacher) teach other things.

The "needs both" test examples (input 0, head 2, class 1) improve only once unit 0 fires on
input 0 *and* head 2 reads it: ``A`` alone or ``B`` alone does nothing for them, both
together lower their loss (a multiplicative, supermodular effect). Other test examples need
only ``A`` (input 0, head 1), only ``B`` (input 1, head 2), or neither (distractors).

Each run drops group A, group B, both or neither from its pool (at random, a quarter each)
and draws batches of 4 uniformly with replacement from the rest, so held-out runs of every
kind exist. Reported: held-out all-steps MSE of linear-identity and linear-pairwise by run
kind and by test kind, and the leave-group-out interaction
``I = L(full) - L(-A) - L(-B) + L(-A-B)`` of the final loss, with the removed examples
padded out of their batches, simulated vs measured by real retraining.

**digits-mlp**: the same two simulators on the same real runs of the built-in task
(held-out all-steps MSE), to see whether pair terms help where no interaction was built in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from _common import benchmark_parser, timed, write_json
from torch import nn
from torch.nn import functional as F

from simfluence.collect.curricula import UniformSampler
from simfluence.collect.train import train_runs_vmap
from simfluence.evaluate import score, split_runs
from simfluence.runs.log import PAD, RunSet
from simfluence.simulators import LinearIdentitySimulator
from simfluence.simulators.interaction import PairwiseSimulator
from simfluence.tasks import Task, TaskData, get_task

INPUTS, HIDDEN, GROUP, DISTRACTORS = 8, 6, 4, 32
RUN_KINDS = ("neither", "A only", "B only", "both")
TEST_KINDS = ("needs both", "needs A", "needs B", "distractor")


@dataclass
class TwoKeyTask(Task):
    """The constructed task of the module docstring; ``targets = 2 * head + class``."""

    name = "two-key"
    description = "tanh MLP where examples of groups A and B only lower the 'needs both' test losses together"
    source = "synthetic inputs drawn from data_seed; checkpoint set by hand plus init_seed noise"

    learning_rate: float = 0.5
    batch_size: int = 4
    noise: float = 0.05
    distractor_scale: float = 0.5
    data_seed: int = 0
    init_seed: int = 0

    def load_data(self) -> TaskData:
        rng = np.random.default_rng(self.data_seed)
        teacher = rng.normal(size=(2, INPUTS - 2))

        def examples(feature: int | None, target: int, count: int) -> tuple[np.ndarray, np.ndarray]:
            inputs = rng.normal(0.0, self.noise, (count, INPUTS))
            if feature is None:  # distractors: a random head, the class a fixed linear teacher gives
                inputs[:, 2:] = rng.normal(0.0, self.distractor_scale, (count, INPUTS - 2))
                heads = rng.integers(0, 2, count)
                targets = 2 * heads + ((inputs[:, 2:] * teacher[heads]).sum(1) > 0)
            else:
                inputs[:, feature] += 1.0
                targets = np.full(count, target)
            return inputs, targets

        train = [examples(0, 1, GROUP), examples(1, 3, GROUP), examples(None, 0, DISTRACTORS)]
        test = [examples(0, 3, GROUP), examples(0, 1, GROUP), examples(1, 3, GROUP), examples(None, 0, GROUP)]
        train_ids = [f"{kind}-{i}" for kind in ("A", "B") for i in range(GROUP)] + \
            [f"distractor-{i}" for i in range(DISTRACTORS)]
        test_ids = [f"{kind.replace(' ', '-')}-{i}" for kind in TEST_KINDS for i in range(GROUP)]

        def stack(parts):
            return (torch.tensor(np.concatenate([x for x, _ in parts]), dtype=torch.float32),
                    torch.tensor(np.concatenate([y for _, y in parts]), dtype=torch.int64))

        return TaskData(np.array(train_ids), np.array(test_ids), *stack(train), *stack(test))

    def build_model(self) -> nn.Module:
        generator = torch.Generator().manual_seed(self.init_seed)
        # No biases: a bias would let the distractors shift every test example of a head.
        model = nn.Sequential(nn.Linear(INPUTS, HIDDEN, bias=False), nn.Tanh(), nn.Linear(HIDDEN, 4, bias=False))
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
            model[0].weight[:, :2] = 0.0                              # inputs 0 and 1 reach no unit ...
            model[0].weight[0, 1] = 1.5                               # ... but unit 0 reads input 1
            model[2].weight[:, 0] = torch.tensor([-1.0, 1.0, 0.0, 0.0])  # head 1 reads unit 0, head 2 does not
        return model

    def example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.view(-1, 2, 2)[torch.arange(targets.shape[0]), targets // 2]
        return F.cross_entropy(logits, targets % 2, reduction="none")


def two_key_curricula(num_runs: int, num_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``[R, T, B]`` curricula and each run's kind (index into ``RUN_KINDS``), a quarter of each."""
    rng = np.random.default_rng(seed)
    kinds = rng.permutation(np.arange(num_runs) % len(RUN_KINDS))
    groups = {"A": np.arange(GROUP), "B": GROUP + np.arange(GROUP)}
    distractors = 2 * GROUP + np.arange(DISTRACTORS)
    curricula = []
    for kind in kinds:
        name = RUN_KINDS[kind]
        pool = np.concatenate([distractors] + [groups[g] for g in "AB" if name == "both" or name == f"{g} only"])
        curricula.append(UniformSampler(pool, 4).sample(num_steps, int(rng.integers(2**31))))
    return np.stack(curricula), kinds


def train(task: Task, curricula: np.ndarray) -> RunSet:
    logs = train_runs_vmap(task, curricula)
    return RunSet.from_logs(logs, task.train_ids, task.test_ids, meta=task.meta())


def mse_by_kind(predicted: np.ndarray, runs: RunSet, run_kinds: np.ndarray) -> dict[str, dict[str, float]]:
    """All-steps MSE for each (run kind, test kind) cell."""
    error = (predicted[:, 1:].astype(np.float64) - runs.losses[:, 1:]) ** 2          # [R, T, M]
    test_kinds = np.repeat(np.arange(len(TEST_KINDS)), GROUP)
    return {RUN_KINDS[r]: {TEST_KINDS[m]: float(error[run_kinds == r][:, :, test_kinds == m].mean())
                           for m in range(len(TEST_KINDS))} for r in range(len(RUN_KINDS))}


def leave_group_out(curricula: np.ndarray) -> np.ndarray:
    """``[R, 4, T, B]``: each curriculum as is, without group A, without B, without both (padded out)."""
    variants = []
    for removed in ((), ("A",), ("B",), ("A", "B")):
        variant = curricula.copy()
        for group in removed:
            start = 0 if group == "A" else GROUP
            variant[(variant >= start) & (variant < start + GROUP)] = PAD
        variants.append(variant)
    return np.stack(variants, axis=1)


def interaction_of(final_losses: np.ndarray) -> np.ndarray:
    """``L(full) - L(-A) - L(-B) + L(-A-B)`` from final losses ``[R, 4, M]`` (variant order as above)."""
    return final_losses[:, 0] - final_losses[:, 1] - final_losses[:, 2] + final_losses[:, 3]


def two_key_experiment(num_runs: int = 96, num_steps: int = 40, num_heldout: int = 24, num_probes: int = 16,
                       seed: int = 0, pairwise: dict | None = None) -> dict:
    """Collect, fit both simulators, and compare them (module docstring). Returns a JSON-ready dict."""
    task = TwoKeyTask()

    def collect() -> tuple[RunSet, np.ndarray]:
        curricula, kinds = two_key_curricula(num_runs, num_steps, seed)
        return train(task, curricula), kinds

    (runs, kinds), collect_seconds = timed(collect)
    order = np.random.default_rng(seed).permutation(num_runs)
    fit_index, held_index = np.sort(order[num_heldout:]), np.sort(order[:num_heldout])
    fitting, heldout = runs.select(fit_index), runs.select(held_index)

    # Leave-group-out probes: fresh curricula with both groups and no batch made only of group examples.
    probe_curricula, probe_kinds = two_key_curricula(8 * num_probes, num_steps, seed + 1)
    probe_curricula = probe_curricula[probe_kinds == RUN_KINDS.index("both")]
    variants = leave_group_out(probe_curricula)
    keep = ~(variants == PAD).all(axis=-1).any(axis=(1, 2))
    variants = variants[keep][:num_probes]
    flat = variants.reshape(-1, *variants.shape[2:])
    measured = train(task, flat).losses[:, -1].reshape(variants.shape[0], 4, -1)
    needs_both = slice(0, GROUP)

    result = {"num_fitting_runs": fitting.num_runs, "num_heldout_runs": heldout.num_runs, "num_steps": num_steps,
              "collect_seconds": collect_seconds, "num_probes": int(variants.shape[0]),
              "measured_interaction": {"mean_needs_both": float(interaction_of(measured)[:, needs_both].mean()),
                                       "mean_other_tests": float(interaction_of(measured)[:, GROUP:].mean())},
              "simulators": {}}
    measured_needs_both = interaction_of(measured)[:, needs_both].ravel()
    for name, simulator in (("linear-identity", LinearIdentitySimulator()),
                            ("linear-pairwise", PairwiseSimulator(**(pairwise or {})))):
        _, fit_seconds = timed(simulator.fit, fitting)
        predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
        # Every run starts from the same checkpoint, so the probes share the runs' initial losses.
        probe_initial = np.repeat(runs.initial_losses[:1], flat.shape[0], axis=0)
        simulated = simulator.simulate(flat, probe_initial)[:, -1].reshape(variants.shape[0], 4, -1)
        simulated_needs_both = interaction_of(simulated)[:, needs_both].ravel()
        metrics = score(predicted, heldout)
        result["simulators"][name] = {
            "fit_seconds": fit_seconds,
            "rounds_used": simulator.fit_info.get("rounds_used"),
            "heldout_mse": metrics.mse,
            "heldout_across_run_spearman": metrics.across_run_spearman,
            "heldout_mse_by_kind": mse_by_kind(predicted, heldout, kinds[held_index]),
            "simulated_interaction_mean_needs_both": float(simulated_needs_both.mean()),
            "interaction_abs_error_needs_both": float(np.abs(simulated_needs_both - measured_needs_both).mean()),
            "interaction_correlation_needs_both": float(np.corrcoef(simulated_needs_both, measured_needs_both)[0, 1])
            if simulated_needs_both.std() > 0 else float("nan"),
        }
    return result


def digits_comparison(num_runs: int, num_steps: int, num_heldout: int, seed: int = 0,
                      pairwise: dict | None = None) -> dict:
    """Held-out all-steps MSE of linear-identity and linear-pairwise on the same digits-mlp runs."""
    task = get_task("digits-mlp")
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    runs, collect_seconds = timed(lambda: train(task, sampler.sample_many(num_steps, [seed * 100_000 + r
                                                                                     for r in range(num_runs)])))
    fitting, heldout = split_runs(runs, num_heldout, seed)
    result = {"num_fitting_runs": fitting.num_runs, "num_heldout_runs": heldout.num_runs, "num_steps": num_steps,
              "collect_seconds": collect_seconds, "simulators": {}}
    for name, simulator in (("linear-identity", LinearIdentitySimulator()),
                            ("linear-pairwise", PairwiseSimulator(**(pairwise or {})))):
        _, fit_seconds = timed(simulator.fit, fitting)
        metrics = score(simulator.simulate(heldout.curricula, heldout.initial_losses), heldout)
        result["simulators"][name] = {"fit_seconds": fit_seconds, "rounds_used": simulator.fit_info.get("rounds_used"),
                                      **metrics.as_dict()}
    return result


def _print_two_key(result: dict) -> None:
    print(f"\n== two-key task: {result['num_fitting_runs']} fitting / {result['num_heldout_runs']} held-out runs, "
          f"{result['num_steps']} steps (collection {result['collect_seconds']:.1f} s)")
    for name, record in result["simulators"].items():
        rounds = "" if record["rounds_used"] is None else f", {record['rounds_used']} rounds"
        print(f"\n{name}: held-out all-steps MSE {record['heldout_mse']:.5f}, across-run Spearman "
              f"{record['heldout_across_run_spearman']:.3f} (fit {record['fit_seconds']:.2f} s{rounds})")
        print("  run kind \\ test kind " + "".join(f"{kind:>12}" for kind in TEST_KINDS))
        for run_kind, row in record["heldout_mse_by_kind"].items():
            print(f"  {run_kind:<21}" + "".join(f"{row[kind]:>12.5f}" for kind in TEST_KINDS))
    measured = result["measured_interaction"]
    print(f"\nleave-group-out interaction of the final loss, {result['num_probes']} fresh curricula with both groups:")
    print(f"  measured by retraining: needs-both tests {measured['mean_needs_both']:+.4f}, "
          f"other tests {measured['mean_other_tests']:+.4f}")
    for name, record in result["simulators"].items():
        print(f"  {name:<16} needs-both tests {record['simulated_interaction_mean_needs_both']:+.4f}  "
              f"mean abs error {record['interaction_abs_error_needs_both']:.4f}  "
              f"correlation with measured {record['interaction_correlation_needs_both']:.3f}")


def main() -> None:
    parser = benchmark_parser(__doc__, quick="small sizes (as in the test)")
    parser.add_argument("--runs", type=int, default=96)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--digits-runs", type=int, default=48)
    parser.add_argument("--digits-steps", type=int, default=100)
    parser.add_argument("--digits-heldout", type=int, default=8)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.runs, args.steps, args.heldout, args.probes = 48, 30, 12, 8
        args.digits_runs, args.digits_steps, args.digits_heldout = 24, 50, 6
    pairwise = {"rank": args.rank}
    out = {"two_key": two_key_experiment(args.runs, args.steps, args.heldout, args.probes, args.seed, pairwise)}
    _print_two_key(out["two_key"])
    if not args.skip_digits:
        out["digits"] = digits_comparison(args.digits_runs, args.digits_steps, args.digits_heldout, args.seed, pairwise)
        print(f"\n== digits-mlp: {out['digits']['num_fitting_runs']} fitting / {out['digits']['num_heldout_runs']} "
              f"held-out runs, {out['digits']['num_steps']} steps")
        for name, record in out["digits"]["simulators"].items():
            rounds = "" if record["rounds_used"] is None else f" ({record['rounds_used']} rounds)"
            print(f"  {name:<16} all-steps MSE {record['mse']:.5f}  final MSE {record['final_mse']:.5f}  "
                  f"across-run Spearman {record['across_run_spearman']:.3f}  fit {record['fit_seconds']:.2f} s{rounds}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
