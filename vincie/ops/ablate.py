"""`vincie ablate NAME`: the paper's ablations on the synthetic world, one command each (docs/ablations.md).

Each ablation is a few arms. An arm is a training recipe (how many distinct training sessions, config overrides)
and how it is evaluated (each turn with the whole session as context or the current image only; CS -> NS -> I
chained or direct). Every arm trains with several seeds (run.seed and the training data's seed), then edits the
same held-out test sessions (split test, 5 turns) and is scored by the strict synthetic judge, cumulatively (a
session passes turn k when turns 1..k all pass) and each turn alone from the true earlier images (teacher forcing:
what the arm does at a turn without the drift of its own edits).

Training (`vincie launch local`) and evaluation (`vincie eval --bench synth`) run as subprocesses, logged beside
their outputs; with --parallel N, N runs at a time (a run's arms stay in order). Everything is kept under --out,
so a rerun (or a run of another ablation sharing a recipe) resumes:

    OUT/data/test, OUT/data/train-N-sS          sessions (vincie data synth; resumable itself); an ablation on
                                                 another world adds its edits to the names (test-undo)
    OUT/runs/RUN/                                a training run (its config.yaml, checkpoints, metrics.jsonl);
                                                 an interrupted one resumes from its checkpoint. RUN names what the
                                                 recipe changes in the config, and the seed: n8192-modepairs-s0
    OUT/NAME/configs/RUN.yaml                    the arm's whole training config: the same file trains it on a GPU
                                                 cluster (vincie k8s submit --config FILE)
    OUT/evals/RUN-stepN[-current][-chained]/     an evaluation of RUN at N steps (vincie eval's report.json);
                                                 present = finished. Arms of any ablation that evaluate the same run
                                                 the same way share it
    OUT/NAME/results.json, OUT/NAME/ablation.png the table and the plot

An arm's success per turn is the mean over its seeds; its interval is the 95 % Wilson interval over all
(seed, session) outcomes pooled, which treats the seeds' sessions as independent samples (they are the same test
sessions, so the interval is narrower than one over independent sessions would be, and says how precisely the
arm's mean is known, not how much another test set would move it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from vincie import storage
from vincie.config import TRANSITIONS, load_config, to_yaml
from vincie.errors import VincieError

TEST_SESSIONS = 64
TURNS = 5


@dataclass(frozen=True)
class Recipe:
    """One training: `sessions` distinct training sessions (None: --sessions), config overrides, and `steps` (None:
    --steps, else the config's train.steps). Recipes that differ only in steps share one run: a longer one continues
    the shorter one's (the compute ablation's budgets)."""
    sessions: int | None = None
    overrides: tuple[str, ...] = ()
    steps: int | None = None


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: Recipe
    context: str = "session"  # vincie eval --context
    chain_masks: bool = False  # vincie eval --chain-masks


@dataclass(frozen=True)
class Ablation:
    question: str
    arms: tuple[Arm, ...]
    paper: tuple[tuple[str, str], ...]  # (better arm, worse arm): the paper's ordering
    paper_says: str
    transitions: tuple[str, ...] = TRANSITIONS  # the synthetic world's edits (synth.transitions), train and test

    @property
    def world(self) -> str:
        """"" for the default world, else "-" and the edits it adds ("-undo"): in data and run names."""
        return "".join(f"-{kind}" for kind in self.transitions if kind not in TRANSITIONS)


BASE = Recipe()
PAIRS = Recipe(overrides=("data.mode=pairs",))
MASKS = Recipe(overrides=("sequence.masks_present=0.8",))
CONTEXT = Ablation(
    "each turn edited with the whole session as context against the current image only, at inference and for a "
    "model trained on one-turn pairs",
    (Arm("session", BASE), Arm("current-image", BASE, context="current"),
     Arm("pairs-current-image", PAIRS, context="current")),
    (("session", "current-image"), ("session", "pairs-current-image")),
    "the session context improves multi-turn editing")
# the tiny preset's steps in about 12, 30, 60 and 120 minutes with 2 processes on the 2-core EPYC: 3200 steps (its
# train.steps, 13 min), then 5-turn steps (data.turn_curriculum) of 0.6-0.8 s; the arms report the minutes their
# run took
BUDGETS = {"12min": 3200, "30min": 5000, "60min": 8200, "120min": 11700}
ABLATIONS = {
    "compute": Ablation(
        "success against training compute: one run of the config evaluated at about 12, 30, 60 and 120 minutes of "
        "the tiny preset on the 2-core machine (" + ", ".join(f"{s} steps" for s in BUDGETS.values()) + ")",
        tuple(Arm(name, Recipe(steps=steps)) for name, steps in BUDGETS.items()),
        (("30min", "12min"), ("60min", "30min"), ("120min", "60min")), "longer training edits better"),
    "data-scale": Ablation(
        "the same steps on 1k, 4k and 16k distinct training sessions",
        (Arm("1k", Recipe(1024)), Arm("4k", Recipe(4096)), Arm("16k", Recipe(16384))),
        (("16k", "4k"), ("4k", "1k")), "more distinct sessions edit better (the paper's data-scale study)"),
    "pairs": Ablation(
        "multi-turn sessions against the same transitions cut into one-turn pairs (data.mode pairs)",
        (Arm("sessions", BASE), Arm("pairs", PAIRS)),
        (("sessions", "pairs"),), "training on sessions beats training on pairs, most at later turns"),
    "segmentation": Ablation(
        "the segmentation tasks (CSP/NSP, masks at the paper's rate 0.8) against none, and at inference CS -> NS -> I "
        "chained against direct",
        (Arm("masks", MASKS), Arm("masks-chained", MASKS, chain_masks=True),
         Arm("no-masks", Recipe(overrides=("sequence.masks_present=0.0",)))),
        (("masks", "no-masks"), ("masks-chained", "masks")),
        "the segmentation tasks help, and chained mask prediction helps more"),
    "context": CONTEXT,
    # the same arms where the session's history matters
    "history": replace(CONTEXT, question="the context ablation on a world whose instructions also refer back (undo: "
                       "an object back where it was, to its old colour or size, a removed one back), which the "
                       "current image alone cannot answer", transitions=(*TRANSITIONS, "undo")),
}


def wilson(successes: int, n: int) -> list[float]:
    from vincie.evaluation.evaluate import wilson_interval

    return wilson_interval(successes / n, n)


class Runner:
    def __init__(self, name: str, out: str, config: str, overrides: list[str], seeds: int, steps: int | None,
                 sessions: int, nproc: int, test_sessions: int = TEST_SESSIONS, turns: int = TURNS,
                 parallel: int = 1):
        if name not in ABLATIONS:
            raise VincieError(f"ablation {name!r}: expected one of {', '.join(ABLATIONS)}")
        self.name, self.ablation, self.out = name, ABLATIONS[name], os.path.abspath(out)
        self.config, self.overrides, self.seeds, self.steps = config, overrides, seeds, steps
        self.sessions, self.nproc, self.test_sessions, self.turns = sessions, nproc, test_sessions, turns
        self.parallel = parallel  # runs trained and evaluated at once
        self.synth_lock = threading.Lock()
        # the subcommands running now; once `stopping` is set (SIGTERM, or any run's error) none starts
        self.running: set[subprocess.Popen] = set()
        self.running_lock, self.stopping, self.signalled = threading.Lock(), threading.Event(), False
        base = load_config(config, overrides)  # a bad config fails before anything runs
        self.resolution, self.config_steps = base.data.resolution, base.train.steps
        base_yaml = to_yaml(base)
        self.test_data = os.path.join(self.out, "data", f"test{self.ablation.world}")
        self.run_names = {arm.recipe: self.run_name(arm.recipe, base_yaml) for arm in self.ablation.arms}

    def run_name(self, recipe: Recipe, base_yaml: str) -> str:
        """n{sessions}, then each override of the recipe that changes the config (its last key and value): a recipe
        asking for what the config already has trains the config's own run (no masks on a preset without them)."""
        changes = [o for o in recipe.overrides if to_yaml(load_config(self.config, [*self.overrides, o])) != base_yaml]
        return "-".join([f"n{recipe.sessions or self.sessions}{self.ablation.world}",
                         *(key.split(".")[-1] + value for key, value in (o.split("=", 1) for o in changes))])

    def log(self, line: str) -> None:
        print(f"ablate {self.name}: {line}", flush=True)

    def synth(self, path: str, sessions: int, split: str, seed: int, turns: tuple[int, int]) -> str:
        from data_index.synthetic.synth import SynthJob, run_synth
        from vincie.config import StorageConfig, SynthConfig

        job = SynthJob(out=path, sessions=sessions, split=split, seed=seed,
                       synth=SynthConfig(resolution=self.resolution, min_turns=turns[0], max_turns=turns[1],
                                         transitions=list(self.ablation.transitions), image_format="png"))
        with self.synth_lock:  # runs side by side may share a dataset: one writes it, the next finds it done
            run_synth(job, StorageConfig(), progress=False)  # resumes, and checks the settings of what is there
        return path

    def make_test_data(self) -> str:
        return self.synth(self.test_data, self.test_sessions, "test", 0, (self.turns, self.turns))

    def train_data(self, recipe: Recipe, seed: int) -> str:
        sessions = recipe.sessions or self.sessions
        return self.synth(os.path.join(self.out, "data", f"train-{sessions}{self.ablation.world}-s{seed}"), sessions,
                          "train", seed, (2, 6))

    def run_dir(self, recipe: Recipe, seed: int) -> str:
        return os.path.join(self.out, "runs", f"{self.run_names[recipe]}-s{seed}")

    def arm_steps(self, recipe: Recipe) -> int:
        return recipe.steps or self.steps or self.config_steps

    def train(self, recipe: Recipe, seed: int) -> str:
        """The recipe's run for `seed`: trained (or resumed) unless finished. -> the run directory."""
        sessions = recipe.sessions or self.sessions
        run_dir = self.run_dir(recipe, seed)
        run = os.path.basename(run_dir)
        data = self.train_data(recipe, seed)
        overrides = [*self.overrides, f"run.out_dir={run_dir}", f"run.seed={seed}", f"data.train_url={data}",
                     f"data.eval_url={self.test_data}", *recipe.overrides,
                     f"train.steps={self.arm_steps(recipe)}"]
        cfg = load_config(self.config, overrides)
        config_path = os.path.join(self.out, self.name, "configs", f"{run}.yaml")
        os.makedirs(os.path.dirname(config_path), exist_ok=True)
        storage.write_bytes_atomic(config_path, to_yaml(cfg).encode())
        from vincie.training import checkpoint

        latest = checkpoint.latest(run_dir)
        done = checkpoint.step_of(latest) if latest else 0
        if done == cfg.train.steps:
            return run_dir  # finished
        if done > cfg.train.steps:
            raise VincieError(f"ablate {self.name}: run {run_dir} is past {cfg.train.steps} steps (at {done}), so its "
                              f"checkpoint at {cfg.train.steps} is gone: a shorter budget is evaluated before a "
                              "longer one continues the run")
        self.log(f"training {run} ({cfg.train.steps} steps, {sessions} sessions, {self.nproc} processes; log "
                 f"{run_dir}.log)")
        self.subcommand(["launch", "local", "--nproc", str(self.nproc), "--no-progress", "--config", config_path],
                        run_dir + ".log", f"training {run}")
        done = checkpoint.step_of(checkpoint.latest(run_dir))
        if done != cfg.train.steps:  # stopped early (SIGTERM to the training): its checkpoint is not the arm's
            raise VincieError(f"ablate {self.name}: training {run} stopped at step {done} of {cfg.train.steps}; "
                              "rerunning the command resumes it")
        return run_dir

    def evaluate(self, arm: Arm, seed: int) -> dict:
        """The arm's report for `seed`: kept, or its run trained (continued) and its edits judged."""
        run = os.path.basename(self.run_dir(arm.recipe, seed))
        path = os.path.join(self.out, "evals", f"{run}-step{self.arm_steps(arm.recipe)}"
                            f"{'-current' if arm.context == 'current' else ''}{'-chained' if arm.chain_masks else ''}")
        report = os.path.join(path, "report.json")
        if not os.path.exists(report):
            run_dir = self.train(arm.recipe, seed)
            self.log(f"evaluating {arm.name} seed {seed} ({self.test_sessions} sessions x {self.turns} turns"
                     f"{', context: current image' if arm.context == 'current' else ''}"
                     f"{', CS -> NS -> I' if arm.chain_masks else ''})")
            self.subcommand(["eval", "--bench", "synth", "--model", run_dir, "--data", self.test_data, "--out", path,
                             "--sessions", str(self.test_sessions), "--turns", str(self.turns), "--context",
                             arm.context, "--given-truth", "--json", *(["--chain-masks"] if arm.chain_masks else [])],
                            path + ".log",
                            f"evaluating {arm.name} seed {seed}")
        return json.load(open(report))

    def subcommand(self, args: list[str], log_path: str, what: str) -> None:
        """Runs `vincie ARGS` with its output appended to `log_path` (none once stopping); a failure names the log."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as log:
            with self.running_lock:  # under the lock: stop() sees every process started
                self.refuse_if_stopping(what)
                process = subprocess.Popen([sys.executable, "-m", "vincie", *args], stdout=log,
                                           stderr=subprocess.STDOUT)
                self.running.add(process)
            code = process.wait()
            with self.running_lock:
                self.running.discard(process)
        if code != 0:
            raise VincieError(f"ablate {self.name}: {what} " + ("stopped by SIGTERM" if self.signalled else
                              f"failed (exit {code}); see {log_path}") + " (rerunning the command resumes)")

    def refuse_if_stopping(self, what: str) -> None:
        if self.stopping.is_set():
            raise VincieError(f"ablate {self.name}: stopped before {what} (rerunning the command resumes)")

    def stop(self, signum, frame) -> None:
        """SIGTERM: passed to every running training (it checkpoints after its step and exits) and evaluation (its
        report is not written, so a rerun makes it); nothing new starts."""
        with self.running_lock:
            self.stopping.set()
            self.signalled = True
            for process in self.running:
                process.send_signal(signal.SIGTERM)
        self.log("SIGTERM: stopping the running trainings after their step (rerunning the command resumes)")

    def run_chain(self, chain: list[tuple[Arm, int]]) -> list[tuple[tuple[str, int], dict]]:
        """One run's arms in order; its error stops the other runs from starting more (a rerun resumes)."""
        results = []
        try:
            for arm, seed in chain:
                self.refuse_if_stopping(f"{arm.name} seed {seed}")  # no data made, nothing logged as started
                results.append(((arm.name, seed), self.evaluate(arm, seed)))
            return results
        except Exception:
            self.stopping.set()
            raise

    def run(self) -> dict:
        self.make_test_data()
        # the arms of one run in order (a longer budget continues a shorter one's run); runs side by side
        chains: dict[str, list[tuple[Arm, int]]] = {}
        for arm in self.ablation.arms:
            for seed in range(self.seeds):
                chains.setdefault(self.run_dir(arm.recipe, seed), []).append((arm, seed))
        previous = signal.signal(signal.SIGTERM, self.stop)
        try:
            with ThreadPoolExecutor(self.parallel) as pool:
                done = pool.map(self.run_chain, chains.values())
                report_of = dict(pair for chain in done for pair in chain)
        finally:
            signal.signal(signal.SIGTERM, previous)
        arms = {}
        for arm in self.ablation.arms:
            reports = [report_of[arm.name, seed] for seed in range(self.seeds)]
            n = sum(r["sessions"] for r in reports)

            def pooled(rates_of) -> list[float]:  # per turn, over the seeds' sessions
                return [sum(rates_of(r)[k] * r["sessions"] for r in reports) / n for k in range(self.turns)]

            success = pooled(lambda r: r["success"]["model"])
            steps = self.arm_steps(arm.recipe)
            minutes = [training_minutes(self.run_dir(arm.recipe, seed), steps) for seed in range(self.seeds)]
            arms[arm.name] = {"success": success,
                              "interval": [wilson(round(s * n), n) for s in success],
                              "per_seed": [r["success"]["model"] for r in reports], "outcomes": n,
                              "by_kind": pooled_by_kind([r["by_kind"]["model"] for r in reports]),
                              "given_truth": pooled(lambda r: r["success_given_truth"]),
                              "by_kind_given_truth": pooled_by_kind([r["by_kind_given_truth"] for r in reports]),
                              "x0_error": {t: sum(r["denoising"]["x0_mse"][t] for r in reports) / len(reports)
                                           for t in reports[0]["denoising"]["x0_mse"]},
                              "steps": steps, "train_minutes": sum(minutes) / len(minutes)}
        results = {"ablation": self.name, "question": self.ablation.question, "seeds": self.seeds,
                   "test_sessions": self.test_sessions, "turns": self.turns,
                   "steps": sorted({arm["steps"] for arm in arms.values()}), "arms": arms,
                   "paper": self.ablation.paper_says,
                   "orderings": [ordering(arms, better, worse) for better, worse in self.ablation.paper]}
        directory = os.path.join(self.out, self.name)
        storage.write_bytes_atomic(os.path.join(directory, "results.json"), json.dumps(results, indent=1).encode())
        storage.write_bytes_atomic(os.path.join(directory, "ablation.png"), plot(results))
        return results


def training_minutes(run_dir: str, steps: int) -> float:
    """The minutes a run's steps up to `steps` took, from its metrics.jsonl (each training record's step time times
    the steps since the record before; a step logged twice, by a run resumed from before it, counts once)."""
    step_s = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "step_s" in record and record["step"] <= steps:
                step_s[record["step"]] = record["step_s"]
    previous, seconds = 0, 0.0
    for step in sorted(step_s):
        seconds += step_s[step] * (step - previous)
        previous = step
    return seconds / 60


def pooled_by_kind(tables: list[dict]) -> dict:
    """Each edit kind's turns and their success on their own (a vincie eval report's by_kind table of each seed),
    pooled over the seeds."""
    kinds: dict[str, list[float]] = {}
    for table in tables:
        for kind, row in table.items():
            turns, passed = kinds.get(kind, [0, 0.0])
            kinds[kind] = [turns + row["turns"], passed + row["success"] * row["turns"]]
    return {kind: {"turns": turns, "success": passed / turns} for kind, (turns, passed) in sorted(kinds.items())}


def ordering(arms: dict, better: str, worse: str) -> dict:
    """Whether `better` beat `worse` as the paper says: the mean difference over turns and where their intervals
    do not overlap."""
    a, b = arms[better], arms[worse]
    diffs = [x - y for x, y in zip(a["success"], b["success"])]
    separated = [lo_a > hi_b or hi_a < lo_b for (lo_a, hi_a), (lo_b, hi_b) in zip(a["interval"], b["interval"])]
    return {"better": better, "worse": worse, "mean_difference": sum(diffs) / len(diffs), "difference": diffs,
            "turns_apart": [k + 1 for k, s in enumerate(separated) if s],
            "holds": sum(diffs) > 0}


def seed_count(results: dict) -> str:
    return f"{results['seeds']} seed{'s' if results['seeds'] != 1 else ''}"


def format_results(results: dict) -> str:
    from vincie.evaluation.evaluate import kinds_line

    turns = results["turns"]
    lines = [f"ablation {results['ablation']}: {results['question']}",
             f"({seed_count(results)} x {results['test_sessions']} test sessions; success per turn, mean over "
             "seeds, 95 % Wilson interval over the pooled outcomes; the arm's training steps and minutes)",
             f"{'arm':22s}{'steps':>7s}{'min':>6s}" + "".join(f"{'turn ' + str(k + 1):>18s}" for k in range(turns))]
    for name, arm in results["arms"].items():
        lines.append(f"{name:22s}{arm['steps']:7d}{arm['train_minutes']:6.1f}"
                     + "".join(f"{s:6.2f} [{lo:.2f},{hi:.2f}]" for s, (lo, hi) in zip(arm["success"], arm["interval"])))
    lines.append("each edit kind: the share of its turns whose own verdict passed (its turns):")
    for name, arm in results["arms"].items():
        lines.append(f"{name:22s}" + kinds_line(arm["by_kind"]))
    lines.append("each turn alone from the true earlier images (teacher forcing; with the session as context the arm "
                 "sees them), success per turn, then per edit kind (its turns):")
    for name, arm in results["arms"].items():
        lines.append(f"{name:22s}" + " ".join(f"{s:.2f}" for s in arm["given_truth"]) + "   "
                     + kinds_line(arm["by_kind_given_truth"]))
    lines.append("turn-1 x0 error on the test sessions by noise level t (the denoising probe; lower is better):")
    for name, arm in results["arms"].items():
        lines.append(f"{name:22s}" + ", ".join(f"t={t} {v:.4f}" for t, v in arm["x0_error"].items()))
    lines.append(f"the paper: {results['paper']}")
    for o in results["orderings"]:
        apart = f"; intervals apart at turns {', '.join(map(str, o['turns_apart']))}" if o["turns_apart"] else \
            "; the intervals overlap at every turn"
        lines.append(f"  {o['better']} - {o['worse']}: {o['mean_difference']:+.3f} mean over turns "
                     f"({', '.join(f'{d:+.2f}' for d in o['difference'])}): the paper's order "
                     f"{'holds' if o['holds'] else 'does not hold'}{apart}")
    return "\n".join(lines)


def plot(results: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    turns = list(range(1, results["turns"] + 1))
    for k, (name, arm) in enumerate(results["arms"].items()):
        x = [t + 0.06 * (k - (len(results["arms"]) - 1) / 2) for t in turns]
        low = [s - lo for s, (lo, _) in zip(arm["success"], arm["interval"])]
        high = [hi - s for s, (_, hi) in zip(arm["success"], arm["interval"])]
        ax.errorbar(x, arm["success"], yerr=[low, high], marker="o", capsize=3,
                    label=f"{name} ({arm['steps']} steps, {arm['train_minutes']:.0f} min)")
    steps = "/".join(map(str, results["steps"]))
    ax.set(title=f"vincie ablate {results['ablation']} ({seed_count(results)}, {steps} steps)",
           xlabel="turn", ylabel="success (cumulative)", ylim=(-0.02, 1.02), xticks=turns)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
