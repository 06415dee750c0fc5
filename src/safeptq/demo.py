"""``safeptq demo``: the main job end to end on the embedded default model. Build (or reuse) the model organism,
quantize its attacked model with RTN W8A8 and with Q-realign W8A8, quantize its aligned model with AAQ, evaluate all
five alike and write the report. Each stage is skipped when its output is complete, so a stopped demo resumes."""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ConfigError

__all__ = ["DemoOptions", "Stage", "plan_demo", "run_demo", "demo_runs", "headline", "DEMO_SUITES",
           "DEMO_MARKER", "DEMO_SCHEDULES"]

DEMO_SUITES = ("advbench:eval", "harmbench", "alpaca:eval", "xstest:safe", "sst2", "wikitext2")
DEMO_MARKER = ".safeptq-demo.json"

# Wall-time model (seconds), measured stage by stage by `make demo` on a fresh clone on 2 idle cores of an Ice Lake
# Xeon whose float32 rate on ``matmul_gflops()`` is about REF_GFLOPS (205-300 over repeated calls; BENCHMARKS.md,
# "Demo"); on another CPU every estimate scales by REF_GFLOPS / its own rate, measured when the plan is made.
# per_window: one 2048-token perplexity window of the 135M model; per_prompt: one generated reply of up to 32 tokens.
# organism_fp32: the v7 build without its own evaluation, trained in float32 (``precision: auto`` on a CPU without
# bfloat16 units; 22 min 49 s); organism: the same recipe in bf16 where the CPU has bfloat16 units (AMX: 2 x 9 min,
# measured on such a machine and not scaled: its bf16 rate is not the float32 rate).
REF_GFLOPS = 250.0
COST = {"organism": 1150.0, "organism_fp32": 1370.0, "rtn": 30.0, "realign": 680.0, "aaq": 955.0,
        "eval_fixed": 5.0, "per_prompt": 0.33, "per_class": 0.16, "per_window": 5.5}


@functools.lru_cache(maxsize=1)
def slowdown() -> float:
    """How many times longer than the reference machine work takes here (REF_GFLOPS / this CPU's float32 rate);
    1.0 on CUDA, where the CPU reference is all the plan has."""
    import torch

    from .quant.precision import matmul_gflops

    if torch.cuda.is_available():
        return 1.0
    return REF_GFLOPS / matmul_gflops(reps=10)


# name -> (WikiText-2 windows, Q-realign recipe overrides, AAQ recipe overrides). "default": the methods' own default
# schedules (200 prompts x 3 epochs per block; 100 steps); the shorter ones trade calibration for time, and their
# figures against the default's are in BENCHMARKS.md ("Demo"; benchmarks/demo_schedules.py).
DEMO_SCHEDULES: dict[str, tuple[int, dict, dict]] = {
    "default": (8, {}, {}),
    "quick": (4, {"nsamples": 100, "epochs": 2}, {"steps": 40}),
    "quicker": (4, {"nsamples": 64, "epochs": 1}, {"steps": 20}),
}


@dataclass
class DemoOptions:
    out: str | Path = "runs/demo"
    organism: str | Path | None = None  # a folder with aligned/ and attacked/ to use, or where to build them
    limit: int = 50  # prompts (and SST-2 sentences) per suite
    ppl_windows: int | None = None  # WikiText-2 windows of 2048 tokens (~6 s each); None: the schedule's
    aaq_scheme: str = "w4a8"
    base: str = "default"  # the organism's unaligned base model: AAQ pushes away from it
    data_dir: str | None = None
    progress: bool = True
    realign_overrides: dict = field(default_factory=dict)  # recipe fields, e.g. {"epochs": 1}, over the schedule's
    aaq_overrides: dict = field(default_factory=dict)
    schedule: str = "default"  # a key of DEMO_SCHEDULES

    def __post_init__(self) -> None:
        if self.schedule not in DEMO_SCHEDULES:
            raise ConfigError(f"unknown demo schedule {self.schedule!r}; choose one of {', '.join(DEMO_SCHEDULES)}")
        ppl, ro, ao = DEMO_SCHEDULES[self.schedule]
        self.ppl_windows = ppl if self.ppl_windows is None else self.ppl_windows
        self.realign_overrides = {**ro, **self.realign_overrides}
        self.aaq_overrides = {**ao, **self.aaq_overrides}

    def check(self) -> None:
        from .quant.args import resolve_scheme

        if self.limit <= 0 or self.ppl_windows <= 0:
            raise ConfigError(f"--limit and --ppl-windows must be positive, got {self.limit} and {self.ppl_windows}")
        resolve_scheme(self.aaq_scheme)  # an unknown scheme: one line, now


@dataclass
class Stage:
    name: str
    title: str
    estimate_s: float
    output: Path | None
    done: Callable[[], bool]
    run: Callable[[], None]
    cached_note: str = field(default="done")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _organism(opts: DemoOptions) -> tuple[dict[str, Path], bool, Callable[[], dict[str, Path]]]:
    """The organism's two folders, whether they exist already, and how to build them."""
    from .finetune.organism import OrganismRecipe, recipe_hash, stage_recipes
    from .paths import safeptq_home

    root = Path(opts.organism).expanduser() if opts.organism else safeptq_home() / "organism"
    given = {k: root / k for k in ("aligned", "attacked")}
    if opts.organism and all((p / "config.json").is_file() for p in given.values()):
        return given, True, lambda: given  # the user's own organism, used as it is
    rec_a, rec_b = stage_recipes(OrganismRecipe(), "default:SmolLM2-135M-Instruct")
    paths = {"aligned": root / f"aligned-{recipe_hash(rec_a)}", "attacked": root / f"attacked-{recipe_hash(rec_b)}"}
    cached = all((p / "manifest.json").is_file() for p in paths.values())

    def build() -> dict[str, Path]:
        from .api import build_organism

        # the demo evaluates both stages itself, on its own suites: the organism's evaluation would be done twice
        return build_organism(root, data_dir=opts.data_dir, progress=opts.progress, evaluate=False)

    return paths, cached, build


def _basis() -> str:
    import torch

    if torch.cuda.is_available():
        return "for 2 cores of the reference CPU (BENCHMARKS.md); a GPU takes less"
    return (f"here (this CPU's float32 rate {REF_GFLOPS / slowdown():.0f} GFLOP/s; the stage times of BENCHMARKS.md "
            f"were measured at {REF_GFLOPS:.0f})")


def _method_estimates(opts: DemoOptions) -> tuple[float, float]:
    """Q-realign's and AAQ's estimates, scaled from the default schedules' (200 prompts x 3 epochs per block; 100
    steps) by the overrides. Fixed costs: Q-realign about a seventh (probes, separability, export), AAQ about two
    fifths (the calibration replies, the reference cache, the transform search, GPTQ)."""
    r, a = opts.realign_overrides, opts.aaq_overrides
    realign = COST["realign"] * (0.15 + 0.85 * r.get("nsamples", 200) * r.get("epochs", 3) / 600)
    aaq = COST["aaq"] * (0.4 + 0.6 * a.get("steps", 100) / 100)
    return realign, aaq


def organism_estimate_s() -> float:
    """The organism build's time here: bf16 training where the machine has bfloat16 units, else float32 (the
    recipe's ``precision: auto``)."""
    from .quant.precision import native_bf16

    return COST["organism"] if native_bf16() else COST["organism_fp32"] * slowdown()


def plan_demo(opts: DemoOptions) -> list[Stage]:
    """The demo's stages, with their outputs and estimated times; nothing is run."""
    from . import api

    opts.check()
    out = Path(opts.out).expanduser()
    org, org_cached, build = _organism(opts)
    n_gen = 4 * opts.limit  # advbench:eval, harmbench, alpaca:eval, xstest:safe
    k = slowdown()
    eval_s = k * (COST["eval_fixed"] + COST["per_prompt"] * n_gen + COST["per_class"] * opts.limit
                  + COST["per_window"] * opts.ppl_windows)
    ev = {"suites": list(DEMO_SUITES), "limit": opts.limit, "ppl_windows": opts.ppl_windows}
    common = {"data_dir": opts.data_dir, "progress": opts.progress}

    def fp_eval(which: str) -> Callable[[], None]:
        return lambda: api.evaluate(str(org[which]), list(DEMO_SUITES), limit=opts.limit,
                                    ppl_windows=opts.ppl_windows, out=out / f"{which}.json", **common)

    def record(folder: str, name: str) -> Callable[[], bool]:
        return lambda: (out / folder / name).is_file()

    aaq_dir = f"aaq-{opts.aaq_scheme}"
    realign_s, aaq_s = (k * t for t in _method_estimates(opts))
    return [
        Stage("organism", "build the model organism (aligned, then attacked)", organism_estimate_s(), None,
              lambda: org_cached, lambda: org.update(build()), cached_note="cached"),
        Stage("attacked", "evaluate the attacked model (full precision)", eval_s, out / "attacked.json",
              lambda: (out / "attacked.json").is_file(), fp_eval("attacked")),
        Stage("rtn-w8a8", "RTN W8A8 of the attacked model, evaluated", k * COST["rtn"] + eval_s, out / "rtn-w8a8",
              record("rtn-w8a8", "quantize.json"),
              lambda: api.quantize(str(org["attacked"]), method="rtn", scheme="w8a8", eval=ev, out=out / "rtn-w8a8",
                                   **common)),
        Stage("realign-w8a8", "Q-realign W8A8 of the attacked model, evaluated", realign_s + eval_s,
              out / "realign-w8a8", record("realign-w8a8", "realign.json"),
              lambda: api.realign(str(org["attacked"]), probe_model=str(org["aligned"]), scheme="w8a8", eval=ev,
                                  out=out / "realign-w8a8", resume=True, **common, **opts.realign_overrides)),
        Stage("aligned", "evaluate the aligned model (full precision)", eval_s, out / "aligned.json",
              lambda: (out / "aligned.json").is_file(), fp_eval("aligned")),
        Stage(aaq_dir, f"AAQ {opts.aaq_scheme.upper()} of the aligned model (pushed from its base), evaluated",
              aaq_s + eval_s, out / aaq_dir, record(aaq_dir, "aaq.json"),
              lambda: api.aaq(str(org["aligned"]), base=opts.base, scheme=opts.aaq_scheme, eval=ev,
                              out=out / aaq_dir, resume=True, **common, **opts.aaq_overrides)),
        Stage("report", "write the report", 10.0, out / "report.html", lambda: False,
              lambda: _report(out, aaq_dir, opts.aaq_scheme)),
    ]


def demo_runs(out: Path, aaq_scheme: str) -> list[str]:
    """The report's runs, ``NAME=PATH``, in the order shown."""
    return [f"attacked={out / 'attacked.json'}", f"RTN W8A8={out / 'rtn-w8a8'}",
            f"Q-realign W8A8={out / 'realign-w8a8'}", f"aligned={out / 'aligned.json'}",
            f"AAQ {aaq_scheme.upper()}={out / f'aaq-{aaq_scheme}'}"]


def _report(out: Path, aaq_dir: str, scheme: str) -> None:
    from .reporting import build_report

    build_report(demo_runs(out, scheme), out / "report.html", baseline="RTN W8A8", attacked="attacked",
                 aligned="aligned",
                 title="safeptq demo: restoring (Q-realign) and keeping (AAQ) safety through quantization")


def _settings(opts: DemoOptions) -> dict:
    """What the demo's runs depend on: a resumed demo must use the same, or its runs would not pair. (A schedule is
    its windows and overrides, recorded as such: demo folders of earlier versions still resume.)"""
    return {"limit": opts.limit, "ppl_windows": opts.ppl_windows, "aaq_scheme": opts.aaq_scheme, "base": opts.base,
            "organism": str(opts.organism) if opts.organism else None,
            "realign_overrides": opts.realign_overrides, "aaq_overrides": opts.aaq_overrides}


def _claim(out: Path, opts: DemoOptions) -> None:
    """The demo writes only into a folder it created (its marker) or an empty / new one, and resumes only with
    the settings it started with."""
    import json

    from . import __version__
    from .runs import json_safe, write_json_atomic

    if out.exists() and not out.is_dir():
        raise ConfigError(f"demo output {out} is a file; give a folder")
    marker = out / DEMO_MARKER
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise ConfigError(f"refusing to use {out}: it exists and was not created by safeptq demo; choose another --out")
    want = json_safe(_settings(opts))
    if marker.is_file():
        try:
            had = json.loads(marker.read_text()).get("settings")
        except (OSError, ValueError):
            had = None
        if had is not None and had != want:
            k = next(k for k in want if had.get(k) != want[k])
            raise ConfigError(f"{out} holds a demo started with {k}={had.get(k)!r} (now {want[k]!r}); resume it with "
                              "the same settings or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "version": __version__,
                               "settings": want})


def run_demo(opts: DemoOptions | None = None, say: Callable[[str], None] = _say) -> dict:
    """Run (or resume) the demo; returns ``{"report", "markdown": paths, "stages": {name: cached | done | ran},
    "rows": headline numbers per run}``."""
    from .quant.precision import native_bf16
    from .runs import FolderLock

    opts = opts or DemoOptions()
    stages = plan_demo(opts)
    out = Path(opts.out).expanduser()
    with FolderLock(out):
        _claim(out, opts)
        todo = [s for s in stages if not s.done()]
        states = {s.name: ("to do" if s in todo else s.cached_note) for s in stages}
        say(f"safeptq demo -> {out}")
        for i, s in enumerate(stages, 1):
            state = states[s.name]
            say(f"  {i}. {s.title:<72} {state:>6}  ~{_fmt(s.estimate_s) if s in todo else '-'}")
        left = sum(s.estimate_s for s in todo)
        say(f"  estimated: {_fmt(left)} {_basis()}")
        if todo and todo[0].name == "organism" and not native_bf16():
            say("  note: this machine has no bfloat16 units, so the organism trains in float32 (a different model "
                "from the bf16 recipe's); --organism PATH reuses one built elsewhere")
        t_all = time.time()
        for i, s in enumerate(stages, 1):
            if s not in todo:
                continue
            say(f"[{i}/{len(stages)}] {s.title} (~{_fmt(s.estimate_s)}) ...")
            t0 = time.time()
            s.run()
            states[s.name] = "ran"
            left -= s.estimate_s
            say(f"[{i}/{len(stages)}] done in {_fmt(time.time() - t0)}"
                + (f"; ~{_fmt(left)} left" if left > 1 else ""))
        say(f"demo finished in {_fmt(time.time() - t_all)}")
    return {"report": out / "report.html", "markdown": out / "report.md", "stages": states,
            "rows": headline(out, opts.aaq_scheme)}


def headline(out: Path, aaq_scheme: str) -> list[dict]:
    """The demo's headline numbers per run: each suite's headline metric (harmful rate, over-refusal, accuracy,
    perplexity) with its interval."""
    from .reporting.build import collect_runs
    from .reporting.collect import METRIC, suite_kind

    rows = []
    for e in collect_runs(demo_runs(out, aaq_scheme)):
        cells = {s: (r[METRIC[suite_kind(s, r)]], r.get("ci95")) for s, r in e.results.items() if s in DEMO_SUITES}
        rows.append({"run": e.name, **cells})
    return rows
